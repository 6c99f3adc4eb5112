"""CM-ASD verification kernels: two Triton kernels, each beside its torch twin.

Verification of one batch is two launches (equations: docs/verification.md):

1. ``draft_token_stats_kernel``, one program per drafted token, reads the
   target (and draft) distribution of that position once, in vocabulary
   blocks, and reduces it to the few numbers any policy needs: p(d), q(d),
   max p, argmax p, how many tokens the target prefers to d, and the
   recovered token to emit if d is rejected.
2. ``acceptance_walk_kernel``, one program per request, applies the policy to
   those numbers left to right, stops at the first rejection and writes the
   request's output row and accepted count.

Each kernel has a ``*_torch`` twin with the same parameter names: it is the
reference the tests hold the kernel to, and what runs on platforms where
Triton cannot (vLLM's dispatcher hands it the kernel's launch arguments by
keyword, see ``vllm_cmasd.vllm_patch.register_cpu_kernels``). The launch
wrappers (``compute_draft_token_stats``, ``walk_acceptance``) serve both, so
allocation and argument plumbing exist once.

Robustness rules shared by kernel and twin:

* a probability that is NaN or negative counts as 0, so a broken row can
  never win an argmax or get its token accepted by a ratio test;
* a target row without a distribution (its top logit NaN or infinite, so
  max p = 0) rejects its draft under every policy and emits token 0;
* a draft id outside [0, vocab) (vLLM pads with -1) is never used to index
  memory; it gets p(d) = q(d) = 0 and is therefore rejected by every policy,
  and a sampled request then emits a sample of p (the id was never drawn
  from q, so the residual max(0, p - q) would bias it);
* every emitted id comes from an argmax over in-vocabulary lanes, so output
  ids always lie in [0, vocab) (or are the bonus token, or -1 placeholders).

A greedy request's target token is the argmax of the target's logits, as in
vLLM's greedy sampler, whatever the rest of the batch does: probabilities
would round two close logits to one value and move a tie to the lower id.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

from vllm_cmasd.policies import Policy, PolicyParams

# Kernels may only read globals that are tl.constexpr: one per Policy member,
# under its name (EXACT, CONFIDENCE, TOPK_TOLERANCE, RSTITCH).
globals().update({policy.name: tl.constexpr(int(policy)) for policy in Policy})

# Vocabulary entries per block of the stats kernel: 1024 lanes over 4 warps
# keep p, q, noise and the two running reductions in registers (no spills on
# sm_80/sm_90, see tests/test_kernels.py). Tests lower it to cover many
# blocks with small vocabularies.
VOCAB_BLOCK_SIZE = 1024

# Elements per chunk of rows in the torch twin of the stats kernel (4 MiB of
# float32: cache-sized temporaries).
TWIN_CHUNK_ELEMENTS = 1 << 20


class DraftTokenStats(NamedTuple):
    """Per drafted token, everything the acceptance walk needs ([num_tokens] each)."""

    target_prob_of_draft: torch.Tensor  # p(d), float32
    draft_prob_of_draft: torch.Tensor  # q(d), float32; 1 for a one-hot draft
    target_max_prob: torch.Tensor  # max p, float32; 0: the row has no distribution
    target_argmax: torch.Tensor  # argmax of the target's logits (first on ties), int32
    num_more_likely: torch.Tensor | None  # tokens with p > p(d), int32; TOPK_TOLERANCE only
    recovered_token_ids: torch.Tensor | None  # None when every request is greedy


# --------------------------------------------------------------------------
# 1. Per drafted token: one pass over the vocabulary.
# --------------------------------------------------------------------------


@triton.jit
def draft_token_stats_kernel(
    target_probs,  # [num_tokens, vocab_size] float32
    draft_probs,  # [num_tokens, vocab_size], or None: drafts are one-hot
    draft_token_ids,  # [num_tokens]; -1 pads
    token_request_ids,  # [num_tokens] row of inverse_noise per token, or None
    inverse_noise,  # [batch_size, vocab_size] 1 / Exp(1), or None: all greedy
    target_prob_of_draft,  # out [num_tokens] float32
    draft_prob_of_draft,  # out [num_tokens] float32
    target_max_prob,  # out [num_tokens] float32
    num_more_likely,  # out [num_tokens] int32, or None unless POLICY is TOPK_TOLERANCE
    recovered_token_ids,  # out [num_tokens] int32, or None: all greedy
    vocab_size,
    POLICY: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # int64: token * vocab_size may pass 2**31
    row = token * vocab_size
    draft_id = tl.load(draft_token_ids + token).to(tl.int32)
    is_real = (draft_id >= 0) & (draft_id < vocab_size)
    # Masked loads: a padded id never touches memory.
    p_draft = tl.load(target_probs + row + draft_id, mask=is_real, other=0.0)
    p_draft = tl.where(p_draft > 0, p_draft, 0.0)
    if draft_probs is None:
        q_draft = tl.where(is_real, 1.0, 0.0)
    else:
        q_draft = tl.load(draft_probs + row + draft_id, mask=is_real, other=0.0).to(tl.float32)
        q_draft = tl.where(q_draft > 0, q_draft, 0.0)
    if inverse_noise is not None:
        noise_row = tl.load(token_request_ids + token).to(tl.int64) * vocab_size
        best_score = tl.full((), -1.0, inverse_noise.dtype.element_ty)
        recovered_id = 0

    # Running reductions. Real lanes are >= 0, padding lanes are -1, and a
    # later block must be strictly larger to win the recovered token, so its
    # ties go to the lowest id like torch.argmax.
    max_prob = -1.0
    if POLICY == TOPK_TOLERANCE:
        more_likely = 0
    for start in range(0, vocab_size, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        in_vocab = offsets < vocab_size
        p = tl.load(target_probs + row + offsets, mask=in_vocab, other=0.0)
        p = tl.where(p > 0, p, 0.0)
        max_prob = tl.maximum(max_prob, tl.max(tl.where(in_vocab, p, -1.0), axis=0))
        if POLICY == TOPK_TOLERANCE:
            more_likely += tl.sum((p > p_draft).to(tl.int32), axis=0)

        if inverse_noise is not None:
            # Exponential race: argmax(w / E) with E ~ Exp(1) per entry samples
            # from w / sum(w) without normalising w.
            if POLICY == TOPK_TOLERANCE:
                weight = p
            elif draft_probs is None:
                weight = tl.where(offsets == draft_id, 0.0, p)
            else:
                q = tl.load(draft_probs + row + offsets, mask=in_vocab, other=0.0).to(tl.float32)
                # An invalid id was not drawn from q: resample from p itself.
                weight = tl.where(is_real, p - tl.where(q > 0, q, 0.0), p)
            noise = tl.load(inverse_noise + noise_row + offsets, mask=in_vocab, other=0.0)
            score = tl.where(weight > 0, weight * noise, 0.0)
            block_best, block_pick = tl.max(tl.where(in_vocab, score, -1.0), axis=0, return_indices=True)
            if block_best > best_score:
                best_score = block_best
                recovered_id = start + block_pick

    tl.store(target_prob_of_draft + token, p_draft)
    tl.store(draft_prob_of_draft + token, q_draft)
    tl.store(target_max_prob + token, max_prob)
    if POLICY == TOPK_TOLERANCE:
        tl.store(num_more_likely + token, more_likely)
    if inverse_noise is not None:
        tl.store(recovered_token_ids + token, recovered_id)


def draft_token_stats_torch(
    target_probs,
    draft_probs,
    draft_token_ids,
    token_request_ids,
    inverse_noise,
    target_prob_of_draft,
    draft_prob_of_draft,
    target_max_prob,
    num_more_likely,
    recovered_token_ids,
    vocab_size,
    POLICY,
    BLOCK_SIZE,  # noqa: ARG001 -- the kernel's tiling; whole rows here
):
    """``draft_token_stats_kernel`` on whole rows, a chunk of rows at a time.

    Chunks keep every temporary small: fresh [num_tokens, vocab] tensors
    would cost a page fault per 4 KiB and miss the cache on each of the dozen
    passes below.
    """
    rows_per_chunk = max(1, TWIN_CHUNK_ELEMENTS // vocab_size)
    for start in range(0, target_probs.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        probs = _zero_invalid(target_probs[rows])
        draft_ids = draft_token_ids[rows].long()
        is_real = (draft_ids >= 0) & (draft_ids < vocab_size)
        safe_ids = torch.where(is_real, draft_ids, 0).unsqueeze(1)
        p_draft = torch.where(is_real, probs.gather(1, safe_ids).squeeze(1), 0.0)
        if draft_probs is None:
            q_draft = is_real.float()
        else:
            draft = _zero_invalid(draft_probs[rows].float())
            q_draft = torch.where(is_real, draft.gather(1, safe_ids).squeeze(1), 0.0)
        target_prob_of_draft[rows] = p_draft
        draft_prob_of_draft[rows] = q_draft
        target_max_prob[rows] = probs.amax(dim=1)
        if POLICY == Policy.TOPK_TOLERANCE:
            num_more_likely[rows] = (probs > p_draft.unsqueeze(1)).sum(dim=1).int()
        if inverse_noise is None:
            continue
        if POLICY == Policy.TOPK_TOLERANCE:
            weight = probs
        elif draft_probs is None:
            vocab_ids = torch.arange(vocab_size, device=probs.device)
            weight = torch.where(vocab_ids == draft_ids.unsqueeze(1), 0.0, probs)
        else:
            # An invalid id was not drawn from q: resample from p itself.
            weight = torch.where(is_real.unsqueeze(1), probs - draft, probs)
        score = torch.where(weight > 0, weight * inverse_noise[token_request_ids[rows]], 0.0)
        recovered_token_ids[rows] = score.argmax(dim=1).int()


def _zero_invalid(probs: torch.Tensor) -> torch.Tensor:
    """NaN and negative probabilities count as 0 (what the kernels do on load)."""
    return torch.where(probs > 0, probs, 0.0)


def target_argmax(target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax of the logits (first on ties, as vLLM's greedy sampler)
    as int32, and whether the row has a finite maximum at all.

    A row whose top logit is NaN, +inf or -inf has no distribution: its
    argmax is token 0 (in vocabulary), and the walk rejects its draft.
    """
    argmax_id = target_logits.argmax(dim=-1, keepdim=True)
    top = target_logits.gather(1, argmax_id).squeeze(1)
    has_max = top.isfinite()
    return torch.where(has_max, argmax_id.squeeze(1), 0).int(), has_max


