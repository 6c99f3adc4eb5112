"""Stage ``train``: draft = target's input embedding (frozen, shared, not shipped) + first
``--layers`` decoder layers + final norm + a reduced-vocabulary LM head over the
``--keep-vocab`` most frequent target tokens of the training data (rows initialised from
the tied embedding). Loss: KL(target || draft) on the cached top-16 teacher probabilities
(renormalised over kept tokens). AdamW, warmup + cosine decay over ``--steps`` or
``--max-minutes`` (whichever ends first), length-bucketed batches of ``--batch-tokens``
tokens in a seeded order, ``torch.set_num_threads(--threads)``; checkpoints every
``--ckpt-every`` steps (``ckpt.pt``, resumed automatically; best held-out in
``best.pt``), tqdm shows loss and top-1 agreement; at the end prints teacher-forced top-1
agreement with the target on the held-out split, separately for the stdlib/licence, the
chat-domain and the benchmark-domain held-out sets (the best-checkpoint criterion is the
benchmark domain's when the data has one, else their mean), and the kept vocabulary's
coverage of their response tokens (-> ``final_eval.json``). ``--init-from CKPT``
warm-starts from an earlier run (a checkpoint or a shipped ``drafts/<name>/``; body as
trained; head rows of tokens that were kept before are copied by token id, rows of newly
kept tokens start from the embedding).

The draft here is pure torch (transformers' ``LlamaModel`` + a ``Linear`` head), for
training; vLLM runs the exported weights with :mod:`vllm_cmasd.draft_model`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

from vllm_cmasd.training.common import TOPK, domain, load_target_state, log


def build_draft(target_dir, n_layers: int, kept_ids):
    """transformers LlamaModel with the first n_layers of the target + small head."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig.from_pretrained(target_dir)
    cfg.num_hidden_layers = n_layers
    cfg.use_cache = False
    sd = load_target_state(target_dir)
    body = LlamaModel(cfg)
    mine = {}
    for k, v in sd.items():
        k2 = k[len("model."):] if k.startswith("model.") else k
        if k2.startswith("layers."):
            li = int(k2.split(".")[1])
            if li >= n_layers:
                continue
        if k2.startswith("lm_head"):
            continue
        mine[k2] = v
    missing, unexpected = body.load_state_dict(mine, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    body.embed_tokens.weight.requires_grad_(False)
    kept = torch.as_tensor(kept_ids, dtype=torch.long)
    head = torch.nn.Linear(cfg.hidden_size, len(kept), bias=False)
    with torch.no_grad():
        head.weight.copy_(body.embed_tokens.weight[kept])
    return cfg, body, head, kept


def choose_kept_vocab(records, tok, keep: int):
    """Most frequent target tokens in the training data (text + teacher top-1), plus all
    special tokens. Returned sorted by id."""
    import torch

    cnt = torch.zeros(len(tok), dtype=torch.float64)
    for r in records:
        n_p = r["n_prompt"]
        ids = r["ids"].long()
        w = torch.ones(len(ids), dtype=torch.float64)
        w[n_p:] = 3.0  # response tokens count more: they are what the draft must predict
        cnt.index_add_(0, ids, w)
        top1 = r["t_ids"][:, 0].long()
        ok = top1 >= 0
        cnt.index_add_(0, top1[ok], torch.full((int(ok.sum()),), 1.0, dtype=torch.float64))
    # slots left after every seen token (small data sets) go to the lowest ids: in a BPE
    # vocabulary lower ids are earlier merges, i.e. more frequent pieces. (The shipped
    # smollm2 draft predates this tie-break: its 1927 spare slots hold arbitrary ids.)
    cnt += 1e-3 * (1.0 - torch.arange(len(cnt), dtype=torch.float64) / len(cnt))
    special = set(tok.all_special_ids) | {0, 1, 2}
    for s in special:
        cnt[s] += 1e12
    kept = torch.topk(cnt, keep).indices.sort().values
    return kept


def _make_batches(records, max_tokens: int, rng: random.Random, max_len: int):
    """Length-bucketed batches of record indices (padded tokens <= max_tokens)."""
    order = sorted(range(len(records)), key=lambda i: (min(len(records[i]["ids"]), max_len), rng.random()))
    batches, cur, cur_max = [], [], 0
    for i in order:
        L = min(len(records[i]["ids"]), max_len)
        if cur and max(cur_max, L) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, L)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _collate(records, idxs, t2k, max_len, prompt_weight):
    import torch

    L = max(min(len(records[i]["ids"]), max_len) for i in idxs)
    B = len(idxs)
    inp = torch.zeros(B, L, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    tk = torch.full((B, L, TOPK), -1, dtype=torch.long)  # teacher ids in kept index space
    tl = torch.full((B, L, TOPK), -1e4, dtype=torch.float32)
    top1 = torch.full((B, L), -1, dtype=torch.long)  # teacher top-1 target id
    w = torch.zeros(B, L)
    is_resp = torch.zeros(B, L, dtype=torch.bool)
    for b, i in enumerate(idxs):
        r = records[i]
        n = min(len(r["ids"]), L)
        inp[b, :n] = r["ids"][:n].long()
        att[b, :n] = 1
        m = min(n, r["t_ids"].shape[0])  # positions with a teacher (all but last token)
        ids = r["t_ids"][:m].long()
        k = torch.where(ids >= 0, t2k[ids.clamp(min=0)], torch.full_like(ids, -1))
        tk[b, :m] = k
        tl[b, :m] = r["t_lps"][:m].float()
        top1[b, :m] = ids[:, 0]
        ww = torch.full((m,), prompt_weight)
        resp_from = r["n_prompt"] - 1  # position n_prompt-1 predicts the first response token
        ww[resp_from:] = 1.0
        w[b, :m] = ww
        is_resp[b, resp_from:m] = True
    return inp, att, tk, tl, top1, w, is_resp


def _loss_and_stats(body, head, kept, batch):
    import torch

    inp, att, tk, tl, top1, w, is_resp = batch
    hs = body(input_ids=inp, attention_mask=att).last_hidden_state
    # only positions with a teacher distribution go through the head (prompt positions
    # without cached teacher log-probs still shape the context through attention)
    sel = (tk >= 0).any(-1) & (w > 0) & (top1 >= 0)
    hs, tk, tl, top1, w, is_resp = hs[sel], tk[sel], tl[sel], top1[sel], w[sel], is_resp[sel]
    logits = head(hs)  # [N, Vk]
    logq = torch.log_softmax(logits.float(), dim=-1)
    valid = tk >= 0
    p = torch.where(valid, tl, torch.full_like(tl, -1e4))
    p = torch.softmax(p, dim=-1) * valid  # teacher top-k renormalised over kept tokens
    lq = torch.gather(logq, -1, tk.clamp(min=0))
    ce = -(p * lq).sum(-1)  # cross-entropy; + H(p) = KL(p || q)
    ent = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)
    kl = ce - ent
    loss = (kl * w).sum() / w.sum().clamp(min=1e-6)
    with torch.no_grad():
        pred = kept[logits.argmax(-1)]
        agree = pred == top1
        stats = {
            "agree_resp": int((agree & is_resp).sum()), "n_resp": int(is_resp.sum()),
            "agree_all": int(agree.sum()), "n_all": int(agree.numel()),
            "kl_sum": float((kl * w).sum()), "w_sum": float(w.sum()),
        }
    return loss, stats


