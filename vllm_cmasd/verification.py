"""CM-ASD verification: vLLM's rejection sampler with a choice of acceptance policy.

``CmasdRejectionSampler`` takes the place of vLLM's ``RejectionSampler`` in the
model runner. Everything around verification (bonus tokens, logits
processors, temperature/top-k/top-p, logprobs) is vLLM's own code; only the
accept/reject step is CM-ASD's, :func:`cmasd_rejection_sample`, which runs the
two kernels of :mod:`vllm_cmasd.kernels.verify`. Policies and their equations:
docs/verification.md.

Random numbers are drawn exactly as vLLM draws them (same calls, same order,
same per-request generators), so with the ``exact`` policy a seeded request
produces vLLM's tokens, and every policy is reproducible under a seed. A step
without drafts draws as plain decoding does: it skips the global generator's
draw vLLM's verifier makes for no drafts, which only seedless requests read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import (
    GREEDY_TEMPERATURE,
    MAX_SPEC_LEN,
    RejectionSampler,
    apply_sampling_constraints,
    generate_uniform_probs,
)
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from vllm_cmasd.config import CmasdConfig
from vllm_cmasd.kernels.verify import (
    argmax_draft_token_stats,
    compute_draft_token_stats,
    target_argmax,
    walk_acceptance,
)
from vllm_cmasd.policies import Policy, PolicyParams


def sample_inverse_exponential_noise(
    num_draft_tokens: list[int],
    vocab_size: int,
    generators: dict[int, torch.Generator],
    device: torch.device,
    use_fp64_gumbel: bool = False,
) -> torch.Tensor:
    """1 / E, E ~ Exp(1), per request and vocabulary entry: [batch, vocab].

    Drawn with the same calls in the same order as vLLM's
    ``sample_recovered_tokens``, which does not expose this step on its own.
    """
    dtype = torch.float64 if use_fp64_gumbel else torch.float32
    noise = torch.empty((len(num_draft_tokens), vocab_size), dtype=dtype, device=device)
    noise.exponential_()
    for request, generator in generators.items():
        # A request without drafts leaves its generator untouched, as in vLLM.
        if num_draft_tokens[request] > 0:
            noise[request].exponential_(generator=generator)
    return noise.reciprocal_()


def cmasd_rejection_sample(
    *,
    draft_token_ids: torch.Tensor,  # [num_tokens]
    num_draft_tokens: list[int],  # [batch_size]
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,  # [batch_size]
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab_size]; None = one-hot drafts
    target_logits: torch.Tensor,  # [num_tokens, vocab_size], after sampling constraints
    bonus_token_ids: torch.Tensor,  # [batch_size, 1]
    sampling_metadata: SamplingMetadata,
    policy_params: PolicyParams,
    confidence: torch.Tensor | None = None,  # [num_tokens] in [0, 1]; confidence only, None = 0 (strict)
    draft_entropy: torch.Tensor | None = None,  # [num_tokens] nats; rstitch only, None = +inf
    use_fp64_gumbel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``rejection_sample`` with a CM-ASD acceptance policy.

    Returns ``output_token_ids`` [batch, max_spec_len + 1] int32 (accepted
    drafts, then the recovered or bonus token, then -1) and ``num_accepted``
    [batch] int32 (accepted drafted tokens per request).

    Non-finite target logits do not raise: their probabilities count as 0,
    and a row without a finite maximum rejects its draft under every policy
    and emits an in-vocabulary token (token 0). Greedy requests take the
    logits' argmax in every batch and policy, as vLLM's greedy sampler does.
    """
    num_tokens, vocab_size = target_logits.shape
    assert draft_token_ids.shape == (num_tokens,) and draft_token_ids.is_contiguous()
    assert draft_probs is None or (draft_probs.shape == target_logits.shape and draft_probs.is_contiguous())
    assert confidence is None or (confidence.shape == (num_tokens,) and confidence.is_contiguous())
    assert draft_entropy is None or (draft_entropy.shape == (num_tokens,) and draft_entropy.is_contiguous())
    assert cu_num_draft_tokens.shape == (len(num_draft_tokens),)
    assert bonus_token_ids.is_contiguous()
    device = target_logits.device

    is_greedy = uniform_probs = inverse_noise = None
    if not sampling_metadata.all_greedy:
        is_greedy = sampling_metadata.temperature == GREEDY_TEMPERATURE
        # Uniforms first, then noise: vLLM's order, so generators stay in step.
        uniform_probs = generate_uniform_probs(
            num_tokens, num_draft_tokens, sampling_metadata.generators, device
        )
        inverse_noise = sample_inverse_exponential_noise(
            num_draft_tokens, vocab_size, sampling_metadata.generators, device, use_fp64_gumbel
        )

    # Greedy exact and R-Stitch walks read only the target's argmax (and
    # whether a draft id is real).
    if policy_params.policy in (Policy.EXACT, Policy.RSTITCH) and sampling_metadata.all_greedy:
        stats = argmax_draft_token_stats(target_logits, draft_token_ids)
    else:
        target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
        stats = compute_draft_token_stats(
            target_probs, draft_probs, draft_token_ids, cu_num_draft_tokens, inverse_noise, policy_params.policy,
            argmax_id=target_argmax(target_logits)[0],
        )
    return walk_acceptance(
        stats,
        draft_token_ids=draft_token_ids,
        cu_num_draft_tokens=cu_num_draft_tokens,
        bonus_token_ids=bonus_token_ids,
        uniform_probs=uniform_probs,
        is_greedy=is_greedy,
        max_spec_len=max_spec_len,
        params=policy_params,
        confidence=confidence,
        draft_entropy=draft_entropy,
    )