def compute_draft_token_stats(
    target_probs: torch.Tensor,  # [num_tokens, vocab_size] float32
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab_size] or None
    draft_token_ids: torch.Tensor,  # [num_tokens]
    cu_num_draft_tokens: torch.Tensor,  # [batch_size]
    inverse_noise: torch.Tensor | None,  # [batch_size, vocab_size] or None
    policy: Policy,
    argmax_id: torch.Tensor,  # [num_tokens] int32, from target_argmax(logits)
) -> DraftTokenStats:
    """Launch ``draft_token_stats_kernel`` (or its torch twin) over all drafted tokens."""
    num_tokens, vocab_size = target_probs.shape
    device = target_probs.device
    token_request_ids = None
    recovered = None
    if inverse_noise is not None:
        # Request of each drafted token, without a host sync.
        token_ids = torch.arange(num_tokens, device=device, dtype=cu_num_draft_tokens.dtype)
        token_request_ids = torch.searchsorted(cu_num_draft_tokens, token_ids, right=True)
        recovered = torch.empty(num_tokens, dtype=torch.int32, device=device)
    outputs = dict(
        target_prob_of_draft=torch.empty(num_tokens, dtype=torch.float32, device=device),
        draft_prob_of_draft=torch.empty(num_tokens, dtype=torch.float32, device=device),
        target_max_prob=torch.empty(num_tokens, dtype=torch.float32, device=device),
        num_more_likely=(
            torch.empty(num_tokens, dtype=torch.int32, device=device) if policy == Policy.TOPK_TOLERANCE else None
        ),
        recovered_token_ids=recovered,
    )
    draft_token_stats_kernel[(num_tokens,)](
        target_probs=target_probs,
        draft_probs=draft_probs,
        draft_token_ids=draft_token_ids,
        token_request_ids=token_request_ids,
        inverse_noise=inverse_noise,
        **outputs,
        vocab_size=vocab_size,
        POLICY=int(policy),
        BLOCK_SIZE=min(VOCAB_BLOCK_SIZE, triton.next_power_of_2(vocab_size)),
    )
    return DraftTokenStats(target_argmax=argmax_id, **outputs)


