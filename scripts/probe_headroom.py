#!/usr/bin/env python
"""How much can any draft-length rule gain over vLLM's best fixed k with this drafter?

    .venv/bin/python scripts/probe_headroom.py --costs-from docs/results/quick-.../bench.json \
        [--per-task 8] [--max-tokens 64] [--out docs/results/headroom-...]

Records every k_max-token draft of a greedy run on the benchmark's prompts
(the first --per-task of each task) and on the tuning prompts, fits a step's
cost from the bench run's fixed-k rows at --batch-size (same machine), and replays
each rule family on the drafts with its best parameter in hindsight
(vllm_cmasd/bench/headroom.py). With --batch-size above 1 the replay runs the
bench's static batches (requests of its max_tokens, the batch done with its
slowest), with costs fitted so each fixed k replays to its measured speedup.
Source scripts/env.sh first, as for the benchmark.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_cmasd.bench import headroom
from vllm_cmasd.bench.prompts import TASKS, TUNING_PROMPTS, load_prompts
from vllm_cmasd.bench.runner import FIXED_K_METHODS
from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET


def fixed_k_rows(bench: dict, batch_size: int) -> list[tuple[int, float, float]]:
    return [(r["k"], r["mean_acceptance_length"], r["speedup_vs_ar"]) for r in bench["summary"]
            if r["method"] in FIXED_K_METHODS and r["task"] == "all" and r["batch_size"] == batch_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs-from", required=True, help="a bench.json with fixed-k rows at --batch-size")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="the fixed-k rows' batch size; above 1 the replay runs static batches of it")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--draft-method", default="draft_model")
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()

    bench = json.loads(Path(args.costs_from).read_text())
    rows = fixed_k_rows(bench, args.batch_size)
    tasks = load_prompts()["tasks"]
    prompt_sets = {
        "benchmark": [p["prompt"] for t in TASKS for p in tasks[t][:args.per_task]],
        "tuning": list(TUNING_PROMPTS),
    }
    report = {"costs_from": args.costs_from, "batch_size": args.batch_size, "fixed_k_rows": rows, "sets": {}}
    for name, prompts in prompt_sets.items():
        drafts = headroom.record_drafts(args.target, args.draft, prompts, max_tokens=args.max_tokens,
                                        k_max=args.k_max, draft_method=args.draft_method)
        profile = headroom.acceptance_profile(drafts)
        print(f"\n## {name} prompts: {len(prompts)} prompts, {len(drafts)} drafts of {args.k_max}")
        print("P(accepted run >= j), j = 1..k_max: " + " ".join(f"{p:.2f}" for p in profile))
        batch = None
        if args.batch_size == 1:
            costs = headroom.fit_step_costs(rows)
        else:  # the bench's static batches, fitted so each fixed k replays to its measured speedup
            batch = headroom.StaticBatch(size=args.batch_size, tokens=bench["preset_settings"]["max_tokens"])
            costs = headroom.fit_static_batch_costs(drafts, rows, batch)
        print(f"step cost in plain steps: 1 + {costs.fixed:.3f} (a verifying step) + {costs.per_token:.3f} x drafted "
              f"tokens{' / batch size' if batch else ''} (from {len(rows)} fixed-k rows of {args.costs_from})")
        # How well the cost model reproduces the measured fixed-k rows (the replay's drafts are
        # from these prompts, the rows from the bench's).
        check = {k: headroom.speedup(drafts, headroom.fixed(k), costs, batch=batch) for k, _, _ in rows}
        print("fixed k, measured -> replayed: " + ", ".join(f"k={k} {speedup:.3f} -> {check[k]:.3f}" for k, _, speedup in rows))
        report["sets"][name] = {"num_prompts": len(prompts), "num_drafts": len(drafts), "acceptance_profile": profile,
                                "step_costs": vars(costs), "fixed_k_replayed": check}
        for charged, label in ((False, "free stops"), (True, "charged")):
            table = headroom.headroom(drafts, costs, charged=charged, batch=batch)
            print(f"\n{label}:\n" + headroom.format_table(table))
            report["sets"][name][label.replace(" ", "_")] = table
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "headroom.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out / 'headroom.json'}")


if __name__ == "__main__":
    main()
