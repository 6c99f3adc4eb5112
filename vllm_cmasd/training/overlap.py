"""Stage ``overlap``: the share of each benchmark prompt's 8-word shingles that the work
dir's training prompts hold (a leakage check beside the exclusion rules of
:func:`vllm_cmasd.training.data.unseen_filter`) -> ``overlap.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from vllm_cmasd.training.common import REPO_ROOT, log


def _shingles(text: str, n: int = 8) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def stage_overlap(args) -> None:
    """How much of each benchmark prompt the training data hold: the share of its 8-word
    shingles found in the work dir's answered training prompts, leaving out shingles
    that 20+ training prompts share (the templates' own words). The exclusion rules work
    on documents and identical paragraphs; this also catches near-duplicate text.
    Writes ``overlap.json`` to the work dir."""
    import torch

    work = Path(args.work)
    records = torch.load(work / "data.pt", weights_only=False)
    answered = {r["sid"] for r in records["train"]}
    pj = json.loads((work / "prompts.json").read_text())
    train_prompts = {q["prompt"] for qs in pj.values() for q in qs if q["sid"] in answered}
    seen = Counter()
    for prompt in train_prompts:
        seen.update(_shingles(prompt))
    tasks = json.loads((REPO_ROOT / "vllm_cmasd/bench/prompts.json").read_text())["tasks"]
    rows = []
    for task, plist in tasks.items():
        for q in plist:
            own = {h for h in _shingles(q["prompt"]) if seen[h] < 20}
            hit = sum(1 for h in own if seen[h])
            rows.append({"id": q["id"], "task": task, "shingles": len(own),
                         "share_in_training": round(hit / max(len(own), 1), 4)})
    rows.sort(key=lambda r: -r["share_in_training"])
    shares = [r["share_in_training"] for r in rows]
    summary = {"prompts": len(rows), "training_prompts": len(train_prompts),
               "mean_share": round(sum(shares) / len(shares), 4),
               "prompts_with_share": {f">={t}": sum(x >= t for x in shares) for t in (0.5, 0.2, 0.05)},
               "top": rows[:8]}
    (work / "overlap.json").write_text(json.dumps({"summary": summary, "prompts": rows}, indent=1))
    log("overlap: " + json.dumps(summary))
