#!/usr/bin/env python
"""How much can any draft-length rule gain over vLLM's best fixed k with this drafter?

    .venv/bin/python scripts/probe_headroom.py --costs-from docs/results/quick-.../bench.json \
        [--per-task 8] [--max-tokens 64] [--out docs/results/headroom-...]

Records every k_max-token draft of a greedy run on the benchmark's prompts
(the first --per-task of each task) and on the tuning prompts, fits a step's
cost from the bench run's fixed-k rows at batch 1 (same machine), and replays
each rule family on the drafts with its best parameter in hindsight
(vllm_cmasd/bench/headroom.py). Source scripts/env.sh first, as for the benchmark.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_cmasd.bench import headroom
from vllm_cmasd.bench.prompts import TASKS, TUNING_PROMPTS, load_prompts
from vllm_cmasd.bench.runner import FIXED_K_METHODS
from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET


def fixed_k_rows(bench: dict) -> list[tuple[int, float, float]]:
    return [(r["k"], r["mean_acceptance_length"], r["speedup_vs_ar"]) for r in bench["summary"]
            if r["method"] in FIXED_K_METHODS and r["task"] == "all" and r["batch_size"] == 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs-from", required=True, help="a bench.json with fixed-k rows at batch 1")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--draft-method", default="draft_model")
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()

    rows = fixed_k_rows(json.loads(Path(args.costs_from).read_text()))
    costs = headroom.fit_step_costs(rows)
    print(f"step cost in plain steps: 1 + {costs.fixed:.3f} + {costs.per_token:.3f} x drafted tokens "
          f"(from {len(rows)} fixed-k rows of {args.costs_from})")
    tasks = load_prompts()["tasks"]
    prompt_sets = {
        "benchmark": [p["prompt"] for t in TASKS for p in tasks[t][:args.per_task]],
        "tuning": list(TUNING_PROMPTS),
    }
    report = {"costs_from": args.costs_from, "fixed_k_rows": rows, "step_costs": vars(costs), "sets": {}}
    for name, prompts in prompt_sets.items():
        drafts = headroom.record_drafts(args.target, args.draft, prompts, max_tokens=args.max_tokens,
                                        k_max=args.k_max, draft_method=args.draft_method)
        profile = headroom.acceptance_profile(drafts)
        print(f"\n## {name} prompts: {len(prompts)} prompts, {len(drafts)} drafts of {args.k_max}")
        print("P(accepted run >= j), j = 1..k_max: " + " ".join(f"{p:.2f}" for p in profile))
        report["sets"][name] = {"num_prompts": len(prompts), "num_drafts": len(drafts), "acceptance_profile": profile}
        for charged, label in ((False, "free stops"), (True, "charged")):
            table = headroom.headroom(drafts, costs, charged=charged)
            print(f"\n{label}:\n" + headroom.format_table(table))
            report["sets"][name][label.replace(" ", "_")] = table
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "headroom.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out / 'headroom.json'}")


if __name__ == "__main__":
    main()