def argmax_draft_token_stats(target_logits: torch.Tensor, draft_token_ids: torch.Tensor) -> DraftTokenStats:
    """The stats an all-greedy ``EXACT`` or ``RSTITCH`` batch needs, from the logits alone.

    Greedy exact verification only compares each draft with the target's
    argmax, so it skips the softmax and the stats kernel: one argmax pass.
    ``target_max_prob`` carries only whether the row has a distribution (1,
    or 0 for a row without a finite maximum: the walk rejects there). q(d) is
    the one-hot draft's: 1 for an id in [0, vocab), else 0 (RSTITCH keeps only
    real ids). p(d) is unused by these walks and left at 0.
    """
    argmax_id, has_max = target_argmax(target_logits)
    is_real = (draft_token_ids >= 0) & (draft_token_ids < target_logits.shape[-1])
    return DraftTokenStats(
        target_prob_of_draft=torch.zeros(argmax_id.shape, dtype=torch.float32, device=argmax_id.device),
        draft_prob_of_draft=is_real.float(),
        target_max_prob=has_max.float(),
        target_argmax=argmax_id,
        num_more_likely=None,
        recovered_token_ids=None,
    )


# --------------------------------------------------------------------------
# 2. Per request: the acceptance walk.
# --------------------------------------------------------------------------


