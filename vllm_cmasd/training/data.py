"""Stage ``data``: the target answers the prompts of :mod:`vllm_cmasd.training.sources`
greedily with vLLM in batches. vLLM returns the target's top-16 log-probs at every
response position (``logprobs=16``): the cached teacher, so training needs no teacher
forward. ``--prompt-logprobs 1`` also caches them on prompt positions (+25% generation
time; off by default, prompt tokens then only serve as context).

* Stdlib / licence prompts: the held-out set, then training prompts until
  ``--gen-minutes`` (0: held-out only).
* Chat domain (``--chat 1``, default): answered like the stdlib prompts (<=
  ``--chat-max-new-tokens``, ``--chat-gen-minutes``; held-out ``eval_chat`` first).
* Benchmark domain (``--docs-gen-minutes``, default 32; 0: off): held-out ``eval_docs``
  first, then training prompts asked in the ratio ``--docs-mix``, answered greedily, <=
  ``--docs-max-new-tokens``; a training prompt on a document of the benchmark or of the
  held-out set, or sharing a paragraph with one, is never asked (:func:`unseen_filter`).

``--reuse-data DIR`` starts from every record of an earlier work dir (train and
held-out), drops its training records that today's :func:`unseen_filter` rejects, and
asks only new prompts. Writes ``data.pt``, ``prompts.json`` and ``chat_prompts.json`` to
``--work``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from vllm_cmasd.bench.prompts import benchmark_origins, benchmark_paragraphs, origin_key, shares_paragraph
from vllm_cmasd.training.common import TOPK, chat_ids, log, stable_hash, teacher_record
from vllm_cmasd.training.sources import build_prompts, docs_prompts, magpie_prompts, task_prompts


def unseen_filter(heldout: list[dict]):
    """``unseen(sid, prompt)``: False for a benchmark-domain training prompt on a
    document of the benchmark or of the ``heldout`` prompts, or sharing a paragraph
    with one. Paragraphs catch what document names miss: files that several packages
    ship, man pages installed under several names (xz.1 / lzcat.1), the paragraphs that
    near-duplicate pages (gcloud alpha / beta) have in common."""

    def body(prompt: str) -> str:  # the passage after the template's instruction
        return prompt.split("\n\n", 1)[-1]

    def origin(sid: str) -> str:
        return origin_key(sid.removeprefix("docs:"))

    origins = benchmark_origins() | {origin(q["sid"]) for q in heldout}
    paragraphs = benchmark_paragraphs() | {part for q in heldout for part in body(q["prompt"]).split("\n\n")}
    return lambda sid, prompt: origin(sid) not in origins and not shares_paragraph(body(prompt), paragraphs)


def docs_prompt_split(args, reused_heldout: list[dict], answered: set[str]) -> tuple[list[dict], list[dict]]:
    """The benchmark-domain prompts to ask: (train, new held-out). The train prompts
    pass :func:`unseen_filter` against the benchmark, ``reused_heldout`` and the new
    held-out set, and leave out ``answered``; a reused held-out set is kept as it is
    (no new one), so versions are compared on the same text."""
    mix = {task: int(n) for task, n in (item.split("=") for item in args.docs_mix.split(","))}
    docs_tr, docs_ev = docs_prompts(args.seed, mix=mix)
    docs_ev = [] if reused_heldout else docs_ev[: args.n_eval_docs]
    unseen = unseen_filter(reused_heldout + docs_ev)
    docs_tr = [q for q in docs_tr if q["prompt"] not in answered and unseen(q["sid"], q["prompt"])]
    log(f"data: benchmark domain: {len(docs_tr)} new train / {len(docs_ev)} new held-out prompts (mix {mix})")
    return docs_tr, docs_ev


def _pack_logprobs(lp_list, n):
    """list (len n) of dict{token_id: Logprob} -> (ids int32 [n,K], lps fp16 [n,K])."""
    import torch

    ids = torch.full((n, TOPK), -1, dtype=torch.int32)
    lps = torch.full((n, TOPK), -1e4, dtype=torch.float32)
    for i, d in enumerate(lp_list):
        if not d:
            continue
        # the highest TOPK: vLLM adds the sampled token on top of the top-k
        items = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:TOPK]
        for j, (t, lp) in enumerate(items):
            ids[i, j] = t
            lps[i, j] = lp.logprob
    return ids, lps


def _answer(llm, tok, sp, plist, split, records, args, stop_at=None, label="", max_prompt_tokens=None):
    """Target answers ``plist`` greedily; appends teacher records to ``records[split]``."""
    t0 = time.time()
    n_tok = 0
    chunk = args.gen_chunk
    for c0 in range(0, len(plist), chunk):
        if stop_at and time.time() > stop_at:
            log(f"data: {label} time budget reached, stopping at {c0}/{len(plist)} {split} prompts")
            break
        batch = []
        for p in plist[c0: c0 + chunk]:
            ids = chat_ids(tok, p["prompt"], max_prompt_tokens or args.max_prompt_tokens)
            if ids is not None:
                batch.append((p, ids))
        if not batch:
            continue
        outs = llm.generate([{"prompt_token_ids": ids} for _, ids in batch], sp, use_tqdm=False)
        for (p, ids), o in zip(batch, outs):
            c = o.outputs[0]
            resp = list(c.token_ids)
            # teacher distribution for predicting token t+1 at position t:
            # prompt_logprobs[i] is for token i (given <i); [0] is None.
            plp = (o.prompt_logprobs[1:] if args.prompt_logprobs
                   else [None] * (len(ids) - 1))  # predicting prompt tokens 1..P-1
            glp = list(c.logprobs)  # predicting response tokens 0..R-1
            seq = ids + resp
            lp_list = list(plp) + glp  # position t predicts seq[t+1]
            n = len(lp_list)
            tids, tlps = _pack_logprobs(lp_list, n)
            records[split].append(teacher_record(p, seq, len(ids), tids, tlps, finished=c.finish_reason == "stop"))
            n_tok += len(seq)
        el = time.time() - t0
        log(f"data: {label} {split} {min(c0 + chunk, len(plist))}/{len(plist)} prompts, "
            f"{n_tok} tokens, {el:.0f}s ({n_tok / el:.0f} tok/s incl. prompts)")


def _split_chat(prompts, eval_frac=0.1):
    tr, ev = [], []
    for p in prompts:
        (ev if (stable_hash(p["sid"]) % 1000) < eval_frac * 1000 else tr).append(p)
    return tr, ev


def stage_data(args) -> None:
    """Writes the records of every source to ``data.pt`` (``train``: all sources;
    held-out ``eval``: stdlib / licence, ``eval_chat``, ``eval_docs``) and the prompts
    asked to ``prompts.json``; the Magpie turns are cached in ``chat_prompts.json``.
    With ``--reuse-data`` the stdlib / licence prompts are not built again: the reused
    records (train and held-out, kept as they are) stand for them."""
    import torch
    from transformers import AutoTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = work / "data.pt"
    if out_path.exists():
        log(f"data: {out_path} exists, skipping")
        return
    tok = AutoTokenizer.from_pretrained(args.target)
    records = {"train": [], "eval": [], "eval_chat": [], "eval_docs": []}
    pj = {"train": [], "eval": [], "eval_chat": [], "train_chat": [], "eval_docs": [], "train_docs": []}
    reuse = Path(args.reuse_data) if args.reuse_data else None
    answered = set()  # prompts the reused records already answer (not asked again)
    if reuse:
        old = torch.load(reuse / "data.pt", weights_only=False)
        opj = json.loads((reuse / "prompts.json").read_text())
        for key in records:
            records[key] = list(old.get(key, []))
        for key in pj:
            pj[key] = opj.get(key, [])
        # Re-check reused training records against today's rules (they have grown
        # stricter: see unseen_filter).
        unseen = unseen_filter(pj["eval_docs"])
        prompt_of = {q["sid"]: q["prompt"] for qs in pj.values() for q in qs}
        kept = [r for r in records["train"] if not r["sid"].startswith("docs:") or unseen(r["sid"], prompt_of[r["sid"]])]
        if len(kept) < len(records["train"]):
            log(f"data: dropping {len(records['train']) - len(kept)} reused train records on benchmark or held-out text")
            records["train"] = kept
        done = {r["sid"] for rs in records.values() for r in rs}
        answered = {q["prompt"] for qs in pj.values() for q in qs if q["sid"] in done}
        log(f"data: reusing the records of {reuse}: " + ", ".join(f"{k} {len(v)}" for k, v in records.items()))
        train_p, eval_p = [], []
    else:
        train_p, eval_p = build_prompts(args.seed, args.n_train, args.n_eval)
        pj["train"], pj["eval"] = train_p, eval_p
        log(f"data: {len(train_p)} train prompts, {len(eval_p)} held-out prompts")

    # The engine in this process: on vLLM's CPU build an engine process of its own
    # reserves a core for this one, which then idles (half the throughput on 2 cores).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_cmasd.engines import llm_kwargs

    llm = LLM(**llm_kwargs(args.target, gpu_memory_utilization=args.gpu_mem, seed=args.seed,
                           max_model_len=args.max_prompt_tokens + args.max_new_tokens + 8,
                           max_num_seqs=args.gen_batch, disable_log_stats=True))
    t0 = time.time()
    if not reuse:
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens,
                            logprobs=TOPK, prompt_logprobs=TOPK if args.prompt_logprobs else None)
        _answer(llm, tok, sp, eval_p, "eval", records, args, label="stdlib")
        if args.gen_minutes > 0:  # 0: held-out only (its agreement is still reported)
            stop_at = time.time() + args.gen_minutes * 60
            _answer(llm, tok, sp, train_p, "train", records, args, stop_at=stop_at, label="stdlib")
    if args.chat:
        cp = work / "chat_prompts.json"
        if cp.exists():
            mag = json.loads(cp.read_text())["magpie"]
        else:
            mag, mstats = magpie_prompts(llm, tok, args)
            cp.write_text(json.dumps({"magpie": mag, "stats": mstats}, indent=0))
        tasks = task_prompts(args.seed)
        m_tr, m_ev = _split_chat(mag)
        t_tr, t_ev = _split_chat(tasks)
        rng = random.Random(args.seed + 11)
        rng.shuffle(m_ev)
        rng.shuffle(t_ev)
        n_t = min(len(t_ev), args.n_eval_chat // 4)
        chat_ev = m_ev[: args.n_eval_chat - n_t] + t_ev[:n_t]
        chat_tr = m_tr + t_tr
        rng.shuffle(chat_tr)
        log(f"data: chat: {len(mag)} magpie prompts ({len(m_tr)} train / {len(m_ev)} held-out), "
            f"{len(tasks)} task prompts ({len(t_tr)} / {len(t_ev)}); answering {len(chat_ev)} held-out, "
            f"then train for <= {args.chat_gen_minutes} min")
        pj["eval_chat"], pj["train_chat"] = chat_ev, chat_tr
        csp = SamplingParams(temperature=0.0, max_tokens=args.chat_max_new_tokens, logprobs=TOPK,
                             prompt_logprobs=TOPK if args.prompt_logprobs else None)
        stop_at = time.time() + args.chat_gen_minutes * 60
        _answer(llm, tok, csp, chat_ev, "eval_chat", records, args, label="chat")
        _answer(llm, tok, csp, chat_tr, "train", records, args, stop_at=stop_at, label="chat")
    if args.docs_gen_minutes > 0:
        docs_tr, docs_ev = docs_prompt_split(args, reused_heldout=pj["eval_docs"], answered=answered)
        log(f"data: answering the held-out, then train for <= {args.docs_gen_minutes} min")
        pj["eval_docs"] = pj["eval_docs"] + docs_ev
        pj["train_docs"] = pj["train_docs"] + docs_tr
        dsp = SamplingParams(temperature=0.0, max_tokens=args.docs_max_new_tokens, logprobs=TOPK)
        stop_at = time.time() + args.docs_gen_minutes * 60
        _answer(llm, tok, dsp, docs_ev, "eval_docs", records, args, label="docs")
        _answer(llm, tok, dsp, docs_tr, "train", records, args, stop_at=stop_at, label="docs")
    (work / "prompts.json").write_text(json.dumps(pj, indent=0))
    torch.save(records, out_path.with_suffix(".tmp"))
    os.replace(out_path.with_suffix(".tmp"), out_path)
    log(f"data: wrote {out_path} in {time.time() - t0:.0f}s: " +
        ", ".join(f"{k} {len(v)} seqs" for k, v in records.items()))
    try:
        from vllm_cmasd.engines import shutdown  # type: ignore
        shutdown(llm)
    except Exception:
        pass
