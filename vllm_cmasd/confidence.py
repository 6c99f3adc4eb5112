"""How sure the drafter is about each token it drafts.

All functions take a batch of drafter logits ``[batch, vocab]`` and return one
value per row in ``[0, 1]``, 1 meaning certain. They run batched on the
logits' device; there is no loop over tokens. Equations: docs/confidence.md.
The three signal functions are their definitions (R-Stitch routes on
:func:`entropy`); the drafting loop calls :func:`unified_confidence`, which
computes their weighted mean in one pass, held to them by the tests.

A row without a finite maximum (a NaN anywhere, a +inf, or all -inf: a
broken drafter) is least confident for every signal: confidence 0, entropy
+inf. -inf entries alone (tokens a drafter rules out) are a valid row.
"""

from __future__ import annotations

import math

import torch

from vllm_cmasd.config import CmasdConfig


def is_broken(logits: torch.Tensor) -> torch.Tensor:
    """Rows without a finite maximum (amax propagates NaN)."""
    return ~logits.amax(dim=-1).isfinite()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) in nats; +inf for a broken row. Tokens a drafter rules out
    (-inf logits) add nothing (0 log 0 is NaN, hence nansum)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    h = -(log_probs.exp() * log_probs).nansum(dim=-1)
    return torch.where(is_broken(logits), float("inf"), h)


def entropy_confidence(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """1 - H(p) / log V: 1 for a one-hot distribution, 0 for a uniform one.

    V is ``vocab_size``, default the logits' width (pass the full vocabulary
    when ``logits`` holds only the tokens a drafter can propose).
    """
    return (1.0 - entropy(logits) / math.log(vocab_size or logits.shape[-1])).clamp(0.0, 1.0)


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """p1 - p2, the gap between the two most likely tokens' probabilities."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return torch.where(is_broken(logits), 0.0, top2[:, 0] - top2[:, 1])


def logit_margin_confidence(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """tanh((l1 - l2) / scale): the raw logit gap, squashed into [0, 1).

    Unlike the softmax margin it does not saturate at 1 when one token is far
    ahead, and unlike entropy it ignores the tail; ``scale`` is the gap that
    maps to tanh(1) = 0.76.
    """
    top2 = logits.float().topk(2, dim=-1).values
    # A lone finite top logit over -inf is certain: its gap is +inf, tanh 1.
    return torch.where(is_broken(logits), 0.0, torch.tanh((top2[:, 0] - top2[:, 1]) / scale))


def unified_confidence(logits: torch.Tensor, config: CmasdConfig, vocab_size: int | None = None) -> torch.Tensor:
    """Weighted mean of the three signals, weights from ``config.weights``
    (``vocab_size``: see :func:`entropy_confidence`); 0 for a broken row.

    Equal to the weighted mean of the functions above, in one pass: they run
    once per drafted token, and apart each redid the softmax (0.4-0.6 ms a
    drafted token at batch 1 on a 2-core CPU against ~3 ms for the head's
    pass; 2026-12-06). Here one softmax serves all three: the entropy is
    sum -p log p, the softmax margin p1 - p2, and the logit gap l1 - l2 is
    log p1 - log p2 (+inf where p2 underflows, like a -inf second logit:
    tanh 1). A broken row's softmax is NaN throughout, so is its score: 0."""
    w_entropy, w_softmax, w_logit = config.normalized_weights
    probs = torch.softmax(logits.float(), dim=-1)
    score = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    # Skip signals with zero weight: each costs a pass over the vocabulary.
    if w_entropy:
        h = torch.special.entr(probs).sum(dim=-1)
        score += w_entropy * (1.0 - h / math.log(vocab_size or logits.shape[-1])).clamp(0.0, 1.0)
    if w_softmax or w_logit:
        top2 = probs.topk(2, dim=-1).values
        if w_softmax:
            score += w_softmax * (top2[:, 0] - top2[:, 1])
        if w_logit:
            score += w_logit * torch.tanh((top2[:, 0].log() - top2[:, 1].log()) / config.logit_margin_scale)
    return score.clamp(0.0, 1.0).nan_to_num(0.0)
