#!/usr/bin/env python
"""Does a spec-decode engine cost anything on a static batch where it drafts little or nothing?

    .venv/bin/python scripts/probe_static_batch.py [--batch 32] [--max-tokens 64] [--repeats 3]

In-process engines on the real pair (source scripts/env.sh first, as for the
benchmark), one after another: plain decoding; CM-ASD with the controller
forced never to draft (``_who_drafts`` answers no for every request, so no
drafter pass runs); the controller deciding for itself. Each gets one 4-chat
warm-up, then ``--repeats`` timed ``LLM.chat`` calls over the serve
benchmark's prompts (the benchmark's first 24, cycled to ``--batch``), greedy.
Prints the seconds of each call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: both cores for the engine

    import numpy as np
    from vllm import LLM, SamplingParams

    from vllm_cmasd.bench.prompts import load_prompts
    from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET, llm_kwargs, shutdown
    from vllm_cmasd.proposer import CmasdProposer

    texts = [p["prompt"] for task in load_prompts()["tasks"].values() for p in task][:24]
    chats = [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    controller = CmasdProposer._who_drafts
    configs = {
        "plain": (llm_kwargs(DEFAULT_TARGET), None),
        "controller, never drafting": (
            llm_kwargs(DEFAULT_TARGET, draft=DEFAULT_DRAFT, cmasd={"verification": "exact"}),
            lambda self, req_ids, query_lens, catch_ups: (np.zeros(len(req_ids), dtype=bool), None),
        ),
        "controller": (llm_kwargs(DEFAULT_TARGET, draft=DEFAULT_DRAFT, cmasd={"verification": "exact"}), controller),
    }
    for name, (kwargs, who_drafts) in configs.items():
        CmasdProposer._who_drafts = who_drafts or controller
        llm = LLM(**kwargs)
        try:
            llm.chat(chats[:4], params, use_tqdm=False)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                llm.chat(chats, params, use_tqdm=False)
                seconds.append(time.perf_counter() - start)
        finally:
            shutdown(llm)
        print(f"{name}: " + " / ".join(f"{s:.2f} s" for s in seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
