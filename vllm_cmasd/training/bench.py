"""Stage ``bench``: plain decoding of target and draft alone and vLLM ``draft_model``
speculative decoding (greedy, ``--bench-k`` 4) at batch 1 on held-out prompts
(``--bench-set heldout``: stdlib/licence, ``heldout-chat``, ``heldout-docs``;
``benchmark``: the first ``--bench-per-task`` prompts of each task of the plugin
benchmark) -> ``bench.json`` in the work dir (or ``--bench-out``); ``--bench-only``
runs a subset of ``target,draft,spec``. The draft is the assembled checkpoint
``--assemble-to``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vllm_cmasd.training.common import REPO_ROOT, chat_ids, log


def _bench_prompts(args, tok):
    """``--bench-set heldout``: the first ``--bench-prompts`` held-out stdlib/licence
    prompts; ``heldout-chat``: held-out chat-domain prompts (Magpie + templated tasks);
    ``heldout-docs``: held-out benchmark-domain prompts (documents no benchmark prompt uses);
    ``benchmark``: the first ``--bench-per-task`` prompts of every task of the plugin's
    fixed benchmark (``vllm_cmasd/bench/prompts.json``, never used for training).
    Returns ``(task or kind, prompt ids)`` pairs, grouped by task."""
    work = Path(args.work)
    if args.bench_set == "benchmark":
        tasks = json.loads((REPO_ROOT / "vllm_cmasd/bench/prompts.json").read_text())["tasks"]
        out = []
        for task, plist in tasks.items():
            n = 0
            for p in plist:
                ids = chat_ids(tok, p["prompt"], args.max_prompt_tokens)
                if ids is not None and n < args.bench_per_task:
                    out.append((task, ids))
                    n += 1
        return out
    pj = json.loads((work / "prompts.json").read_text())
    src = {"heldout": pj["eval"], "heldout-chat": pj.get("eval_chat", []),
           "heldout-docs": pj.get("eval_docs", [])}[args.bench_set]
    out = []
    for p in src:  # held-out: never seen in training (split by source item)
        ids = chat_ids(tok, p["prompt"], args.max_prompt_tokens)
        if ids is not None:
            out.append((p["kind"].removeprefix("docs:"), ids))
        if len(out) >= args.bench_prompts:
            break
    return sorted(out, key=lambda item: item[0])


def _timed_generate(llm, prompts, sp, batch1: bool):
    t0 = time.perf_counter()
    n = 0
    if batch1:
        for ids in prompts:
            o = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
            n += len(o.outputs[0].token_ids)
    else:
        for o in llm.generate([{"prompt_token_ids": ids} for ids in prompts], sp, use_tqdm=False):
            n += len(o.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    return n, dt


def stage_bench(args) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_cmasd.draft_model import register
    from vllm_cmasd.engines import llm_kwargs, shutdown, spec_decode_counters

    register()
    tok = AutoTokenizer.from_pretrained(args.target)
    groups: dict[str, list] = {}
    for group, ids in _bench_prompts(args, tok):
        groups.setdefault(group, []).append(ids)
    prompts = [ids for plist in groups.values() for ids in plist]
    sp = SamplingParams(temperature=0.0, max_tokens=args.bench_tokens, ignore_eos=False)
    warm = SamplingParams(temperature=0.0, max_tokens=8)
    draft = args.assemble_to
    common = dict(gpu_memory_utilization=args.gpu_mem, seed=args.seed,
                  max_model_len=args.max_prompt_tokens + args.bench_tokens + 16)
    res = {"card": "CPU (2 cores shared; torch threads as set by vLLM)", "prompts": len(prompts),
           "prompt_set": args.bench_set, "max_tokens": args.bench_tokens, "draft_checkpoint": str(draft)}
    runs = [("target", llm_kwargs(args.target, **common)), ("draft", llm_kwargs(draft, **common)),
            ("spec", llm_kwargs(args.target, draft=draft, num_speculative_tokens=args.bench_k, **common))]
    outs = {}
    for name, kw in runs:
        if args.bench_only and name not in args.bench_only.split(","):
            continue
        llm = LLM(**kw)
        _timed_generate(llm, prompts[:1], warm, True)
        n, dt, by_group = 0, 0.0, {}
        for group, plist in groups.items():
            before = spec_decode_counters(llm) if name == "spec" else None
            gn, gdt = _timed_generate(llm, plist, sp, True)
            n, dt = n + gn, dt + gdt
            by_group[group] = {"prompts": len(plist), "tok_per_s": round(gn / gdt, 2)}
            if name == "spec":
                c = spec_decode_counters(llm)
                d = c["num_drafts"] - before["num_drafts"]
                a = c["num_accepted_tokens"] - before["num_accepted_tokens"]
                by_group[group].update(num_drafts=d, num_accepted_tokens=a,
                                       mean_acceptance_length=round(1 + a / d, 3) if d else None)
        r = {"tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 2),
             "ms_per_token": round(1000 * dt / n, 2), "by_task": by_group}
        if name == "spec":
            d = sum(g["num_drafts"] for g in by_group.values())
            a = sum(g["num_accepted_tokens"] for g in by_group.values())
            r.update(num_drafts=d, num_accepted_tokens=a,
                     mean_acceptance_length=round(1 + a / d, 3) if d else None,
                     accepted_per_position=spec_decode_counters(llm).get("accepted_per_position"))
        outs[name] = r
        log(f"bench: {name}: {r}")
        shutdown(llm)
    res.update(outs)
    if "target" in outs and "draft" in outs:
        res["draft_cost_per_token_vs_target_step"] = round(
            outs["draft"]["ms_per_token"] / outs["target"]["ms_per_token"], 4)
    if "target" in outs and "spec" in outs:
        res["speedup"] = round(outs["spec"]["tok_per_s"] / outs["target"]["tok_per_s"], 3)
        res["speedup_by_task"] = {g: round(outs["spec"]["by_task"][g]["tok_per_s"] / t["tok_per_s"], 3)
                                  for g, t in outs["target"]["by_task"].items()}
    log(f"bench: {json.dumps(res)}")
    out = Path(args.bench_out) if args.bench_out else Path(args.work) / "bench.json"
    out.write_text(json.dumps(res, indent=1))
