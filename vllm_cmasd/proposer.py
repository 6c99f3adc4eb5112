"""The CM-ASD proposer: vLLM's draft-model proposer with a confidence window.

vLLM's drafting loop (``SpecDecodeBaseProposer.propose``) runs the drafter on
vLLM's paged KV cache and batch, one position at a time, and asks
``_sample_draft_tokens`` for each position's tokens. We keep that loop and
hook the per-position sampling: there we score the drafter's confidence,
decide per request whether its draft goes on, and end the loop early, by
raising :class:`_DraftingFinished`, once no request is still drafting.

Each request ends up with its own draft length in [k_min, k_max]; the
proposer returns ``list[list[int]]`` (one draft per request), which vLLM's
scheduler takes as variable-length drafts and schedules (and verifies) as
they are.
"""

from __future__ import annotations

import torch

from vllm.distributed import get_tp_group
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_cmasd.config import CmasdConfig
from vllm_cmasd.confidence import unified_confidence
from vllm_cmasd.metrics import DraftStats


class _DraftingFinished(Exception):
    """Ends vLLM's drafting loop early: every request has stopped drafting."""


class DraftWindow:
    """Per-request draft length from the running confidence signal.

    Every token a request drafts is proposed: by the time its confidence is
    known, its drafter pass is paid, and verifying one more token costs the
    memory-bound target almost nothing. The confidence decides whether the
    request drafts *another* token: it goes on while it has fewer than k_min
    tokens or its stop signal (running product or running mean of the
    confidences of positions 0..j) is at least ``threshold``, and stops at
    k_max.
    """

    def __init__(self, batch_size: int, config: CmasdConfig, device: torch.device):
        self.config = config
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.confidences: list[torch.Tensor] = []
        self.signal = torch.ones(batch_size, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.drafting = torch.ones(batch_size, dtype=torch.bool, device=device)

    def add(
        self, tokens: torch.Tensor, probs: torch.Tensor | None, confidence: torch.Tensor
    ) -> bool:
        """Record one drafted position; returns whether any request drafts on."""
        position = len(self.tokens)
        if self.config.stop_rule == "product":
            self.signal = self.signal * confidence
        else:  # running mean
            self.signal = (self.signal * position + confidence) / (position + 1)
        self.lengths += self.drafting
        goes_on = (position + 1 < self.config.k_min) | (self.signal >= self.config.threshold)
        self.drafting &= goes_on & (position + 1 < self.config.k_max)
        self.tokens.append(tokens)
        self.confidences.append(confidence)
        if probs is not None:
            self.probs.append(probs)
        # One host sync per drafted position: the loop must know whether to go on.
        return bool(self.drafting.any())


class CmasdProposer(DraftModelProposer):
    """Draft-model proposer whose drafts stop where the drafter's confidence does."""

    def __init__(self, vllm_config, device: torch.device, runner, config: CmasdConfig):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.config = config
        self.runner = runner
        self.stats = DraftStats(config.k_max)
        self._window: DraftWindow | None = None
        # Kept from the last propose() for verification of those drafts.
        self._confidence_rows: torch.Tensor | None = None
        self._confidence_req_ids: list[str] = []

    def _maybe_share_lm_head(self, target_language_model) -> None:
        # vLLM's draft-model proposer shares nothing with the target; a
        # self-draft (SpecBound, vllm_cmasd/self_draft.py) is the target's own
        # first layers and LM head, so it takes all its weights from it.
        super()._maybe_share_lm_head(target_language_model)
        from vllm_cmasd import self_draft

        if self_draft.is_self_draft(self.model):
            self_draft.share_target_weights(self.model, target_language_model)

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        logits = self.model.compute_logits(hidden_states)
        # Greedy drafting unless draft_sample_method="probabilistic"; then the
        # draft distribution comes back too, for lossless verification.
        tokens, probs = self._sample_from_logits(logits, sampling_metadata)
        assert self._window is not None
        # Every tensor-parallel rank runs this loop, and CPU reductions may
        # round differently per thread count: rank 0's confidences decide for
        # all, so the ranks stop together (each draft pass holds collectives).
        confidence = get_tp_group().broadcast(unified_confidence(logits, self.config).contiguous(), src=0)
        if not self._window.add(tokens, probs, confidence):
            raise _DraftingFinished
        return tokens, probs

    def propose(self, num_speculative_tokens, *args, **kwargs) -> list[list[int]]:
        batch_size = kwargs["common_attn_metadata"].batch_size()
        window = self._window = DraftWindow(batch_size, self.config, self.device)
        try:
            super().propose(min(num_speculative_tokens, self.config.k_max), *args, **kwargs)
        except _DraftingFinished:
            pass
        finally:
            self._window = None

        tokens = torch.stack(window.tokens, dim=1).tolist()
        lengths = window.lengths.tolist()
        self._last_draft_probs = torch.stack(window.probs, dim=1) if window.probs else None
        self._confidence_rows = torch.stack(window.confidences, dim=1)
        self._confidence_req_ids = list(self.runner.input_batch.req_ids)
        self.stats.record_drafts(lengths)
        return [row[:n] for row, n in zip(tokens, lengths)]

    def confidence_for(self, req_ids: list[str], num_draft_tokens: list[int]) -> torch.Tensor | None:
        """Confidence of each drafted token being verified, flattened in batch order.

        The batch may have been reordered since the drafts were proposed, so
        rows are looked up by request id; the scheduler may also have cut a
        draft short, so only the first ``n`` confidences of a row are used.
        """
        if self._confidence_rows is None:
            return None
        row_of = {req_id: i for i, req_id in enumerate(self._confidence_req_ids)}
        parts = []
        for i, n in enumerate(num_draft_tokens):
            if n == 0:
                continue
            row = row_of.get(req_ids[i]) if i < len(req_ids) else None
            if row is None:  # e.g. vLLM's warm-up batch: verify it strictly
                parts.append(torch.zeros(n, device=self._confidence_rows.device))
            else:
                parts.append(self._confidence_rows[row, :n])
        return torch.cat(parts) if parts else None
