#!/usr/bin/env python
"""Build a SpecBound-style self-draft: calibrate the target's early exits, pick one, write it.

Usage::

    .venv/bin/python scripts/build_self_draft.py models/smollm2-135m-instruct \\
        --out models/smollm2-135m-selfdraft [--exit-layer N|auto] [--k-max 8] [--tokens 2048]

What it does (transformers on CPU, fp32, deterministic: no sampling anywhere):

1. text      offline text only: windows of Python stdlib source (code and docstrings, the
             tiny test tokenizer's corpus, :func:`vllm_cmasd.testing.corpus_texts`) and a
             few chat prompts through the target's chat template followed by the
             target's own greedy answer (what a drafter has to predict when serving).
2. collect   one teacher-forced pass of the target per sequence; forward hooks keep the
             output h_l of every decoder layer l. The label of a position is the final
             layer's argmax y (the token the target's greedy decoding emits there).
3. calibrate for every layer l < L: early-exit logits z_l = lm_head(final_norm(h_l));
             top-1 agreement a_l = P(argmax z_l = y); the temperature T_l minimising
             NLL_l(T) = mean[logsumexp(z_l / T) - z_l[y] / T]. With beta = 1/T this is
             convex in beta (a log-sum-exp of functions linear in beta), so a safeguarded
             Newton iteration on beta finds the minimum: gradient mean(E_p[z] - z[y]),
             curvature mean(Var_p[z]) under p = softmax(beta z). Reported per layer:
             agreement, mean max-probability and expected calibration error (15 equal-width
             bins of the max-probability; "correct" = argmax equals y) before (T=1) and
             after (T=T_l), and the NLL before/after.
4. choose    ``--exit-layer auto``: the layer with the best modelled speed, see
             :func:`speed_model`.
5. write     :func:`vllm_cmasd.self_draft.build_self_draft` with the chosen layer's T_l and
             the whole table in ``self_draft.json``.

Time on 2 CPU cores for SmolLM2-135M-Instruct with the defaults: see docs/self_draft.md
(about a minute and a half).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from vllm_cmasd.self_draft import build_self_draft  # noqa: E402
from vllm_cmasd.testing import corpus_texts  # noqa: E402

ECE_BINS = 15
# Rows of early-exit logits processed at once: bounds the softmax temporaries to
# ROW_CHUNK x vocab floats (200 MB for SmolLM2's 49152 tokens).
ROW_CHUNK = 1024

GENERAL_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Count from 1 to 20.",
    "Write a short poem about the sea.",
    "Give me three tips for learning a new language.",
    "Explain what a prime number is.",
    "Write a Python function that reverses a string.",
)


def log(msg: str) -> None:
    print(f"[build_self_draft] {msg}", flush=True)


# --------------------------------------------------------------------------- text


def docstring_prompts(texts: list[str], n: int) -> list[str]:
    """Chat prompts asking about the first ``n`` public function docstrings in ``texts``."""
    out = []
    for src in texts:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 60:
                    out.append(f"Explain in two sentences what `{node.name}` does:\n\n{doc[:600]}")
                    if len(out) == n:
                        return out
    return out


def calibration_sequences(model, tok, tokens: int, seq_len: int, chat_prompts: int,
                          answer_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """``(input_ids [T], first scored position)`` pairs, about ``tokens`` scored positions.

    Chat sequences are scored from the last prompt position on (the answer the target
    gives itself, greedily); stdlib windows at every position.
    """
    texts = corpus_texts()
    seqs: list[tuple[torch.Tensor, int]] = []
    scored = 0
    if chat_prompts and getattr(tok, "chat_template", None):
        prompts = list(GENERAL_CHAT_PROMPTS) + docstring_prompts(texts, chat_prompts)
        for prompt in prompts[:chat_prompts]:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )["input_ids"]
            ids = ids[:, -seq_len // 2:]
            with torch.no_grad():
                full = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_tokens,
                    do_sample=False, pad_token_id=tok.pad_token_id,
                )[0]
            seqs.append((full, ids.shape[1] - 1))
            scored += full.numel() - ids.shape[1]
    # Round-robin over the modules (window j of every module, then window j+1), so a
    # few thousand positions still cover every module; windows 4 x seq_len apart.
    streams = [torch.tensor(tok(t, verbose=False)["input_ids"]) for t in texts]
    start = 0
    while scored < tokens and any(s.numel() >= start + seq_len for s in streams):
        for s in streams:
            if scored < tokens and s.numel() >= start + seq_len:
                seqs.append((s[start:start + seq_len], 0))
                scored += seq_len - 1
        start += 4 * seq_len
    return seqs


# --------------------------------------------------------------------------- collect


def collect_hidden_states(model, seqs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per decoder layer, its output at every scored position ``[N, H]``; labels ``[N]``.

    The label of position t is the final logits' argmax at t (the target's next token).
    """
    layers = model.model.layers
    captured: list[torch.Tensor] = [None] * len(layers)

    def hook(i):
        def fn(_module, _inputs, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    labels = []
    try:
        with torch.no_grad():
            for ids, first in seqs:
                logits = model(ids[None], use_cache=False).logits[0]
                # position t predicts token t+1: score positions first..T-2
                rows = slice(first, ids.numel() - 1)
                labels.append(logits[rows].argmax(-1))
                for i, h in enumerate(captured):
                    per_layer[i].append(h[0, rows].clone())
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(h) for h in per_layer], torch.cat(labels)