def evaluate(body, head, kept, records, t2k, max_len, max_tokens=4096):
    import torch

    body.eval()
    tot = {"agree_resp": 0, "n_resp": 0, "agree_all": 0, "n_all": 0, "kl_sum": 0.0, "w_sum": 0.0}
    rng = random.Random(0)
    with torch.no_grad():
        for idxs in _make_batches(records, max_tokens, rng, max_len):
            batch = _collate(records, idxs, t2k, max_len, 1.0)
            _, st = _loss_and_stats(body, head, kept, batch)
            for k in tot:
                tot[k] += st[k]
    body.train()
    return {
        "top1_agreement_response": tot["agree_resp"] / max(1, tot["n_resp"]),
        "top1_agreement_all": tot["agree_all"] / max(1, tot["n_all"]),
        "kl": tot["kl_sum"] / max(1e-9, tot["w_sum"]),
        "n_response_tokens": tot["n_resp"], "n_tokens": tot["n_all"],
    }


def _load_init(path):
    """A warm start: a train checkpoint (``ckpt.pt`` / ``best.pt``), or a shipped draft
    directory (``drafts/<name>/``: its ``draft.safetensors`` and ``draft.json``)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False)
    tensors = load_file(str(path / "draft.safetensors"))
    record = json.loads((path / "draft.json").read_text())
    body = {k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    return {"body": body, "head": {"weight": tensors["lm_head.weight"].float()},
            "kept": tensors["kept_token_ids"], "layers": record["layers"],
            "step": record["steps"], "t_used": 60 * record["train_minutes"]}


def stage_train(args) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    data = torch.load(work / "data.pt", weights_only=False)
    tok = AutoTokenizer.from_pretrained(args.target)
    recs = data["train"]
    # held-out sets by domain: stdlib/licence, chat, benchmark domain ("docs")
    held = {d: data.get(key, []) for d, key in (("stdlib", "eval"), ("chat", "eval_chat"), ("docs", "eval_docs"))}
    held = {d: rs for d, rs in held.items() if rs}
    kept_path = work / "kept_ids.pt"
    if kept_path.exists():
        kept = torch.load(kept_path)
    else:
        kept = choose_kept_vocab(recs, tok, args.keep_vocab)
        torch.save(kept, kept_path)
    t2k = torch.full((len(tok) if len(tok) > 49152 else 49152,), -1, dtype=torch.long)
    t2k[kept] = torch.arange(len(kept))
    cfg, body, head, kept = build_draft(args.target, args.layers, kept)
    params = [p for p in body.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def coverage(rs):
        n = sum(len(r["ids"]) - r["n_prompt"] for r in rs)
        return float(sum((t2k[r["ids"][r["n_prompt"]:].long()] >= 0).sum() for r in rs)) / max(1, n)

    n_tr_tok = sum(len(r["ids"]) for r in recs)
    n_resp = sum(len(r["ids"]) - r["n_prompt"] for r in recs)
    by_domain = Counter(domain(r["kind"]) for r in recs)
    log(f"train: {len(recs)} seqs ({by_domain['chat']} chat-domain, {by_domain['docs']} benchmark-domain), {n_tr_tok} tokens "
        f"({n_resp} response), kept vocab {len(kept)} covers {coverage(recs):.4f} of train response tokens, "
        "held-out: " + ", ".join(f"{d} {coverage(rs):.4f}" for d, rs in held.items()) + f"; {args.layers} layers")
    step, t_used = 0, 0.0
    ck = work / "ckpt.pt"
    hist = []
    best = {}
    if not ck.exists() and args.init_from:
        # warm start: body as trained; head rows of tokens kept before copied by token id,
        # rows of newly kept tokens stay initialised from the tied embedding
        st = _load_init(args.init_from)
        assert st["layers"] == args.layers, (st["layers"], args.layers)
        missing, unexpected = body.load_state_dict(st["body"], strict=False)
        assert not unexpected and all(k.startswith("embed_tokens") for k in missing), (missing, unexpected)
        old_kept = st["kept"].long()
        old_row = {int(t): i for i, t in enumerate(old_kept)}
        rows = [(i, old_row[int(t)]) for i, t in enumerate(kept) if int(t) in old_row]
        with torch.no_grad():
            if rows:
                new_i, old_i = map(torch.tensor, zip(*rows))
                head.weight[new_i] = st["head"]["weight"][old_i].to(head.weight.dtype)
        log(f"train: warm start from {args.init_from} (step {st['step']}): body loaded, "
            f"{len(rows)}/{len(kept)} head rows from its head, {len(kept) - len(rows)} from the embedding")
        hist.append({"step": 0, "init_from": str(args.init_from), "init_steps": st["step"],
                     "init_minutes": round(st["t_used"] / 60, 1), "head_rows_reused": len(rows)})
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        body.load_state_dict(st["body"])
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, t_used, hist = st["step"], st["t_used"], st.get("hist", [])
        best.update(st.get("best", {}))
        log(f"train: resumed from step {step} ({t_used / 60:.1f} min used)")

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        prog = (s - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes:  # deadline-aware: decay over whichever budget runs out first
            prog = max(prog, t_used / (args.max_minutes * 60))
        prog = min(1.0, prog)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    def save(path=ck):
        tmp = path.with_suffix(".tmp")
        torch.save({"body": body.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "t_used": t_used, "hist": hist, "kept": kept,
                    "layers": args.layers, "best": dict(best)}, tmp)
        os.replace(tmp, path)

    def eval_all(subset=None):
        """Held-out agreement per domain. The headline number (best-checkpoint criterion)
        is the benchmark domain's when the data has one (it is what the draft is for),
        else the mean over the domains."""
        out = {d: evaluate(body, head, kept, rs[:subset], t2k, args.max_len) for d, rs in held.items()}
        domains = ["docs"] if "docs" in out else list(held)
        for k in ("top1_agreement_response", "kl"):
            out[k] = sum(out[d][k] for d in domains) / len(domains)
        return out

    # deterministic batch order: epoch e uses Random(seed + e); resume skips done steps
    sched = []
    e = 0
    while len(sched) < args.steps:
        sched.extend(_make_batches(recs, args.batch_tokens, random.Random(args.seed + e), args.max_len))
        e += 1
    body.train()
    pbar = tqdm(total=args.steps, initial=step, desc="distill", dynamic_ncols=True, mininterval=5)
    ema_loss, ema_agree = None, None
    t_start = time.time() - t_used
    while step < args.steps:
        idxs = sched[step]
        batch = _collate(recs, idxs, t2k, args.max_len, args.prompt_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, st = _loss_and_stats(body, head, kept, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        a = st["agree_resp"] / max(1, st["n_resp"])
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_agree = a if ema_agree is None else 0.95 * ema_agree + 0.05 * a
        pbar.set_postfix(loss=f"{ema_loss:.3f}", agree=f"{ema_agree:.3f}", lr=f"{lr_at(step):.1e}")
        pbar.update(1)
        t_used = time.time() - t_start
        if step % args.ckpt_every == 0 or step == args.steps:
            hist.append({"step": step, "min": round(t_used / 60, 2), "loss": round(ema_loss, 4),
                         "agree_resp_train_ema": round(ema_agree, 4)})
            if args.eval_every and step % args.eval_every == 0:
                r = eval_all(args.eval_subset)
                hist[-1]["heldout"] = r
                if r["top1_agreement_response"] >= best.get("top1_agreement_response", -1):
                    best.clear()
                    best.update(r, step=step)
                    save(work / "best.pt")
                log(f"train: step {step} held-out top-1 agreement (response) "
                    f"{r['top1_agreement_response']:.4f} ("
                    + ", ".join(f"{d} {r[d]['top1_agreement_response']:.4f}" for d in held)
                    + f") kl {r['kl']:.3f}")
            save()
        if args.max_minutes and t_used > args.max_minutes * 60:
            log(f"train: --max-minutes reached at step {step}")
            save()
            break
    pbar.close()
    save()
    r = eval_all()
    for d, rs in held.items():
        x = r[d]
        log(f"train: FINAL held-out ({d}) teacher-forced top-1 agreement with the target: "
            f"response tokens {x['top1_agreement_response']:.4f} ({x['n_response_tokens']} tokens), "
            f"KL {x['kl']:.4f}, kept-vocab coverage {coverage(rs):.4f}")
    r["kept_vocab_coverage"] = {"train": coverage(recs), **{d: coverage(rs) for d, rs in held.items()}}
    by_task: dict[str, list] = {}  # benchmark-domain held-out agreement per task: where the draft is weak
    for rec in held.get("docs", []):
        by_task.setdefault(rec["kind"].removeprefix("docs:"), []).append(rec)
    r["docs_by_task"] = {t: evaluate(body, head, kept, rs, t2k, args.max_len) for t, rs in sorted(by_task.items())}
    if by_task:
        log("train: FINAL held-out (docs) agreement by task: " + ", ".join(
            f"{t} {x['top1_agreement_response']:.4f} ({x['n_response_tokens']} tokens)" for t, x in r["docs_by_task"].items()))
    (work / "final_eval.json").write_text(json.dumps({"step": step, "minutes": t_used / 60, **r}, indent=1))
