"""scripts/train_draft.py's leakage guards: what may reach training, and the overlap check."""

from __future__ import annotations

import json
from argparse import Namespace

import torch
from conftest import load_script

from vllm_cmasd.bench.prompts import SUMMARIZATION_TEMPLATE, load_prompts

train_draft = load_script("train_draft")


def summarize(*paragraphs: str) -> str:
    return SUMMARIZATION_TEMPLATE.format(text="\n\n".join(paragraphs))


FRESH = "A paragraph that no document on this machine holds, written for this test alone."


def test_unseen_filter_rejects_benchmark_and_heldout_documents_and_paragraphs():
    bench = load_prompts()["tasks"]["summarization"][0]
    bench_paragraph = bench["prompt"].split("\n\n", 1)[1].split("\n\n")[0]
    heldout_paragraph = "A held-out paragraph, also written for this test."
    heldout = [{"sid": "docs:manpage:/usr/share/man/man1/cmasd-heldout.1.gz#paragraph0",
                "prompt": summarize(heldout_paragraph, "Its second paragraph.")}]
    unseen = train_draft._unseen_filter(heldout)

    assert unseen("docs:pypi-doc:cmasd-nowhere==1.0:guide.md#paragraph0", summarize(FRESH))
    # A benchmark document, whatever its text; and any other language of a held-out page.
    assert not unseen("docs:" + bench["source"], summarize(FRESH))
    assert not unseen("docs:manpage:/usr/share/man/de/man1/cmasd-heldout.1.gz#paragraph4", summarize(FRESH))
    # Their paragraphs under names of their own (a file that two packages ship).
    assert not unseen("docs:pypi-doc:cmasd-nowhere==1.0:guide.md#paragraph1", summarize(FRESH, bench_paragraph))
    assert not unseen("docs:pypi-doc:cmasd-nowhere==1.0:guide.md#paragraph2", summarize(heldout_paragraph))


def test_overlap_finds_benchmark_text_in_training_prompts(tmp_path):
    bench = [q for items in load_prompts()["tasks"].values() for q in items]
    leaked = bench[5]
    fresh = [summarize(f"{FRESH} Variant {i} of it, with words of its own: {' '.join(['word%d' % j for j in range(i, i + 12)])}.")
             for i in range(30)]
    prompts = {"train_docs": [{"sid": f"docs:t{i}", "kind": "docs", "prompt": p} for i, p in enumerate(fresh)]}
    prompts["train_docs"].append({"sid": "docs:leak", "kind": "docs", "prompt": "Please answer: " + leaked["prompt"]})
    prompts["train_docs"].append({"sid": "docs:unanswered", "kind": "docs", "prompt": bench[6]["prompt"]})
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    answered = [{"sid": q["sid"]} for q in prompts["train_docs"] if q["sid"] != "docs:unanswered"]
    torch.save({"train": answered}, tmp_path / "data.pt")

    train_draft.stage_overlap(Namespace(work=str(tmp_path)))
    result = json.loads((tmp_path / "overlap.json").read_text())
    shares = {row["id"]: row["share_in_training"] for row in result["prompts"]}
    assert shares[leaked["id"]] == 1.0
    assert shares[bench[6]["id"]] < 0.5  # asked but never answered: not training data
    assert result["summary"]["prompts_with_share"][">=0.5"] == 1
    assert result["summary"]["training_prompts"] == len(answered)
