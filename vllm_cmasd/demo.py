"""The demo: plain decoding vs CM-ASD on the real pair, quietly, at real speed.

Both engines run in this process (an engine in its own process reserves one
of the two cores for the caller: plain decoding measured 13 against 21
tokens/s), one after the other, on the same prompts at batch 1, greedy.
vLLM's start-up logs, config dumps and known-harmless warnings are hidden
unless ``--verbose``; a progress bar per method and a small table are what
it prints. ``--show N`` prints N answers with each token marked by where it
came from: a drafted token the target accepted, the target's correction of a
rejected draft, the bonus token after a fully accepted draft, or a plain
target token (a step without a draft).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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

# Where an emitted token came from (see label_tokens).
ACCEPTED, CORRECTION, BONUS, TARGET = "accepted", "correction", "bonus", "target"
_COLOURS = {ACCEPTED: "\033[32m", CORRECTION: "\033[31m", BONUS: "\033[36m", TARGET: ""}
_MARKERS = {ACCEPTED: ("[", "]"), CORRECTION: ("<", ">"), BONUS: ("{", "}"), TARGET: ("", "")}


def quiet_environment(env: dict[str, str]) -> None:
    """What keeps vLLM, torch and Python quiet; set before they are imported
    (the CLI re-executes itself with these, vllm_cmasd.engines)."""
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's INFO lines, config dumps, warnings
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10's "NUMA binding" warnings
    env.setdefault("PYTHONWARNINGS", "ignore")  # FutureWarnings from vLLM's kernel dispatcher


def label_tokens(steps: list[tuple[int, int, int]]) -> list[str]:
    """One label per emitted token, from the request's steps in order: each
    (tokens emitted, tokens drafted for it, drafted tokens accepted)."""
    labels: list[str] = []
    for emitted, drafted, accepted in steps:
        if drafted == 0:
            step = [TARGET] * emitted
        else:
            step = [ACCEPTED] * accepted + [CORRECTION if accepted < drafted else BONUS]
        labels += step[:emitted]
    return labels


def render(pieces: list[str], labels: list[str], colour: bool) -> str:
    out = []
    for text, label in zip(pieces, labels):
        if colour and _COLOURS[label]:
            out.append(f"{_COLOURS[label]}{text}\033[0m")
        elif not colour:
            left, right = _MARKERS[label]
            out.append(f"{left}{text}{right}")
        else:
            out.append(text)
    return "".join(out)


def legend(colour: bool) -> str:
    names = {ACCEPTED: "accepted draft token", CORRECTION: "target's correction", BONUS: "bonus token",
             TARGET: "target token (no draft)"}
    return "  ".join(render([names[k]], [k], colour) for k in (ACCEPTED, CORRECTION, BONUS, TARGET))


def _timed_answers(llm, prompts: list[str], max_tokens: int, desc: str, progress: bool):
    """Greedy answers one request at a time (batch 1): token ids, request ids, seconds."""
    from tqdm import tqdm
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    answers, request_ids, seconds = [], [], 0.0
    for prompt in tqdm(prompts, desc=desc, unit="prompt", disable=not progress, leave=True, file=sys.stdout):
        start = time.perf_counter()
        result = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)
        seconds += time.perf_counter() - start
        answers.append(list(result[0].outputs[0].token_ids))
        request_ids.append(result[0].request_id)
    return answers, request_ids, seconds


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("vllm").setLevel(logging.ERROR)
    from vllm import LLM

    from vllm_cmasd.engines import llm_kwargs, model_runner, shutdown, spec_decode_counters

    prompts = DEMO_PROMPTS[: args.num_prompts]
    cmasd = json.loads(args.cmasd)
    quiet = {} if args.verbose else {"use_tqdm_on_load": False}
    print(f"target {args.target}\ndraft  {args.draft}  (k_max {args.k_max}, cmasd {json.dumps(cmasd)})")

    llm = LLM(**llm_kwargs(args.target, **quiet))
    _timed_answers(llm, prompts[:1], 8, "", progress=False)  # warm-up
    plain, _, plain_s = _timed_answers(llm, prompts, args.max_tokens, "plain decoding", progress=True)
    shutdown(llm)

    llm = LLM(**llm_kwargs(args.target, draft=args.draft, num_speculative_tokens=args.k_max, cmasd=cmasd, **quiet))
    drafter = model_runner(llm).drafter
    _timed_answers(llm, prompts[:1], 8, "", progress=False)
    drafter.trace = {}  # per request: the steps label_tokens reads
    before = spec_decode_counters(llm)
    ours, request_ids, ours_s = _timed_answers(llm, prompts, args.max_tokens, "CM-ASD        ", progress=True)
    after = spec_decode_counters(llm)
    tokenizer = llm.get_tokenizer()
    shown = []
    for answer, request_id in zip(ours[: args.show], request_ids):
        steps = next((v for k, v in drafter.trace.items() if k.split("-")[0] == request_id), [])
        shown.append(([tokenizer.decode([t]) for t in answer], label_tokens(steps)))
    shutdown(llm)

    plain_tps, ours_tps = sum(map(len, plain)) / plain_s, sum(map(len, ours)) / ours_s
    drafts = after["num_drafts"] - before["num_drafts"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    identical = sum(a == b for a, b in zip(plain, ours))
    print()
    print("| method         | tokens/s | speedup | identical to plain | mean draft | tokens per step |")
    print("|----------------|---------:|--------:|-------------------:|-----------:|----------------:|")
    print(f"| plain decoding | {plain_tps:8.2f} |   1.00x |                  - |          - |            1.00 |")
    print(f"| CM-ASD         | {ours_tps:8.2f} | {ours_tps / plain_tps:6.2f}x | {identical:>14}/{len(prompts):<3} "
          f"| {drafted / max(drafts, 1):10.2f} | {1 + accepted / max(drafts, 1):15.2f} |")
    if cmasd.get("verification", "exact") == "exact" and identical != len(prompts):
        print("NOTE: exact mode should be identical; see README (Correctness) for the one admissible cause.")
    if shown:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(f"\n{legend(colour)}")
        for prompt, (pieces, labels) in zip(prompts, shown):
            print(f"\n> {prompt}\n{render(pieces, labels + [TARGET] * (len(pieces) - len(labels)), colour)}")
    return 0
