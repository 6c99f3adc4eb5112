#!/usr/bin/env python
"""Where CM-ASD's drafting time goes, on the real pair: one batch, timed by parts.

    .venv/bin/python scripts/probe_drafting.py [--batch 16] [--budget]

Runs one greedy batch of the benchmark's instruction prompts (32 new tokens)
with CM-ASD exact, k_max 8, and prints per ``propose`` call: its wall time,
the drafter's model forwards within it, the confidence signals, and the
drafter passes per call. With ``--budget`` (``draft_budget: "auto"``) it also
prints how long the engine took to start, which includes profiling the cost
model, and the profiled cost model itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(record: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key] = record.get(key, 0.0) + time.perf_counter() - start
            record[key + "_calls"] = record.get(key + "_calls", 0) + 1

    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", action="store_true", help="draft_budget: auto")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the runner lives in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from vllm import LLM, SamplingParams

    import vllm_cmasd.proposer as proposer_module
    from vllm_cmasd.bench.prompts import load_prompts
    from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET, llm_kwargs, model_runner, shutdown

    cmasd = {"verification": "exact", **({"draft_budget": "auto"} if args.budget else {})}
    start = time.perf_counter()
    llm = LLM(**llm_kwargs(DEFAULT_TARGET, draft=DEFAULT_DRAFT, num_speculative_tokens=8, cmasd=cmasd))
    started = time.perf_counter() - start
    drafter = model_runner(llm).drafter
    prompts = [p["prompt"] for p in load_prompts()["tasks"]["instruction"][: args.batch]]
    params = SamplingParams(temperature=0, max_tokens=32)

    start = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    first = time.perf_counter() - start
    if args.budget:
        print(f"engine start (cost model profiled there): {started:.1f} s; first generate: {first:.1f} s")
        costs = drafter.costs.prior
        for n, t, d in zip(costs.tokens, costs.target_s, costs.draft_s):
            print(f"  {n:4d} tokens: target {1000 * t:7.1f} ms, drafter pass {1000 * d:6.1f} ms")

    record: dict = {}
    drafter.propose = timed(record, "propose", drafter.propose)
    drafter.model.forward = timed(record, "forward", drafter.model.forward)
    proposer_module.unified_confidence = timed(record, "confidence", proposer_module.unified_confidence)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    calls = record["propose_calls"]
    print(
        f"batch {args.batch}: {wall:.2f} s, {calls} propose calls; per call: "
        f"{1000 * record['propose'] / calls:.1f} ms, of which drafter forwards "
        f"{1000 * record['forward'] / calls:.1f} ms ({record['forward_calls'] / calls:.2f} passes) "
        f"and confidence {1000 * record['confidence'] / calls:.1f} ms"
    )
    shutdown(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