# --------------------------------------------------------------------------- calibrate


def _moments(logits: torch.Tensor, labels: torch.Tensor, beta: float):
    """Mean NLL of ``labels`` under softmax(beta * logits), and its first two derivatives in beta.

    Per row, with e = exp(beta (z - max z)) and s = sum e: NLL = log s + beta (max z - z_y),
    d/dbeta = E_p[z] - z_y, d2/dbeta2 = Var_p[z]. In-place on one ROW_CHUNK x V buffer:
    this loop is the script's running time.
    """
    nll = grad = curv = 0.0
    for i in range(0, logits.shape[0], ROW_CHUNK):
        z, y = logits[i:i + ROW_CHUNK], labels[i:i + ROW_CHUNK]
        top = z.max(-1, keepdim=True).values
        zy = z.gather(1, y[:, None])
        e = (z - top).mul_(beta).exp_()
        s = e.sum(-1, keepdim=True)
        ez = e.mul_(z).sum(-1, keepdim=True) / s
        ez2 = e.mul_(z).sum(-1, keepdim=True) / s
        nll += (s.log() + beta * (top - zy)).sum().item()
        grad += (ez - zy).sum().item()
        curv += (ez2 - ez * ez).clamp_min(0).sum().item()
    n = logits.shape[0]
    return nll / n, grad / n, curv / n