# Runtime values that vary per step must not become specialisations.
@triton.jit(do_not_specialize=["max_spec_len", "topk_beta"])
def acceptance_walk_kernel(
    output_token_ids,  # out [batch_size, max_spec_len + 1] int32, pre-filled with -1
    num_accepted,  # out [batch_size] int32
    cu_num_draft_tokens,  # [batch_size]
    draft_token_ids,  # [num_tokens]
    target_prob_of_draft,  # [num_tokens] (DraftTokenStats ...)
    draft_prob_of_draft,
    target_max_prob,
    target_argmax,
    num_more_likely,  # or None unless POLICY is TOPK_TOLERANCE
    recovered_token_ids,  # [num_tokens], or None: all greedy
    uniform_probs,  # [num_tokens] float64, or None: all greedy
    confidence,  # [num_tokens] drafter confidence in [0, 1], or None: 0
    draft_entropy,  # [num_tokens] drafter entropy (nats), or None unless POLICY is RSTITCH
    is_greedy,  # [batch_size] bool, or None: all greedy
    bonus_token_ids,  # [batch_size]
    max_spec_len,
    leniency,
    confidence_floor,
    confidence_span,  # 1 - confidence_floor
    topk_beta,
    topk_tau,
    rstitch_entropy,
    POLICY: tl.constexpr,
):
    request = tl.program_id(0)
    if request == 0:
        start = tl.zeros([], dtype=cu_num_draft_tokens.dtype.element_ty)
    else:
        start = tl.load(cu_num_draft_tokens + request - 1)
    num_draft = tl.load(cu_num_draft_tokens + request) - start
    if is_greedy is not None:
        greedy = tl.load(is_greedy + request)
    out_row = output_token_ids + request * (max_spec_len + 1)

    rejected = False
    accepted_count = 0
    for pos in range(num_draft):
        if not rejected:
            token = start + pos
            draft_id = tl.load(draft_token_ids + token).to(tl.int32)
            p_draft = tl.load(target_prob_of_draft + token)
            p_max = tl.load(target_max_prob + token)
            argmax_id = tl.load(target_argmax + token)
            if POLICY == CONFIDENCE:
                conf = 0.0 if confidence is None else tl.load(confidence + token).to(tl.float32)
                scaled = (conf - confidence_floor) / confidence_span
                # `scaled > 0` is false for NaN: a NaN confidence means strict.
                delta = tl.where(scaled > 0, leniency * tl.minimum(scaled, 1.0), 0.0)

            if POLICY == TOPK_TOLERANCE:
                # Deterministic for greedy and random requests alike.
                more_likely = tl.load(num_more_likely + token)
                accepted = (
                    (p_draft > 0)
                    & (more_likely < topk_beta)
                    & (tl.log(p_draft) >= tl.log(p_max) - topk_tau)
                )
            else:
                accepted = draft_id == argmax_id
                if POLICY == CONFIDENCE:
                    near_top = (p_draft > 0) & (tl.log(p_draft) >= tl.log(p_max) - delta)
                    accepted = accepted | ((delta > 0) & near_top)
                # `is None` is decided at compile time: all-greedy batches
                # compile without the sampling branch.
                if is_greedy is not None:
                    if not greedy:
                        q_draft = tl.load(draft_prob_of_draft + token)
                        target = p_draft
                        if POLICY == CONFIDENCE:
                            target = p_draft * tl.exp(delta)
                        # u <= min(1, p e^delta / q), written as vLLM writes it so
                        # that EXACT (and delta = 0) round exactly like vLLM.
                        accepted = (q_draft > 0) & (target / q_draft >= tl.load(uniform_probs + token))
                if POLICY == RSTITCH:
                    # R-Stitch: the drafter's low-entropy tokens stand without
                    # the target's check (q(d) > 0: a real id, not padding;
                    # a NaN entropy fails the comparison and is checked).
                    entropy = tl.load(draft_entropy + token).to(tl.float32)
                    kept = (tl.load(draft_prob_of_draft + token) > 0) & (entropy < rstitch_entropy)
                    accepted = accepted | kept
            # A target row without a distribution (max p = 0) vouches for nothing.
            accepted = accepted & (p_max > 0)

            if accepted:
                out_token = draft_id
                accepted_count += 1
            else:
                rejected = True
                out_token = argmax_id
                if is_greedy is not None:
                    if not greedy:
                        out_token = tl.load(recovered_token_ids + token)
            tl.store(out_row + pos, out_token)

    if not rejected:
        tl.store(out_row + num_draft, tl.load(bonus_token_ids + request))
    tl.store(num_accepted + request, accepted_count)


