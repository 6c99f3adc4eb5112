"""Stages ``eagle-train``, ``eagle-export``, ``eagle-assemble`` and ``eagle-eval``: an EAGLE-3 head for
the target, trained on the ``data`` stage's records (the same self-distillation data and
leakage guards as the draft), in the layout vLLM's own ``eagle3`` method loads.

The head (:class:`Eagle3Head`, pure torch, mirroring vLLM's ``LlamaForCausalLMEagle3``
layer by layer): ``fc`` maps the target's residual streams entering layers
``aux_layer_ids`` (concatenated) to one hidden state; one decoder layer takes
``[input_layernorm(embedding of the next token) ; hidden_norm(fc output)]`` with the fc
output as residual; the final norm's output goes through a reduced-vocabulary LM head
(the shipped draft's ``kept_token_ids``), its input (pre-norm) is the hidden state of
the next drafting step.

One RMSNorm per aux state comes before ``fc`` (vLLM's ``fc_norm``), its weights
started from the aux states' per-dimension scale (:func:`whiten_fc_norm`).

``eagle-train``: the target runs teacher-forced on each batch (no grad, transformers)
and gives the aux states and the teacher: its distribution over the kept tokens at
every position (renormalised there), prompt positions weighted ``--prompt-weight``.
EAGLE-3's training-time test: ``--ttt-steps`` unrolled steps per anchor position t.
Step 0 is vLLM's first pass (token t+1 with the target's features at t, position t);
step j feeds token t+1+j with the head's own pre-norm state of step j-1 at position
t+j and attends to step 0's keys at positions <= t plus this anchor's keys of steps
1..j, exactly the drafter KV vLLM holds at draft step j. The loss of step j is
KL(teacher || head) at position t+1+j, weighted ``0.8 ** j``. Held-out metric: the
acceptance length greedy drafting of ``--bench-k`` tokens would get on the response
positions of the held-out benchmark-domain records (the tokens there are the target's
greedy ones, so chaining the head's argmax is the exact greedy simulation); the best
checkpoint by it is ``eagle_best.pt``. ``--compute-dtype bfloat16`` runs the teacher's
and the head's forward in bf16 (:func:`compute_context`). AdamW, warmup + cosine decay over
``--max-minutes``, resumable (``eagle_ckpt.pt``), ``--init-from`` warm-starts from an
earlier checkpoint or a shipped head.

``eagle-export``: ``model.safetensors`` (bf16, vLLM's key names, ``d2t`` offsets, no
embedding: vLLM shares the target's), ``config.json`` and ``head.json`` (the record)
-> ``--eagle-out`` (``drafts/smollm2-135m-eagle3``). ``eagle-assemble``:
:func:`assemble_eagle3_head` -> ``--eagle-assemble-to`` (the shipped files plus the
target's tokenizer; ``scripts/prepare_models.py`` calls it on setup). ``eagle-eval``:
the held-out metric of the head ``--init-from`` names (a checkpoint or a shipped head
directory) on ``--work``'s held-out docs records, so heads compare on the same records.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from vllm_cmasd.training.common import REPO_ROOT, TOKENIZER_FILES, log

STEP_WEIGHT = 0.8  # loss weight of TTT step j: STEP_WEIGHT ** j
KEPT_FROM = REPO_ROOT / "drafts/smollm2-135m-draft-rv/draft.safetensors"  # the draft's kept vocabulary


def aux_layer_ids(num_layers: int) -> tuple[int, ...]:
    """The target layers whose input residual streams the head reads: vLLM's default
    ``(2, N // 2, N - 3)`` ((2, 15, 27) for SmolLM2's 30 layers), or ``(1, N // 2, N - 1)``
    where that default repeats an id (small targets); written into the head's config
    either way. Id L is the residual stream entering layer L (transformers'
    ``hidden_states[L]``)."""
    ids = (2, num_layers // 2, num_layers - 3)
    return ids if len(set(ids)) == 3 else (1, num_layers // 2, num_layers - 1)


def _torch():
    import torch

    return torch


def compute_context(args):
    """Where the teacher's and the head's forward run: ``--compute-dtype bfloat16``
    autocasts their matmuls to bf16 (the weights, AdamW's state and the loss stay
    fp32). On a CPU with AMX (the 2-core Intel Xeon kind) a 3,072-token step took
    6 s against 11.6 s (the teacher 1.0 s against 3.1-3.7 s); GPUs gain likewise."""
    import contextlib

    torch = _torch()
    if args.compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)


def ttt_attention(q, k0, v0, diag_k, diag_v, n_rep: int):
    """Attention of step j's queries ``q`` [B, nh, L, d] over step 0's keys at
    positions <= the query's anchor (causal) and the same anchor's keys of steps
    1..j (``diag_k`` / ``diag_v``: lists of [B, nkv, L, d]), one softmax over both:
    the drafter KV vLLM holds at draft step j. Query head h reads KV head h // n_rep."""
    torch = _torch()
    scale = q.shape[-1] ** -0.5
    k0 = k0.repeat_interleave(n_rep, dim=1)
    v0 = v0.repeat_interleave(n_rep, dim=1)
    L = q.shape[2]
    s0 = torch.matmul(q, k0.transpose(-1, -2)) * scale
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s0 = s0.masked_fill(~causal, float("-inf"))
    ks = [k.repeat_interleave(n_rep, dim=1) for k in diag_k]
    vs = [v.repeat_interleave(n_rep, dim=1) for v in diag_v]
    sd = [((q * k).sum(-1) * scale).unsqueeze(-1) for k in ks]
    p = torch.softmax(torch.cat([s0, *sd], dim=-1), dim=-1)
    out = torch.matmul(p[..., :L], v0)
    for i, v in enumerate(vs):
        out = out + p[..., L + i: L + i + 1] * v
    return out


def build_head(cfg, n_kept: int):
    """The head as a torch module whose state-dict names are vLLM's checkpoint names."""
    torch = _torch()
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

    H, eps = cfg.hidden_size, cfg.rms_norm_eps
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(2 * H, nh * hd, bias=False)
            self.k_proj = nn.Linear(2 * H, nkv * hd, bias=False)
            self.v_proj = nn.Linear(2 * H, nkv * hd, bias=False)
            self.o_proj = nn.Linear(nh * hd, H, bias=False)

    class MidLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = SelfAttn()
            self.mlp = LlamaMLP(cfg)
            self.input_layernorm = LlamaRMSNorm(H, eps=eps)
            self.hidden_norm = LlamaRMSNorm(H, eps=eps)
            self.post_attention_layernorm = LlamaRMSNorm(H, eps=eps)

    class Eagle3Head(nn.Module):
        def __init__(self):
            super().__init__()
            # One RMSNorm per aux state before fc (vLLM's ``fc_norm``): SmolLM2's
            # residual streams carry massive activations (dims 17 and 507 at ~14x the
            # RMS at layer 27, and an RMS ~1000 at the first position) and grow ~7x
            # from layer 2 to 27; unnormed, they swamp fc's output and the residual.
            self.fc_norm = nn.ModuleList([LlamaRMSNorm(H, eps=eps) for _ in range(3)])
            self.fc = nn.Linear(3 * H, H, bias=False)
            self.midlayer = MidLayer()
            self.norm = LlamaRMSNorm(H, eps=eps)
            self.lm_head = nn.Linear(H, n_kept, bias=False)
            self.rotary = LlamaRotaryEmbedding(cfg)

        def qkv(self, emb, hidden, positions):
            """Queries, keys, values of one step (rotated at ``positions`` [B, L])."""
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            m = self.midlayer
            x = torch.cat([m.input_layernorm(emb), m.hidden_norm(hidden)], dim=-1)
            B, L, _ = x.shape
            q = m.self_attn.q_proj(x).view(B, L, nh, hd).transpose(1, 2)
            k = m.self_attn.k_proj(x).view(B, L, nkv, hd).transpose(1, 2)
            v = m.self_attn.v_proj(x).view(B, L, nkv, hd).transpose(1, 2)
            cos, sin = self.rotary(x, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            return q, k, v

        def finish(self, attn, residual):
            """o_proj, residual, MLP, final norm: (logits over the kept tokens, pre-norm)."""
            m = self.midlayer
            B, _, L, _ = attn.shape
            h = m.self_attn.o_proj(attn.transpose(1, 2).reshape(B, L, nh * hd)) + residual
            prenorm = m.mlp(m.post_attention_layernorm(h)) + h
            return self.lm_head(self.norm(prenorm)), prenorm

        def combine(self, features):
            """vLLM's ``combine_hidden_states``: fc over the per-aux normed states."""
            chunks = features.chunk(3, dim=-1)
            return self.fc(torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1))

        def unroll(self, emb_next, features, steps: int):
            """The training-time test: logits of steps 0..steps-1 for every anchor t.
            ``emb_next[j]`` [B, L, H] is the embedding of token t+1+j at anchor t."""
            B, L, _ = features.shape
            base = torch.arange(L, device=features.device).expand(B, L)
            hidden = self.combine(features)
            q, k0, v0 = self.qkv(emb_next[0], hidden, base)
            out, dk, dv = [], [], []
            for j in range(steps):
                if j:
                    q, k, v = self.qkv(emb_next[j], hidden, base + j)
                    dk.append(k)
                    dv.append(v)
                attn = ttt_attention(q, k0, v0, dk, dv, nh // nkv)
                logits, hidden = self.finish(attn, hidden)
                out.append(logits)
            return out

    return Eagle3Head()


def _init_head(head, teacher, seed: int) -> None:
    """Random body (scaled so the residual stream starts small), LM-head rows from the
    target's LM head (SmolLM2: its tied embedding) at the kept ids, norms from the
    target's final norm: both from the ``teacher``'s already loaded target."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.dim() == 2:
                fan_in = p.shape[1]
                small = name.endswith(("o_proj.weight", "down_proj.weight"))
                p.copy_(torch.randn(p.shape, generator=g) * ((0.1 if small else 1.0) / math.sqrt(fan_in)))
        head.lm_head.weight.copy_(teacher.kept_rows)
        for norm in (head.norm, head.midlayer.input_layernorm, head.midlayer.hidden_norm,
                     head.midlayer.post_attention_layernorm):
            norm.weight.copy_(teacher.model.model.norm.weight)


def whiten_fc_norm(head, features) -> None:
    """Start each aux state's norm weight at 1 / (its RMS-normed dimension's RMS over
    ``features``' tokens after the first), so that every dimension reaches fc at a
    comparable scale: the massive-activation dimensions start small instead of
    dominating. The first position (an attention sink, RMS ~1000) is left out."""
    torch = _torch()
    with torch.no_grad():
        for norm, chunk in zip(head.fc_norm, features[:, 1:].chunk(3, dim=-1)):
            x = chunk.reshape(-1, chunk.shape[-1])
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            norm.weight.copy_(1.0 / x.pow(2).mean(0).sqrt().clamp(min=1e-3))


class Teacher:
    """The target, teacher-forced: aux features and its distribution over the kept ids."""

    def __init__(self, target_dir, kept, device="cpu"):
        torch = _torch()
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device).eval()
        self.model.requires_grad_(False)
        self.kept_rows = self.model.lm_head.weight[kept.to(device)].detach()
        self.embed = self.model.model.embed_tokens
        self.aux = aux_layer_ids(self.model.config.num_hidden_layers)

    def __call__(self, ids):
        torch = _torch()
        with torch.no_grad():
            out = self.model.model(input_ids=ids, output_hidden_states=True)
            hs = out.hidden_states
            features = torch.cat([hs[i] for i in self.aux], dim=-1).float()  # bf16 under autocast
            logp = torch.log_softmax((out.last_hidden_state @ self.kept_rows.T).float(), dim=-1)
            return features, logp, self.embed(ids)


def _collate(records, idxs, max_len: int, prompt_weight: float, device="cpu"):
    """ids [B, L] (right-padded with 0), the teacher's weight [B, L] at each position
    (0 past the record's end), is_resp [B, L]: the position predicts a response token;
    built on the host, returned on ``device``."""
    torch = _torch()
    L = max(min(len(records[i]["ids"]), max_len) for i in idxs)
    ids = torch.zeros(len(idxs), L, dtype=torch.long)
    w = torch.zeros(len(idxs), L)
    is_resp = torch.zeros(len(idxs), L, dtype=torch.bool)
    for b, i in enumerate(idxs):
        r = records[i]
        n = min(len(r["ids"]), L)
        ids[b, :n] = r["ids"][:n].long()
        resp_from = r["n_prompt"] - 1  # position n_prompt - 1 predicts the first response token
        w[b, :n] = prompt_weight
        w[b, resp_from:n] = 1.0
        is_resp[b, resp_from:n] = True
    return ids.to(device), w.to(device), is_resp.to(device)


def _shift(x, j: int):
    """x[:, t + j] at t (zeros past the end)."""
    torch = _torch()
    if j == 0:
        return x
    pad = torch.zeros_like(x[:, :j])
    return torch.cat([x[:, j:], pad], dim=1)


def ttt_loss(head, kept, teacher_out, ids, w, is_resp, steps: int, k_eval: int):
    """Loss over the unrolled steps, and greedy-acceptance counts at response anchors:
    step j's argmax (a kept id) against the record's token t+2+j (the target's greedy
    token on response positions)."""
    torch = _torch()
    features, logp_t, emb = teacher_out
    emb_next = [_shift(emb, 1 + j) for j in range(steps)]
    logits = head.unroll(emb_next, features, steps)
    loss, wsum = 0.0, 0.0
    hits = []
    for j, lg in enumerate(logits):
        tw = _shift(w, 1 + j)  # teacher at position t + 1 + j
        tp = _shift(logp_t, 1 + j)
        logq = torch.log_softmax(lg.float(), dim=-1)
        kl = (tp.exp() * (tp - logq)).sum(-1)
        loss = loss + (STEP_WEIGHT ** j) * (kl * tw).sum()
        wsum += (STEP_WEIGHT ** j) * float(tw.sum())
        with torch.no_grad():
            hits.append((kept[lg.argmax(-1)] == _shift(ids, 2 + j)) & (_shift(w, 2 + j) > 0))
    with torch.no_grad():
        # greedy chains of k_eval drafts from anchors whose first draft is a response token
        # and whose whole chain lies inside the record
        anchor = _shift(is_resp, 1) & (_shift(w, 1 + k_eval) > 0)
        run = torch.ones_like(anchor)
        accepted = torch.zeros(anchor.shape, dtype=torch.long)
        for j in range(min(k_eval, steps)):
            run = run & hits[j]
            accepted += run.long()
        stats = {"anchors": int(anchor.sum()), "accepted": int(accepted[anchor].sum()),
                 "step_agree": [int((h & anchor).sum()) for h in hits]}
    return loss / max(wsum, 1e-6), stats


def kept_ids(args):
    """The head's vocabulary: ``kept_token_ids`` of ``--kept-from`` (a draft's
    ``draft.safetensors``; default the shipped draft's, so the two compare)."""
    from safetensors.torch import load_file

    return load_file(str(args.kept_from or KEPT_FROM))["kept_token_ids"].long()


def _acceptance(stats) -> float:
    return 1.0 + stats["accepted"] / max(1, stats["anchors"])


def evaluate(head, kept, teacher, records, args, max_tokens: int = 4096) -> dict:
    torch = _torch()
    from vllm_cmasd.training.train import _make_batches

    head.eval()
    tot = {"anchors": 0, "accepted": 0, "step_agree": [0] * args.ttt_steps}
    with torch.no_grad():
        for idxs in _make_batches(records, max_tokens, random.Random(0), args.max_len):
            ids, w, is_resp = _collate(records, idxs, args.max_len, 1.0, args.device)
            with compute_context(args):
                _, st = ttt_loss(head, kept, teacher(ids), ids, w, is_resp, args.ttt_steps, args.bench_k)
            tot["anchors"] += st["anchors"]
            tot["accepted"] += st["accepted"]
            tot["step_agree"] = [a + b for a, b in zip(tot["step_agree"], st["step_agree"])]
    head.train()
    return {"acceptance_length": round(_acceptance(tot), 4), "anchors": tot["anchors"],
            "k": args.bench_k,
            "top1_agreement_by_step": [round(a / max(1, tot["anchors"]), 4) for a in tot["step_agree"]]}


def _load_init(head, path) -> None:
    """Load a head's weights (a warm start, or one to evaluate) from an ``eagle-train``
    checkpoint or a shipped head directory; refuses one of another shape."""
    torch = _torch()
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        state = torch.load(path, weights_only=False, map_location="cpu")["head"]
    else:
        state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items() if k not in ("d2t", "t2d")}
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("rotary")]:
        raise ValueError(f"--init-from {path}: not a head of this shape (missing {missing}, unexpected {unexpected})")


def _prompt_key(record) -> tuple[int, ...]:
    return tuple(record["ids"][: record["n_prompt"]].tolist())


def stage_eagle_train(args) -> None:
    torch = _torch()
    from tqdm import tqdm
    from transformers import LlamaConfig

    from vllm_cmasd.training.train import _make_batches

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 on an accelerator that has it; no-op on CPU
    work = Path(args.work)
    data = torch.load(work / "data.pt", weights_only=False)
    recs, held = data["train"], data["eval_docs"]
    if args.skip_records_of:
        # A warm-started round on fresh records: the head has seen the earlier ones
        # (a second epoch over them memorises, eagle3-training.md round 2).
        seen = {_prompt_key(r) for r in torch.load(Path(args.skip_records_of) / "data.pt", weights_only=False)["train"]}
        recs = [r for r in recs if _prompt_key(r) not in seen]
        log(f"eagle-train: {len(recs)} records not in {args.skip_records_of}")
    kept = kept_ids(args).to(args.device)
    cfg = LlamaConfig.from_pretrained(args.target)
    head = build_head(cfg, len(kept)).to(args.device)
    teacher = Teacher(args.target, kept, args.device)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    ck, best_path = work / "eagle_ckpt.pt", work / "eagle_best.pt"
    step, t_used, hist, best = 0, 0.0, [], {}
    if ck.exists():
        st = torch.load(ck, weights_only=False, map_location=args.device)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, t_used, hist, best = st["step"], st["t_used"], st["hist"], st["best"]
        log(f"eagle-train: resumed from step {step} ({t_used / 60:.1f} min used)")
    elif args.init_from:
        _load_init(head, args.init_from)
        hist.append({"step": 0, "init_from": str(args.init_from)})
        log(f"eagle-train: warm start from {args.init_from}")
    else:
        _init_head(head, teacher, args.seed)
        sample = sorted(random.Random(args.seed).sample(range(len(recs)), min(32, len(recs))))
        whiten_fc_norm(head, teacher(_collate(recs, sample, args.max_len, 1.0, args.device)[0])[0])
    n_tok = sum(min(len(r["ids"]), args.max_len) for r in recs)
    log(f"eagle-train: {len(recs)} seqs, {n_tok} tokens, held-out docs {len(held)} seqs; "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, {args.ttt_steps} TTT steps")

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        prog = min(1.0, t_used / (args.max_minutes * 60))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    def save(path):
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "t_used": t_used,
                    "hist": hist, "best": best}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    sched, epoch = [], 0
    pbar = tqdm(desc="eagle3", initial=step, dynamic_ncols=True, mininterval=10)
    t_start = time.time() - t_used
    ema = None
    while t_used < args.max_minutes * 60:
        while len(sched) <= step:
            sched.extend(_make_batches(recs, args.batch_tokens, random.Random(args.seed + epoch), args.max_len))
            epoch += 1
        ids, w, is_resp = _collate(recs, sched[step], args.max_len, args.prompt_weight, args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with compute_context(args):
            loss, st = ttt_loss(head, kept, teacher(ids), ids, w, is_resp, args.ttt_steps, args.bench_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc = _acceptance(st)
        ema = (loss.item(), acc) if ema is None else (0.95 * ema[0] + 0.05 * loss.item(), 0.95 * ema[1] + 0.05 * acc)
        pbar.set_postfix(loss=f"{ema[0]:.3f}", acc_len=f"{ema[1]:.2f}", lr=f"{lr_at(step):.1e}")
        pbar.update(1)
        t_used = time.time() - t_start
        if step % args.ckpt_every == 0:
            hist.append({"step": step, "min": round(t_used / 60, 2), "loss": round(ema[0], 4),
                         "train_acceptance_ema": round(ema[1], 3), "epoch": round(step / max(1, len(sched) / epoch), 2)})
            if args.eval_every and step % args.eval_every == 0:
                r = evaluate(head, kept, teacher, held[: args.eval_subset], args)
                hist[-1]["heldout_docs"] = r
                if r["acceptance_length"] >= best.get("acceptance_length", 0):
                    best = dict(r, step=step)
                    save(best_path)
                log(f"eagle-train: step {step} ({t_used / 60:.1f} min) held-out docs acceptance length "
                    f"{r['acceptance_length']:.3f} (k={args.bench_k}), agreement by step {r['top1_agreement_by_step']}")
            save(ck)
    pbar.close()
    save(ck)
    if not best_path.exists():
        save(best_path)
    final = {"last": evaluate(head, kept, teacher, held, args), "step": step, "minutes": round(t_used / 60, 1),
             "epochs": round(step / max(1, len(sched) / max(1, epoch)), 2), "best_on_subset": best}
    log(f"eagle-train: FINAL held-out docs (all {len(held)} seqs): {final['last']}")
    (work / "eagle_final_eval.json").write_text(json.dumps(final, indent=1))


def head_config(target_dir, n_kept: int) -> dict:
    """The head's ``config.json``: the target's shapes, one layer, the reduced vocabulary."""
    config = json.loads((Path(target_dir) / "config.json").read_text())
    aux = aux_layer_ids(config["num_hidden_layers"])
    config.update(architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1, draft_vocab_size=n_kept, fc_norm=True,
                  target_hidden_size=config["hidden_size"], tie_word_embeddings=False,
                  eagle_config={"eagle_aux_hidden_state_layer_ids": list(aux),
                                "use_aux_hidden_state": True})
    config.pop("layer_types", None)
    return config


def write_head(state: dict, kept, target_dir, out_dir) -> None:
    """The head's ``model.safetensors`` (bf16, vLLM's key names, ``d2t`` offsets and
    SpecForge's ``t2d`` mask, no embedding) and ``config.json`` in ``out_dir``."""
    torch = _torch()
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = head_config(target_dir, len(kept))
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if not k.startswith("rotary")}
    tensors["d2t"] = (kept - torch.arange(len(kept))).to(torch.int64)  # an offset: target id = draft id + d2t
    t2d = torch.zeros(config["vocab_size"], dtype=torch.bool)
    t2d[kept] = True
    tensors["t2d"] = t2d
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def stage_eagle_export(args) -> None:
    torch = _torch()

    work = Path(args.work)
    st = torch.load(work / f"eagle_{args.export_from}", weights_only=False,  # --export-from ckpt.pt / best.pt
                    map_location="cpu")
    write_head(st["head"], kept_ids(args), args.target, args.eagle_out)
    fe = json.loads((work / "eagle_final_eval.json").read_text()) if (work / "eagle_final_eval.json").exists() else {}
    rec = {"architecture": "LlamaForCausalLMEagle3", "ttt_steps": args.ttt_steps, "steps": st["step"],
           "train_minutes": round(st["t_used"] / 60, 1), "export_from": args.export_from,
           "hparams": {k: getattr(args, k) for k in ("lr", "warmup", "batch_tokens", "max_len", "prompt_weight",
                                                     "max_minutes", "init_from", "seed", "threads", "device",
                                                     "compute_dtype")},
           "heldout_final": fe, "history": st["hist"]}
    (Path(args.eagle_out) / "head.json").write_text(json.dumps(rec, indent=1))
    log(f"eagle-export: wrote {args.eagle_out}")


def assemble_eagle3_head(target_dir, head_dir, out_dir) -> Path:
    """The shipped head plus the target's tokenizer files in ``out_dir`` (atomic): the
    directory vLLM's ``eagle3`` method is given as its ``model``."""
    target_dir, head_dir, out_dir = Path(target_dir), Path(head_dir), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in ("model.safetensors", "config.json", "head.json"):
        if (head_dir / f).exists():  # head.json: the training record, absent from a test's head
            shutil.copy2(head_dir / f, tmp / f)
    for f in TOKENIZER_FILES:
        if (target_dir / f).exists():
            shutil.copy2(target_dir / f, tmp / f)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def stage_eagle_eval(args) -> None:
    torch = _torch()
    from transformers import LlamaConfig

    torch.set_num_threads(args.threads)
    kept = kept_ids(args).to(args.device)
    head = build_head(LlamaConfig.from_pretrained(args.target), len(kept)).to(args.device)
    _load_init(head, args.init_from)
    held = torch.load(Path(args.work) / "data.pt", weights_only=False)["eval_docs"]
    result = evaluate(head, kept, Teacher(args.target, kept, args.device), held, args)
    log(f"eagle-eval: {args.init_from} on the {len(held)} held-out docs records of {args.work}: {result}")


def stage_eagle_assemble(args) -> None:
    log(f"eagle-assemble: {assemble_eagle3_head(args.target, args.eagle_out, args.eagle_assemble_to)}")