def nll_at(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL of ``labels`` under softmax(logits / temperature)."""
    return _moments(logits, labels, 1.0 / temperature)[0]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 20) -> tuple[float, float, float]:
    """(T, NLL at T=1, NLL at T) for the T minimising the NLL of ``labels`` under
    softmax(logits / T): safeguarded Newton on beta = 1/T, where the NLL is convex."""
    beta = 1.0
    nll, grad, curv = _moments(logits, labels, beta)
    nll_1 = nll
    for _ in range(steps):
        # Newton step; a flat curvature (all mass on one token) falls back to a
        # gradient step of bounded size.
        step = grad / curv if curv > 1e-12 else math.copysign(beta, grad)
        while True:
            new_beta = min(max(beta - step, 1e-3), 1e3)
            new = _moments(logits, labels, new_beta)
            if new[0] <= nll or abs(step) < 1e-6:
                break
            step /= 2  # convex: a short enough step along -gradient lowers the NLL
        converged = abs(new_beta - beta) < 1e-3 * beta  # T to about 3 digits
        beta, (nll, grad, curv) = new_beta, new
        if converged:
            break
    return 1.0 / beta, nll_1, nll


def confidence_stats(logits: torch.Tensor, correct: torch.Tensor, temperature: float) -> dict:
    """Mean max-probability and expected calibration error of softmax(logits / T).

    The max-probability is 1 / sum exp((z - max z) / T) (no full softmax needed).
    """
    maxp = torch.cat([
        1.0 / ((z - z.max(-1, keepdim=True).values).div_(temperature).exp_().sum(-1))
        for z in logits.split(ROW_CHUNK)
    ])
    bins = torch.clamp((maxp * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            ece += m.float().mean().item() * abs(correct[m].mean().item() - maxp[m].mean().item())
    return {"mean_max_prob": maxp.mean().item(), "ece": ece}


def calibrate_layers(model, hidden: list[torch.Tensor], labels: torch.Tensor, progress=None) -> list[dict]:
    """One row per exit layer l = 1..L-1 (the last layer is the target itself)."""
    norm, head = model.model.norm, model.lm_head
    rows = []
    layers = range(len(hidden) - 1)
    for i in (progress(layers) if progress else layers):
        with torch.no_grad():
            z = head(norm(hidden[i]))
        correct = (z.argmax(-1) == labels).float()
        t, nll_before, nll_after = fit_temperature(z, labels)
        before, after = confidence_stats(z, correct, 1.0), confidence_stats(z, correct, t)
        rows.append({
            "layer": i + 1,
            "agreement": correct.mean().item(),
            "temperature": t,
            "nll_before": nll_before,
            "nll_after": nll_after,
            "mean_max_prob_before": before["mean_max_prob"],
            "mean_max_prob_after": after["mean_max_prob"],
            "ece_before": before["ece"],
            "ece_after": after["ece"],
        })
        del z
    return rows


# --------------------------------------------------------------------------- choose


def speed_model(agreement: float, layer: int, num_layers: int, layer_params: int,
                head_params: int, k_max: int) -> tuple[float, int]:
    """Modelled speed of exiting at ``layer`` relative to plain decoding, and its best k.

    Decoding is memory-bound, so a pass costs about the weights it reads: a draft pass
    through l of L layers plus the LM head costs c = (l P_layer + P_head) / (L P_layer +
    P_head) of a target pass (the head is not small: 28M of SmolLM2's 135M parameters).
    With a window of k drafts, each accepted with probability a (the measured agreement,
    independent across positions), a verification step yields (1 - a^(k+1)) / (1 - a)
    tokens (accepted drafts plus the target's own token) for a cost of 1 + k c target
    passes. Speed = max over k in 1..k_max of their ratio. CM-ASD's window is adaptive,
    so this is only a guide to the layer, not a prediction of its speed.
    """
    c = (layer * layer_params + head_params) / (num_layers * layer_params + head_params)
    best = (0.0, 1)
    for k in range(1, k_max + 1):
        tokens = k + 1 if agreement >= 1 else (1 - agreement ** (k + 1)) / (1 - agreement)
        best = max(best, (tokens / (1 + k * c), k))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("--out", required=True)
    ap.add_argument("--exit-layer", default="auto", help="N (1..L-1) or auto (default)")
    ap.add_argument("--k-max", type=int, default=8, help="window for the speed model (vLLM's num_speculative_tokens)")
    ap.add_argument("--tokens", type=int, default=2048, help="scored positions (about)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chat-prompts", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(args.target)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    if args.exit_layer != "auto" and not 1 <= int(args.exit_layer) < num_layers:
        ap.error(f"--exit-layer must be auto or in 1..{num_layers - 1}")

    seqs = calibration_sequences(model, tok, args.tokens, args.seq_len, args.chat_prompts, args.answer_tokens)
    hidden, labels = collect_hidden_states(model, seqs)
    log(f"{len(seqs)} sequences, {labels.numel()} scored positions, {time.time() - t0:.0f}s")
    rows = calibrate_layers(model, hidden, labels, progress=lambda it: tqdm(it, desc="calibrating layers"))

    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    head_params = model.lm_head.weight.numel()
    for row in rows:
        row["speed"], row["best_k"] = speed_model(
            row["agreement"], row["layer"], num_layers, layer_params, head_params, args.k_max
        )
    exit_layer = (max(rows, key=lambda r: r["speed"])["layer"] if args.exit_layer == "auto"
                  else int(args.exit_layer))
    chosen = rows[exit_layer - 1]

    print(f"{'layer':>5} {'agree':>6} {'T':>6} {'maxp':>6} {'maxp_T':>6} {'ece':>6} {'ece_T':>6} "
          f"{'nll':>6} {'nll_T':>6} {'speed':>6} {'k':>2}")
    for r in rows:
        print(f"{r['layer']:>5} {r['agreement']:6.3f} {r['temperature']:6.2f} "
              f"{r['mean_max_prob_before']:6.3f} {r['mean_max_prob_after']:6.3f} "
              f"{r['ece_before']:6.3f} {r['ece_after']:6.3f} {r['nll_before']:6.2f} "
              f"{r['nll_after']:6.2f} {r['speed']:6.2f} {r['best_k']:>2}"
              + ("  <- exit" if r is chosen else ""))
    if chosen["speed"] < 1:
        log(f"note: the speed model expects no speedup from any exit layer (best {chosen['speed']:.2f}x)")

    calibration = {
        "method": "per-layer temperature minimising NLL of the final layer's argmax",
        "scored_positions": labels.numel(),
        "sequences": len(seqs),
        "chat_prompts": args.chat_prompts,
        "answer_tokens": args.answer_tokens,
        "seq_len": args.seq_len,
        "speed_model": {"k_max": args.k_max, "layer_params": layer_params, "head_params": head_params,
                        "num_layers": num_layers},
        "exit_layer_choice": args.exit_layer,
        "layers": rows,
        "seconds": round(time.time() - t0, 1),
    }
    out = build_self_draft(args.target, args.out, exit_layer, chosen["temperature"], calibration)
    log(f"wrote {out}: exit layer {exit_layer}/{num_layers}, T={chosen['temperature']:.3f}, "
        f"agreement {chosen['agreement']:.3f}, {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
