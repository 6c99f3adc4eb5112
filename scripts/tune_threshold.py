#!/usr/bin/env python
"""Pick CM-ASD's default stop threshold for a draft, on prompts the benchmark never uses.

Runs plain decoding and CM-ASD (exact) at each threshold on the same tuning
prompts at batch 1, greedy, rounds interleaved so load drifts hit every
setting alike, and prints tokens/s, speedup, mean draft length and acceptance
length per threshold. The tuning prompts (bench/prompts.py TUNING_PROMPTS)
are short chat tasks written for tuning; the benchmark's prompts (vllm_cmasd/bench/prompts.json) stay
unseen, so the benchmark measures a default chosen elsewhere.

    .venv/bin/python scripts/tune_threshold.py --thresholds 0.05 0.1 0.2 0.3
"""

from __future__ import annotations

import argparse
import json
import time

from vllm_cmasd.bench.prompts import TUNING_PROMPTS
from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET, llm_kwargs, preload_openmp_and_reexec



def timed_run(llm, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tokens, start = 0, time.perf_counter()
    for prompt in prompts:  # batch 1
        out = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)
        tokens += len(out[0].outputs[0].token_ids)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    preload_openmp_and_reexec()

    import gc

    from vllm import LLM

    from vllm_cmasd.engines import shutdown, spec_decode_counters

    settings = {"plain": None} | {f"threshold {t}": t for t in args.thresholds}
    totals = {name: {"tokens": 0, "seconds": 0.0, "drafts": 0, "drafted": 0, "accepted": 0} for name in settings}
    for round_index in range(args.rounds):
        for name, threshold in settings.items():
            if threshold is None:
                kwargs = llm_kwargs(args.target)
            else:
                kwargs = llm_kwargs(
                    args.target, draft=args.draft, num_speculative_tokens=args.k_max,
                    cmasd={"verification": "exact", "threshold": threshold},
                )
            gc.collect()
            llm = LLM(**kwargs)
            timed_run(llm, TUNING_PROMPTS[:1], 8)  # warm-up
            before = spec_decode_counters(llm)
            tokens, seconds = timed_run(llm, TUNING_PROMPTS, args.max_tokens)
            after = spec_decode_counters(llm)
            shutdown(llm)
            total = totals[name]
            total["tokens"] += tokens
            total["seconds"] += seconds
            for key, counter in (("drafts", "num_drafts"), ("drafted", "num_draft_tokens"), ("accepted", "num_accepted_tokens")):
                total[key] += after[counter] - before[counter]
            print(f"[tune] round {round_index + 1} {name}: {tokens / seconds:.2f} tok/s", flush=True)

    plain = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    rows = []
    for name, total in totals.items():
        tps = total["tokens"] / total["seconds"]
        drafts = max(total["drafts"], 1)
        rows.append({
            "setting": name,
            "tokens_per_s": round(tps, 2),
            "speedup_vs_plain": round(tps / plain, 3),
            "mean_draft_length": round(total["drafted"] / drafts, 2),
            "mean_acceptance_length": round(1 + total["accepted"] / drafts, 2),
        })
    print(f"\n{'setting':16} {'tok/s':>7} {'speedup':>8} {'draft len':>10} {'accept len':>11}")
    for row in rows:
        print(f"{row['setting']:16} {row['tokens_per_s']:7.2f} {row['speedup_vs_plain']:8.3f} "
              f"{row['mean_draft_length']:10.2f} {row['mean_acceptance_length']:11.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