class CmasdRejectionSampler(RejectionSampler):
    """vLLM's rejection sampler, verifying with :func:`cmasd_rejection_sample`.

    ``signal_source(name, metadata)`` returns a drafter signal per drafted
    token ("confidence" in [0, 1], or "entropy" in nats for R-Stitch), in
    ``metadata.draft_token_ids`` order, or None when there is none.
    ``last_num_accepted`` holds the latest step's accepted count per request;
    ``outcome_sink(metadata, num_accepted)``, if given, hears it after every
    verification (the draft budget's acceptance history).
    """

    def __init__(
        self,
        sampler,
        spec_config,
        device: torch.device | None,
        cmasd_config: CmasdConfig,
        signal_source: Callable[[str, SpecDecodeMetadata], torch.Tensor | None],
        outcome_sink: Callable[[SpecDecodeMetadata, torch.Tensor], None] | None = None,
    ):
        super().__init__(sampler, spec_config, device)
        self.policy_params = PolicyParams.from_config(cmasd_config)
        self.signal_source = signal_source
        self.outcome_sink = outcome_sink
        self.last_num_accepted: torch.Tensor | None = None

    def forward(
        self,
        metadata: SpecDecodeMetadata,
        draft_probs: torch.Tensor | None,
        logits: torch.Tensor,
        sampling_metadata: SamplingMetadata,
    ) -> SamplerOutput:
        assert metadata.max_spec_len <= MAX_SPEC_LEN
        if metadata.max_spec_len == 0:
            return self._sample_without_drafts(metadata, logits, sampling_metadata)
        # The steps around verification follow RejectionSampler.forward.
        bonus_output = self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
            predict_bonus_token=True,
            # Logits, not logprobs: the accepted tokens' logprobs are computed below.
            logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode else "raw_logits",
        )
        # Indexing copies, so the processors below may work in place.
        raw_target_logits = logits[metadata.target_logits_indices].to(torch.float32)
        target_logits = raw_target_logits if self.is_processed_logprobs_mode else raw_target_logits.clone()
        target_logits = self.apply_logits_processors(target_logits, sampling_metadata, metadata)
        # vLLM builds spec-decode metadata for every step of a speculative
        # engine, also when no request drafted (a prefill step, or every draft
        # stopped at length 0); its CPU top-k path fails on an empty batch.
        if target_logits.shape[0] > 0:
            target_logits = apply_sampling_constraints(target_logits, metadata.cu_num_draft_tokens, sampling_metadata)

        policy = self.policy_params.policy
        output_token_ids, self.last_num_accepted = cmasd_rejection_sample(
            draft_token_ids=metadata.draft_token_ids,
            num_draft_tokens=metadata.num_draft_tokens,
            max_spec_len=metadata.max_spec_len,
            cu_num_draft_tokens=metadata.cu_num_draft_tokens,
            draft_probs=draft_probs,
            target_logits=target_logits,
            bonus_token_ids=bonus_output.sampled_token_ids,
            sampling_metadata=sampling_metadata,
            policy_params=self.policy_params,
            confidence=self.signal_source("confidence", metadata) if policy == Policy.CONFIDENCE else None,
            draft_entropy=self.signal_source("entropy", metadata) if policy == Policy.RSTITCH else None,
            use_fp64_gumbel=self.use_fp64_gumbel,
        )
        if self.outcome_sink is not None:
            self.outcome_sink(metadata, self.last_num_accepted)

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs,
                metadata,
                logits,
                target_logits if self.is_processed_logprobs_mode else raw_target_logits,
                bonus_output.logprobs_tensors.logprobs,
                output_token_ids,
            )
        return SamplerOutput(sampled_token_ids=output_token_ids, logprobs_tensors=logprobs_tensors)

    def _sample_without_drafts(
        self, metadata: SpecDecodeMetadata, logits: torch.Tensor, sampling_metadata: SamplingMetadata
    ) -> SamplerOutput:
        """A step on which no request drafted (the controller skipped the drafter):
        vLLM still sends every step of a speculative engine through verification,
        whose fixed work (the bonus sampler, logits copies, the kernels' launches
        on empty drafts) cost ~0.9 ms a step on CPU at 8 requests, against 0.15 ms
        for plain decoding's sampler. With no drafts the step is plain decoding:
        one logits row per request and the same sampler, generators and
        logprobs, so plain decoding's sampler gives the same tokens."""
        assert logits.shape[0] == len(metadata.num_draft_tokens)
        output = self.sampler(logits=logits, sampling_metadata=sampling_metadata)
        self.last_num_accepted = torch.zeros(logits.shape[0], dtype=torch.int32, device=logits.device)
        if self.outcome_sink is not None:
            self.outcome_sink(metadata, self.last_num_accepted)
        return output