def acceptance_walk_torch(
    output_token_ids,
    num_accepted,
    cu_num_draft_tokens,
    draft_token_ids,
    target_prob_of_draft,
    draft_prob_of_draft,
    target_max_prob,
    target_argmax,
    num_more_likely,
    recovered_token_ids,
    uniform_probs,
    confidence,
    draft_entropy,
    is_greedy,
    bonus_token_ids,
    max_spec_len,  # noqa: ARG001 -- the row width, output_token_ids.shape[1] here
    leniency,
    confidence_floor,
    confidence_span,
    topk_beta,
    topk_tau,
    rstitch_entropy,
    POLICY,
):
    """``acceptance_walk_kernel`` for all requests at once: decide every drafted
    token, then lay the decisions out as [batch, max_spec_len + 1] and keep
    each row's leading run of accepted tokens."""
    device = output_token_ids.device
    batch_size, width = output_token_ids.shape
    num_draft = torch.diff(cu_num_draft_tokens.long(), prepend=torch.zeros(1, dtype=torch.long, device=device))
    token_request = torch.repeat_interleave(num_draft)
    greedy = None if is_greedy is None else is_greedy[token_request]
    draft_ids = draft_token_ids.int()
    p_draft, p_max = target_prob_of_draft, target_max_prob

    def f32(scalar):
        # A 0-dim float32 tensor keeps the arithmetic in fp32, as in the kernel.
        return torch.tensor(scalar, dtype=torch.float32, device=device)

    if POLICY == Policy.CONFIDENCE:
        conf = torch.zeros_like(p_draft) if confidence is None else confidence.float()
        scaled = (conf - f32(confidence_floor)) / f32(confidence_span)
        delta = torch.where(scaled > 0, f32(leniency) * scaled.clamp(max=1.0), 0.0)

    if POLICY == Policy.TOPK_TOLERANCE:
        accepted = (p_draft > 0) & (num_more_likely < topk_beta) & (p_draft.log() >= p_max.log() - f32(topk_tau))
    else:
        accepted = draft_ids == target_argmax
        if POLICY == Policy.CONFIDENCE:
            near_top = (p_draft > 0) & (p_draft.log() >= p_max.log() - delta)
            accepted |= (delta > 0) & near_top
        if greedy is not None:
            target = p_draft * delta.exp() if POLICY == Policy.CONFIDENCE else p_draft
            q_draft = draft_prob_of_draft
            random_accepted = (q_draft > 0) & (target / q_draft >= uniform_probs)
            accepted = torch.where(greedy, accepted, random_accepted)
        if POLICY == Policy.RSTITCH:
            accepted |= (draft_prob_of_draft > 0) & (draft_entropy.float() < f32(rstitch_entropy))
    accepted &= p_max > 0  # a target row without a distribution vouches for nothing
    replacement = target_argmax if greedy is None else torch.where(greedy, target_argmax, recovered_token_ids)

    # Row-major order of `in_draft` is the flat token order, so boolean-mask
    # assignment scatters per-token values into their (request, position).
    positions = torch.arange(width, device=device)
    in_draft = positions < num_draft.unsqueeze(1)

    def as_grid(values, fill):
        grid = torch.full((batch_size, width), fill, dtype=values.dtype, device=device)
        grid[in_draft] = values
        return grid

    count = as_grid(accepted, False).int().cumprod(dim=1).sum(dim=1)
    last = torch.where(
        count < num_draft,
        as_grid(replacement.int(), PLACEHOLDER_TOKEN_ID).gather(1, count.unsqueeze(1)).squeeze(1),
        bonus_token_ids.reshape(-1).int(),
    )
    keep = positions < count.unsqueeze(1)
    output_token_ids.copy_(torch.where(keep, as_grid(draft_ids, PLACEHOLDER_TOKEN_ID), output_token_ids))
    output_token_ids.scatter_(1, count.unsqueeze(1), last.unsqueeze(1))
    num_accepted.copy_(count)


