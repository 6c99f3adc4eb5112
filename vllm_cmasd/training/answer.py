"""Stages ``prompts`` and ``answer``: the ``data`` stage split in two, for a training
round on a machine with an accelerator but without vLLM or the offline text (the GPU
machine this workplace lends now and then).

``prompts`` (here, where the text is): the benchmark-domain prompts the ``data`` stage
would ask, with the same leakage guards (:func:`~.data.docs_prompt_split`: held-out docs
first, every training prompt on a benchmark or held-out document or sharing a paragraph
with one left out), each as its chat-template token ids -> ``prompts.json``.

``answer`` (there): the target answers them with transformers on ``--device``, the
held-out greedily first, then the training prompts once per ``--answer-temperatures``
(default ``0``: greedy; ``0,1`` adds a sampled answer of each, new response text for
the same prompts when the pool runs out before the compute does) until
``--docs-gen-minutes``, <= ``--docs-max-new-tokens`` each -> ``data.pt`` in the ``data``
stage's record format, teacher top-16 (the target's raw distribution) included, so
every later stage reads it unchanged. Greedy decoding here is transformers' fp32 (TF32)
argmax, not vLLM's: a near-tie can resolve the other way, which only changes which text
a record holds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vllm_cmasd.training.common import TOPK, chat_ids, log, teacher_record


def stage_prompts(args) -> None:
    from transformers import AutoTokenizer

    from vllm_cmasd.training.data import docs_prompt_split

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.target)
    docs_tr, docs_ev = docs_prompt_split(args, reused_heldout=[], answered=set())
    out = {}
    for split, prompts in (("eval_docs", docs_ev), ("train_docs", docs_tr)):
        out[split] = []
        for q in prompts:
            ids = chat_ids(tok, q["prompt"], args.max_prompt_tokens)
            if ids is not None:
                out[split].append(dict(q, ids=ids))
    (work / "prompts.json").write_text(json.dumps(out))
    log(f"prompts: wrote {work / 'prompts.json'}: " + ", ".join(f"{k} {len(v)}" for k, v in out.items()))


def _answer_batch(model, prompts, args, eos_ids: set[int], temperature: float) -> list[dict]:
    """Answers of one batch (left-padded; greedy at temperature 0): a record per prompt."""
    import torch

    # Pure temperature sampling (transformers would add its default top-k of 50).
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    L = max(len(q["ids"]) for q in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, q in enumerate(prompts):
        ids[b, L - len(q["ids"]):] = torch.tensor(q["ids"])
        mask[b, L - len(q["ids"]):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                             max_new_tokens=args.docs_max_new_tokens, pad_token_id=0, **sampling,
                             output_logits=True, return_dict_in_generate=True)
        top = [torch.log_softmax(step.float(), dim=-1).topk(TOPK, dim=-1) for step in out.logits]
        top_lps = torch.stack([t.values for t in top], 1).cpu()  # [B, T, K]
        top_ids = torch.stack([t.indices for t in top], 1).cpu()
    resp_all = out.sequences[:, L:].cpu().tolist()
    records = []
    for b, q in enumerate(prompts):
        resp = resp_all[b]
        stop = next((i for i, t in enumerate(resp) if t in eos_ids), None)
        resp = resp if stop is None else resp[: stop + 1]  # the stop token is part of the answer, as in vLLM
        n_prompt, n = len(q["ids"]), len(q["ids"]) + len(resp) - 1  # position t predicts token t + 1
        t_ids = torch.full((n, TOPK), -1, dtype=torch.int32)
        t_lps = torch.full((n, TOPK), -1e4, dtype=torch.float32)
        t_ids[n_prompt - 1:] = top_ids[b, : len(resp)].int()
        t_lps[n_prompt - 1:] = top_lps[b, : len(resp)]
        records.append(teacher_record(q, q["ids"] + resp, n_prompt, t_ids, t_lps, finished=stop is not None))
    return records


def _answer_all(model, prompts, args, eos_ids, temperature=0.0, stop_at=None, label="") -> list[dict]:
    """Answers ``prompts`` in batches of ``--gen-batch`` (each chunk sorted by length, so
    little padding), until ``stop_at``."""
    t0, records, n_tok = time.time(), [], 0
    chunk = args.gen_batch * 8
    for c0 in range(0, len(prompts), chunk):
        part = sorted(prompts[c0: c0 + chunk], key=lambda q: len(q["ids"]))
        for b0 in range(0, len(part), args.gen_batch):
            if stop_at and time.time() > stop_at:
                log(f"answer: {label} time budget reached at {len(records)}/{len(prompts)} prompts")
                return records
            batch = _answer_batch(model, part[b0: b0 + args.gen_batch], args, eos_ids, temperature)
            records += batch
            n_tok += sum(len(r["ids"]) for r in batch)
        log(f"answer: {label} {len(records)}/{len(prompts)} prompts, {n_tok} tokens, {time.time() - t0:.0f}s")
    return records


def stage_answer(args) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    work = Path(args.work)
    out_path = work / "data.pt"
    if out_path.exists():
        log(f"answer: {out_path} exists, skipping")
        return
    prompts = json.loads((work / "prompts.json").read_text())
    torch.set_float32_matmul_precision("high")
    model = LlamaForCausalLM.from_pretrained(args.target, dtype=torch.float32).to(args.device).eval()
    eos = GenerationConfig.from_pretrained(args.target).eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    held = _answer_all(model, prompts["eval_docs"], args, eos_ids, label="held-out docs")
    stop_at, train = time.time() + args.docs_gen_minutes * 60, []
    for temperature in (float(t) for t in args.answer_temperatures.split(",")):
        train += _answer_all(model, prompts["train_docs"], args, eos_ids, temperature=temperature, stop_at=stop_at,
                             label=f"train docs at temperature {temperature:g}")
    records = {"train": train, "eval": [], "eval_chat": [], "eval_docs": held}
    torch.save(records, out_path.with_suffix(".tmp"))
    os.replace(out_path.with_suffix(".tmp"), out_path)
    log(f"answer: wrote {out_path}: " + ", ".join(f"{k} {len(v)} seqs" for k, v in records.items()))