def walk_acceptance(
    stats: DraftTokenStats,
    *,
    draft_token_ids: torch.Tensor,  # [num_tokens]
    cu_num_draft_tokens: torch.Tensor,  # [batch_size]
    bonus_token_ids: torch.Tensor,  # [batch_size] or [batch_size, 1]
    uniform_probs: torch.Tensor | None,  # [num_tokens] float64, None when all greedy
    is_greedy: torch.Tensor | None,  # [batch_size] bool, None when all greedy
    max_spec_len: int,
    params: PolicyParams,
    confidence: torch.Tensor | None,  # [num_tokens] in [0, 1]; None = 0 (strict); CONFIDENCE only
    draft_entropy: torch.Tensor | None,  # [num_tokens] nats; None = +inf (checked); RSTITCH only
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``acceptance_walk_kernel`` (or its torch twin), one program per request.

    Returns ``(output_token_ids [batch, max_spec_len + 1] int32 with -1 after
    each row's last token, num_accepted [batch] int32)``.
    """
    batch_size = cu_num_draft_tokens.shape[0]
    device = draft_token_ids.device
    policy = params.policy
    if policy == Policy.RSTITCH and draft_entropy is None:
        # No entropy known: nothing is kept unchecked (RSTITCH == EXACT).
        draft_entropy = torch.full(draft_token_ids.shape, float("inf"), device=device)
    elif policy != Policy.RSTITCH:
        draft_entropy = None
    output_token_ids = torch.full(
        (batch_size, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device
    )
    num_accepted = torch.empty(batch_size, dtype=torch.int32, device=device)
    acceptance_walk_kernel[(batch_size,)](
        output_token_ids=output_token_ids,
        num_accepted=num_accepted,
        cu_num_draft_tokens=cu_num_draft_tokens,
        draft_token_ids=draft_token_ids,
        **stats._asdict(),
        uniform_probs=uniform_probs,
        confidence=confidence if policy == Policy.CONFIDENCE else None,
        draft_entropy=draft_entropy,
        is_greedy=is_greedy,
        bonus_token_ids=bonus_token_ids,
        max_spec_len=max_spec_len,
        leniency=params.leniency,
        confidence_floor=params.confidence_floor,
        # On the host: arithmetic between two scalar arguments inside a kernel
        # rounds in fp32 when compiled but in fp64 under TRITON_INTERPRET.
        confidence_span=1.0 - params.confidence_floor,
        topk_beta=params.topk_beta,
        topk_tau=params.topk_tau,
        rstitch_entropy=params.rstitch_entropy,
        POLICY=int(policy),
    )
    return output_token_ids, num_accepted


# Every kernel with its torch twin. This keeps the kernel objects themselves:
# they stay reachable here after vLLM's dispatcher rebinds the module names.
KERNELS_AND_TWINS = (
    (draft_token_stats_kernel, draft_token_stats_torch),
    (acceptance_walk_kernel, acceptance_walk_torch),
)
