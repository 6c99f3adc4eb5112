"""The CM-ASD proposers: vLLM's draft-model and EAGLE-3 proposers with a confidence window.

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

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm.distributed import get_tp_group
from vllm.logger import init_logger
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.eagle import EagleProposer

from vllm_cmasd.budget import (
    AcceptanceHistory,
    CostModel,
    DraftingRuns,
    MeasuredCosts,
    StepBudget,
    expected_draft,
    profile_costs,
)
from vllm_cmasd.calibration import CALIBRATION_FILE, AcceptanceCalibration
from vllm_cmasd.catchup import CatchUpPlan, DirtySlots, DrafterLag, token_slots, with_catch_up
from vllm_cmasd.config import CmasdConfig, CmasdConfigError
from vllm_cmasd.confidence import entropy as drafter_entropy
from vllm_cmasd.confidence import unified_confidence
from vllm_cmasd.metrics import DraftStats

logger = init_logger(__name__)

# With the draft budget, a step drafts after at most this many steps in a row
# without a drafter pass: acceptance is only measured where drafts are
# verified, and a history that stops updating would keep the drafter off;
# while exploring finds nothing the rule then drafts for, the interval
# doubles, up to MAX_EXPLORE_EVERY (at 32 streams a fixed one spent up to
# 5.5% of the time on passes that changed nothing: controller notes, Step 10) ...
EXPLORE_EVERY = 8
MAX_EXPLORE_EVERY = 64
# ... but that exploring pass may cost at most this share of the target's step
# for the tokens it schedules, every token it runs at full price: it runs the
# catch-ups that fit in what is left, cheapest first, and splits the next one.
EXPLORE_MAX_COST = 0.5
# A first pass's tokens beyond a decode step's (a prefill, a catch-up) write
# drafter KV for the request's later steps: priced per step over the steps it
# may still run and is expected to go on drafting (budget.DraftingRuns), at
# most this many (a request may stop early at its EOS).
MAX_HORIZON = 64


class _DraftingFinished(Exception):
    """Ends vLLM's drafting loop early: every request has stopped drafting."""


class DraftWindow:
    """Per-request draft length, decided position by position while drafting.

    Every token a request drafts is proposed once its pass has run; what is
    decided per position is whether the token is kept and whether the request
    drafts *another* one.

    * ``draft_length="controller"`` (with a :class:`~vllm_cmasd.budget.StepBudget`):
      a token is kept only where the budget admits it by its survival (the
      product of the calibrated acceptances of the request's drafted tokens so
      far, calibration.py) against its marginal verification cost, and the
      request drafts on only where the next drafter pass also pays.
    * ``draft_length="window"``: the paper's window. A request goes on while it
      has fewer than k_min tokens or its stop signal (running product or
      running mean of the confidences of positions 0..j) is at least
      ``threshold``; with ``draft_budget="auto"`` the budget's rule applies on
      top (k_min still holds).

    Every request stops at k_max.
    """

    def __init__(
        self,
        batch_size: int,
        config: CmasdConfig,
        device: torch.device,
        budget: StepBudget | None = None,
        calibration: AcceptanceCalibration | None = None,
        drafting: torch.Tensor | None = None,
    ):
        self.config = config
        self.budget = budget
        self.calibration = calibration
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.confidences: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []
        self.signal = torch.ones(batch_size, device=device)
        self.survival = torch.ones(batch_size, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        # Requests may start out not drafting (their drafter KV lags: catchup.py).
        self.drafting = torch.ones(batch_size, dtype=torch.bool, device=device) if drafting is None else drafting

    def add(
        self,
        tokens: torch.Tensor,
        probs: torch.Tensor | None,
        confidence: torch.Tensor,
        entropy: torch.Tensor | None = None,
    ) -> bool:
        """Record one drafted position; returns whether any request drafts on."""
        position = len(self.tokens)
        if self.config.draft_length == "controller":
            goes_on = self.drafting.clone()
        else:
            if self.config.stop_rule == "product":
                self.signal = self.signal * confidence
            else:  # running mean
                self.signal = (self.signal * position + confidence) / (position + 1)
            goes_on = ((position + 1 < self.config.k_min) | (self.signal >= self.config.threshold)) & self.drafting
        if self.budget is not None:
            assert self.calibration is not None
            acceptance = self.calibration.predict(confidence)
            self.survival = self.survival * acceptance
            self._apply_budget(position, acceptance, goes_on)
        self.lengths += self.drafting
        self.drafting &= goes_on & (position + 1 < self.config.k_max)
        self.tokens.append(tokens)
        self.confidences.append(confidence)
        if entropy is not None:
            self.entropies.append(entropy)
        if probs is not None:
            self.probs.append(probs)
        # One host sync per drafted position: the loop must know whether to go on.
        return bool(self.drafting.any())

    def _apply_budget(self, position: int, acceptance: torch.Tensor, goes_on: torch.Tensor) -> None:
        """Narrow ``drafting`` (keep this token) and ``goes_on`` (draft another) to
        what pays; the first ``min_draft`` tokens are kept and drafted regardless."""
        assert self.budget is not None
        min_draft = self.config.min_draft
        kept = self.budget.admit(self.survival.tolist(), self.drafting.tolist(), force=position < min_draft)
        candidates = [k and g for k, g in zip(kept, goes_on.tolist())]
        more = [False] * len(kept)
        if position + 1 < self.config.k_max and any(candidates):
            # The next token survives if this draft does and it is accepted:
            # its acceptance is predicted to be this position's.
            more = self.budget.another_pass(
                (self.survival * acceptance).tolist(), candidates, force=position + 1 < min_draft
            )
        device = self.drafting.device
        self.drafting &= torch.tensor(kept, device=device)
        goes_on &= torch.tensor(more, device=device)


def _slots(block_table: np.ndarray, block_size: int, rows, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """KV slots of positions ``starts .. ends - 1`` of the batch's ``rows`` (its host block table)."""
    return token_slots(block_table[rows], block_size, starts, ends)


@dataclass
class _StepDecision:
    """What a step's decision found, for its drafting (:meth:`CmasdProposerMixin._draft`)."""

    start: float  # when the step's drafter work began
    decided: float  # when it was decided: vLLM's input preparation, which runs after, is drafting's cost
    req_ids: list[str]
    num_computed: np.ndarray
    query_lens: np.ndarray
    slots: Callable[..., np.ndarray]  # _slots over this step's block table
    plan: CatchUpPlan
    drafts: np.ndarray  # bool per request


class CmasdProposerMixin:
    """vLLM's drafting loop with CM-ASD's window, signals and controller; one
    implementation for both proposer families (:class:`CmasdProposer`,
    :class:`CmasdEagleProposer`), which differ only in ``CATCH_UP_NEEDS_HIDDEN_STATES``."""

    # A step where no request drafts skips the drafter's first pass, which a
    # later step catches up (catchup.py). A draft model's catch-up needs only
    # the committed tokens. An EAGLE head's KV at position p is a function of
    # the target's hidden states at p, which the runner drops after each step:
    # they are kept, per KV slot, for the tokens the head has not run.
    CATCH_UP_NEEDS_HIDDEN_STATES: bool

    def __init__(self, vllm_config, device: torch.device, runner, config: CmasdConfig):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.config = config
        self.runner = runner
        self.stats = DraftStats(config.k_max)
        # The draft budget's costs: profiled at engine start (prepare_costs), then measured.
        self.costs: MeasuredCosts | None = None
        self._step_end: float | None = None  # when this proposer last returned
        # The last step's drafting (tokens, more passes, batch, seconds, a decode
        # step?, tokens beyond a decode step's), not yet observed.
        self._drafting_measured: tuple[int, int, int, float, bool, int] | None = None
        self._window: DraftWindow | None = None
        self._decision: _StepDecision | None = None  # decided before vLLM's input preparation (decide)
        # For verification of the drafts: per request id, each drafted
        # position's confidence (and entropy), from its latest propose(). Kept
        # per request, not per batch: a request's drafts are verified on its
        # next scheduled step, which need not be the next step of the engine.
        # Oldest first, at most 4 x max_num_seqs entries.
        self._signals: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._max_signal_rows = 4 * vllm_config.scheduler_config.max_num_seqs
        # Skipping the drafter where drafting does not pay (draft_budget="auto"),
        # and what that leaves behind: catchup.py.
        self.lag = DrafterLag(max_tracked=self._max_signal_rows)
        self.dirty = DirtySlots(keep_hidden_states=self.CATCH_UP_NEEDS_HIDDEN_STATES)
        self.acceptance = AcceptanceHistory(max_tracked=self._max_signal_rows)
        self.runs = DraftingRuns(prior_run=MAX_HORIZON)
        self.calibration = self._warm_start(vllm_config.speculative_config.draft_model_config.model)
        self._skipped_in_a_row = 0
        self._explore_every = EXPLORE_EVERY
        # Off (None) unless someone asks (the demo's --show): per request id, each
        # step's (tokens emitted, drafted, accepted), from vllm_patch._with_report.
        self.trace: dict[str, list[tuple[int, int, int]]] | None = None
        self.step_outcomes: dict[str, tuple[int, int]] = {}

    def _warm_start(self, draft_dir: str) -> AcceptanceCalibration:
        """The calibration's starting point for this engine's verification policy."""
        setting = self.config.calibration
        path = Path(draft_dir) / CALIBRATION_FILE if setting == "auto" else None if setting == "none" else Path(setting)
        if path is not None and path.is_file():
            fitted = AcceptanceCalibration.from_file(path, self.config.verification)
            if fitted is not None:
                logger.info("CM-ASD: calibration warm start for %r from %s", self.config.verification, path)
                return fitted
        if setting not in ("auto", "none"):
            raise CmasdConfigError(
                f"cmasd.calibration: {setting} has no calibration for verification "
                f"{self.config.verification!r}; use 'auto', 'none' or a file that has one"
            )
        return AcceptanceCalibration()

    def prepare_costs(self) -> None:
        """The budget's cost model, profiled once, after vLLM's warm-up
        (``vllm_patch`` calls this at engine start on every worker).

        Not at load time: with torch.compile on, the models' first forwards
        belong to vLLM (compilation with dynamic shapes, CUDA-graph capture);
        after its warm-up everything runs as it will when serving. Not on the
        first step either: that request's first token waited for it (2.4 s
        with k_max 8 on a 2-core CPU).
        """
        if self.config.measures_costs and self.costs is None:
            self.costs = MeasuredCosts(self._profile_costs())

    def _profile_costs(self) -> CostModel:
        scheduler = self.vllm_config.scheduler_config
        # The most tokens one verification step can hold.
        max_tokens = min(scheduler.max_num_seqs * (self.config.k_max + 1), scheduler.max_num_batched_tokens)
        start = time.perf_counter()
        costs = profile_costs(self.runner, self, max_tokens)
        logger.info(
            "CM-ASD draft budget: cost model profiled in %.1f s (tokens, target s, draft s): %s",
            time.perf_counter() - start, costs,
        )
        return costs

    def _maybe_share_lm_head(self, target_language_model) -> None:
        # vLLM's draft-model proposer shares nothing with the target; a
        # self-draft (SpecBound, vllm_cmasd/self_draft.py) is the target's own
        # first layers and LM head, so it takes all its weights from it.
        super()._maybe_share_lm_head(target_language_model)
        from vllm_cmasd import self_draft

        if self_draft.is_self_draft(self.model):
            self_draft.share_target_weights(self.model, target_language_model)

    def _reduced_logits(self, hidden_states) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A reduced-vocabulary drafter's (kept tokens' logits, full-vocabulary
        logits with -inf elsewhere); None for a full-vocabulary one."""
        if not hasattr(self.model, "compute_small_logits"):
            return None
        small = self.model.compute_small_logits(hidden_states)
        return small, self.model.expand_small_logits(small)

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        reduced = self._reduced_logits(hidden_states)
        if reduced is not None:
            # Its signals come from the kept tokens' logits (the others are -inf
            # and add nothing): 6x fewer columns to reduce than the
            # full-vocabulary logits sampling needs (SmolLM2: 8,192 of 49,152;
            # on the head 0.55 ms a pass at batch 1 over the full row).
            signal_logits, logits = reduced
        else:
            logits = signal_logits = self.model.compute_logits(hidden_states)
        assert self._window is not None
        # Signals first: sampling below may divide the logits by the
        # temperature in place (draft_sample_method="probabilistic"), and the
        # signals are defined on the raw logits. Every tensor-parallel rank
        # runs this loop, and CPU reductions may round differently per thread
        # count: rank 0's signals decide for all, so the ranks stop (and
        # verify) together.
        tp_group = get_tp_group()
        vocab_size = logits.shape[-1]
        confidence = tp_group.broadcast(unified_confidence(signal_logits, self.config, vocab_size).contiguous(), src=0)
        entropy = None
        if self.config.verification == "rstitch":
            entropy = tp_group.broadcast(drafter_entropy(signal_logits).contiguous(), src=0)
        # Greedy drafting unless draft_sample_method="probabilistic"; then the
        # draft distribution comes back too, for lossless verification.
        tokens, probs = self._sample_from_logits(logits, sampling_metadata)
        if not self._window.add(tokens, probs, confidence, entropy):
            raise _DraftingFinished
        return tokens, probs

    def decide(self, common_attn_metadata, target_hidden_states: torch.Tensor | None) -> bool:
        """Whether the drafter runs this step, decided before vLLM prepares its
        inputs: ``vllm_patch`` asks first, and on a step where no request drafts
        vLLM's next-token and input preparation (0.8 ms a step at 32 requests
        on a 2-core CPU) does not run either; the skip is done here.
        ``target_hidden_states``: the target's rows for this step's tokens, what
        vLLM hands the drafter (kept for a head's catch-ups; None for a draft model)."""
        start = time.perf_counter()
        self._decision = self._decide(common_attn_metadata, target_hidden_states, start)
        if self._decision is None:
            self._end_step(start)
        return self._decision is not None

    def propose(self, num_speculative_tokens, **kwargs) -> list[list[int]]:
        cad = kwargs["common_attn_metadata"]
        # Not decided before vLLM's input preparation: decide now.
        if self._decision is None and not self.decide(cad, kwargs.get("target_hidden_states")):
            return [[] for _ in range(cad.batch_size())]
        decision, self._decision = self._decision, None
        drafts = self._draft(decision, num_speculative_tokens, kwargs)
        self._end_step(decision.start)
        return drafts

    def _end_step(self, start: float) -> None:
        self._step_end = time.perf_counter()
        self.stats.drafter_seconds += self._step_end - start

    def _decide(self, cad, target_hidden_states: torch.Tensor | None, start: float) -> _StepDecision | None:
        """The step's costs observed, who drafts decided; None: no drafter pass (the skip is recorded)."""
        batch_size = cad.batch_size()
        if self.costs is not None and self._step_end is not None:
            # Decode steps only: a prefill's big batched matmuls cost far less
            # per token than verifying drafts, and would set the slope.
            decoding = cad.max_query_len <= self.config.k_max + 1
            self._observe_costs(cad.num_actual_tokens, start - self._step_end, target_sample=decoding,
                                batch_size=batch_size, verified_drafts=cad.num_actual_tokens > batch_size)
        batch = self.runner.input_batch
        req_ids = list(batch.req_ids[:batch_size])
        # Tokens whose KV the target holds before this step (not yet advanced by it).
        num_computed = batch.num_computed_tokens_cpu[:batch_size].copy()
        query_lens = cad.query_start_loc_cpu.diff().numpy()
        table = batch.block_table[self.kv_cache_gid]
        slots = functools.partial(_slots, table.block_table.np[:batch_size], table.block_size)

        # The target writes this step's tokens' KV: stale for the drafter unless its pass below runs them.
        self.dirty.target_wrote(slots(slice(None), num_computed, num_computed + query_lens), target_hidden_states)

        def first_stale(i: int) -> int:
            # Cached or recomputed tokens: the drafter's KV is stale from the first dirty slot
            stale = self.dirty.first_dirty(slots(slice(i, i + 1), np.zeros(1, dtype=np.int64), num_computed[i : i + 1]))
            if self.CATCH_UP_NEEDS_HIDDEN_STATES:
                # and on a head, at the last cached position, written with the next token of the
                # request that wrote it (vllm_patch keeps that block: disable_eagle_block_drop).
                stale = min(stale, max(int(num_computed[i]) - 1, 0))
            return stale

        self.lag.observe(req_ids, num_computed, first_dirty=first_stale)
        # The first pass runs the verified tokens (plus, for a draft model, one
        # slot per request) in buffers of max_num_tokens; catch-ups get what is left.
        room = self.max_num_tokens - cad.num_actual_tokens - batch_size * self.net_num_new_slots_per_request
        plan = self.lag.plan(req_ids, num_computed, query_lens, room=room)
        # An engine started without vLLM's warm-up (elastic EP's scale-up launch
        # skips it) profiles on its first step instead.
        self.prepare_costs()
        # What each request's catch-up adds to the first pass (a partial one
        # runs instead of the request's own tokens).
        catch_ups = np.maximum(plan.query_lens(query_lens) - query_lens, 0)
        drafts, explore_room = self._who_drafts(req_ids, query_lens, catch_ups)
        if not drafts.any():
            self._skip_drafter(req_ids, num_computed)
            return None
        if explore_room is not None:
            # An exploring pass: the catch-ups that fit its share of the step.
            plan = self.lag.plan(req_ids, num_computed, query_lens, room=min(room, explore_room), cheapest_first=True)
            self.stats.record_exploring_pass(plan.num_tokens)
        elif not drafts.all():
            # Only requests that draft catch up; the room goes to them.
            plan = self.lag.plan(req_ids, num_computed, query_lens, room=room, wanted=drafts)
        return _StepDecision(start, time.perf_counter(), req_ids, num_computed, query_lens, slots, plan, drafts)

    def _draft(self, decision: _StepDecision, num_speculative_tokens, kwargs) -> list[list[int]]:
        """vLLM's drafting loop over the decided requests, with their catch-ups."""
        cad = kwargs["common_attn_metadata"]
        batch_size = cad.batch_size()
        req_ids, num_computed, query_lens = decision.req_ids, decision.num_computed, decision.query_lens
        slots, plan, drafts = decision.slots, decision.plan, decision.drafts
        pass_lens = plan.query_lens(query_lens) + self.net_num_new_slots_per_request
        pass_tokens = int(pass_lens.sum())
        drafting_start = decision.decided
        budget = StepBudget(self.costs, batch_size) if self.config.measures_costs else None
        if plan.num_tokens:
            rows = np.flatnonzero(plan.missed)
            catch_up_slots = slots(rows, plan.start[rows], plan.start[rows] + plan.missed[rows])
            kwargs = with_catch_up(kwargs, plan, self.runner.input_batch.token_ids_cpu, catch_up_slots, self.dirty)
        # A request whose catch-up did not fit (whole) drafts nothing this step.
        drafts &= ~plan.blocked
        drafting = None if drafts.all() else torch.from_numpy(drafts).to(self.device)
        window = self._window = DraftWindow(batch_size, self.config, self.device, budget, self.calibration, drafting)
        try:
            super().propose(num_speculative_tokens=min(num_speculative_tokens, self.config.k_max), **kwargs)
        except _DraftingFinished:
            pass
        finally:
            self._window = None
        new_slots = self.net_num_new_slots_per_request
        self.lag.ran(req_ids, plan, new_slots=new_slots)
        ran_from = np.where(plan.partial, plan.start, num_computed - plan.missed)
        ran_to = np.where(plan.partial, plan.start + plan.missed + new_slots, num_computed + query_lens)
        self.dirty.drafter_wrote(slots(slice(None), ran_from, ran_to))

        tokens = torch.stack(window.tokens, dim=1).tolist()
        lengths = window.lengths.tolist()
        if self.costs is not None:  # everything drafting cost, host syncs included
            # A prefill's (or a long catch-up's) pass is not what drafting costs when decoding.
            decode_tokens = batch_size * (self.config.k_max + 1)
            decoding = cad.max_query_len <= self.config.k_max + 1 and plan.num_tokens <= decode_tokens
            warm_up = int(CmasdProposerMixin._warm_up_tokens(pass_lens, self.config.k_max).sum())
            self._drafting_measured = (
                pass_tokens, len(window.tokens) - 1, batch_size, time.perf_counter() - drafting_start, decoding, warm_up
            )
        self._last_draft_probs = torch.stack(window.probs, dim=1) if window.probs else None
        rows = {"confidence": torch.stack(window.confidences, dim=1)}
        if window.entropies:
            rows["entropy"] = torch.stack(window.entropies, dim=1)
        for i, req_id in enumerate(req_ids):
            self._signals.pop(req_id, None)
            self._signals[req_id] = {name: values[i] for name, values in rows.items()}
        while len(self._signals) > self._max_signal_rows:
            self._signals.popitem(last=False)
        self.stats.record_drafts(lengths)
        return [row[:n] for row, n in zip(tokens, lengths)]

    def _observe_costs(self, num_tokens: int, step_seconds: float, target_sample: bool, batch_size: int,
                       verified_drafts: bool) -> None:
        """Feed the measured costs: the time since the last return (the rest of
        that step, scheduling this one, the target's forward and verification,
        synced since the verifier's outcome reached the host) for this step's
        scheduled tokens, and the last step's drafting time.

        Rank 0's clock for every tensor-parallel rank: each rank's budget then
        makes the same decisions."""
        assert self.costs is not None
        drafting = self._drafting_measured
        self._drafting_measured = None
        seconds = [step_seconds, drafting[3] if drafting else 0.0]
        tp_group = get_tp_group()
        if tp_group.world_size > 1:
            seconds = tp_group.broadcast(torch.tensor(seconds, dtype=torch.float64, device=self.device), src=0).tolist()
        if target_sample:
            self.costs.observe_target_step(num_tokens, seconds[0], batch_size=batch_size, verified_drafts=verified_drafts)
        if drafting is None:
            return
        pass_tokens, more_passes, drafted_batch, _, decoding, warm_up = drafting  # the last step's
        if decoding:
            self.costs.observe_drafting(pass_tokens, more_passes, drafted_batch, seconds[1])
        elif warm_up:
            decode_part = self.costs.draft(pass_tokens - warm_up) + more_passes * self.costs.draft(drafted_batch)
            self.costs.observe_warm_up(warm_up, seconds[1] - decode_part)

    @staticmethod
    def _warm_up_tokens(pass_lens: np.ndarray, k_max: int) -> np.ndarray:
        """Per request, a first pass's tokens beyond a decode step's (verified
        tokens and the new slot, at most k_max + 2): a prefill's, whose drafter
        KV serves the request's later steps. What the decision prices per step
        (:meth:`_who_drafts`) and the warm-up fit learns from (:meth:`_draft`)."""
        return pass_lens - np.minimum(pass_lens, k_max + 2)

    def _who_drafts(
        self, req_ids: list[str], query_lens: np.ndarray, catch_ups: np.ndarray
    ) -> tuple[np.ndarray, int | None]:
        """Which requests draft this step (bool per request; none: the step runs
        no drafter pass), and on an exploring step the catch-up tokens its pass
        may run (None on any other step).

        Every request drafts without the draft budget. With it, those whose
        draft pays once the first pass is paid for, decided before that pass
        from what is known now: each request's recent acceptance per drafted
        token ``a``, the batch, the measured costs. A request's draft is worth
        the expected accepted tokens of the draft the rule would make at ``a``
        (:func:`~vllm_cmasd.budget.expected_draft`), and costs, beyond the
        first pass (its decode tokens, at most k_max + 2 per request, shared by
        the batch) and the first verified token, its later positions and its
        warm-up: prefill tokens beyond a decode step's and its catch-up
        (``catch_ups`` tokens), whose drafter KV serves the steps it may still
        run and go on drafting, so priced per step over them (``remaining
        tokens / (1 + draft)``, at most the expected drafting run, at most
        ``MAX_HORIZON``). A request that does not draft on a step that
        does still runs its first pass (it does not lag, or keeps its lag
        without catching up). If none pays after ``EXPLORE_EVERY`` skipped
        steps (doubling, up to ``MAX_EXPLORE_EVERY``, while exploring is all that
        drafts), every request explores (:meth:`_explore_room`) if the rule
        would draft after the best outcome exploring could have.

        Rank 0 decides for every tensor-parallel rank (their histories agree,
        but a skip on one rank alone would desynchronise the drafters); the
        explore room follows from the costs and lags, which the ranks share."""
        if not self.config.measures_costs:
            return np.ones(len(req_ids), dtype=bool), None
        assert self.costs is not None
        batch_size, k_max = len(req_ids), self.config.k_max
        own_lens = query_lens + self.net_num_new_slots_per_request  # a draft model: + one new slot each
        beyond = CmasdProposerMixin._warm_up_tokens(own_lens, k_max)
        pass_tokens = int((own_lens - beyond).sum())
        remaining = self._remaining_tokens(req_ids)

        def rule(acceptance: np.ndarray, warm_ups: np.ndarray) -> np.ndarray:
            values, seconds = expected_draft(self.costs, acceptance, batch_size, k_max)
            steps_left = remaining / (1.0 + values)  # the steps it may still run
            horizons = np.clip(np.minimum(steps_left, self.runs.expected_run), 1.0, MAX_HORIZON)
            extra = (seconds + self.costs.warm_up(warm_ups / horizons)).tolist()
            budget = StepBudget(self.costs, batch_size, first_pass_paid=False)
            return np.array(
                budget.another_pass(values.tolist(), [True] * batch_size, pass_tokens=pass_tokens, extra_seconds=extra),
                dtype=bool,
            )

        drafts = rule(self.acceptance.predict_batch(req_ids), warm_ups=beyond + catch_ups)
        explore_room = None
        if drafts.any():  # the rule drafts by itself: when it stops, explore soon again
            self._explore_every = EXPLORE_EVERY
        elif self._skipped_in_a_row >= self._explore_every and rule(
            self.acceptance.predict_if_accepted(req_ids), warm_ups=np.zeros(batch_size)
        ).any():
            # Exploring only where its best outcome (every request's draft
            # accepted, every catch-up run) would switch drafting on: at 32
            # streams on the head the rule needs ~0.9 accepted per drafted
            # token, the head shows ~0.35, and exploring that could not change
            # a decision cost ~2% (bench-serve, 2026-12-05: the rounds that
            # explored least ran 0.99x, the rest 0.971x). Asked again on each
            # later step, so it explores as soon as the batch shrinks.
            # At full price: the first pass's own tokens. Its share is of a
            # decode step's: on a step that also prefills (up to 2,048 tokens
            # under serving load), a share of that step let one exploring pass
            # run as long as the prefill, delaying every stream's next token.
            explore_room = CmasdProposerMixin._explore_room(
                self.costs, own_tokens=int(own_lens.sum()),
                target_tokens=int(np.minimum(query_lens, k_max + 1).sum()), max_room=int(catch_ups.sum())
            )
            drafts[:] = explore_room is not None
            if explore_room is not None:
                self._explore_every = min(2 * self._explore_every, MAX_EXPLORE_EVERY)
        tp_group = get_tp_group()
        if tp_group.world_size > 1:
            drafts = tp_group.broadcast(torch.from_numpy(drafts).to(self.device), src=0).cpu().numpy()
        self._skipped_in_a_row = 0 if drafts.any() else self._skipped_in_a_row + 1
        drafting = drafts.tolist()
        self.runs.observe(req_ids, drafting)
        self.acceptance.forget([r for r, d in zip(req_ids, drafting) if not d])
        return drafts, explore_room

    def _remaining_tokens(self, req_ids: list[str]) -> np.ndarray:
        """Tokens each request may still generate: up to its ``max_tokens``, or
        to the model's length (it may stop sooner, at its EOS)."""
        max_len = self.runner.max_model_len
        remaining = []
        for req_id in req_ids:
            state = self.runner.requests.get(req_id)
            if state is None:
                remaining.append(max_len)
                continue
            left = max_len - state.num_tokens
            params = state.sampling_params
            if params is not None and params.max_tokens is not None:
                left = min(left, params.max_tokens - len(state.output_token_ids))
            remaining.append(max(left, 1))
        return np.array(remaining, dtype=np.float64)

    @staticmethod
    def _explore_room(
        costs: CostModel | MeasuredCosts, own_tokens: int, target_tokens: int, max_room: int
    ) -> int | None:
        """Catch-up tokens (at most ``max_room``) an exploring pass may run: the
        pass, its ``own_tokens`` and the catch-ups at full price, costs at most
        ``EXPLORE_MAX_COST`` of a target step over ``target_tokens`` (the
        caller's: each request's decode tokens, a prefill chunk counted as one
        verification's worth).
        Full price, because an exploring request drafts a token and may stop
        again, so nothing amortises what it ran; a share of the step, so a
        batch of whole-prompt catch-ups (32 streams, bench-serve 2026-12-02)
        cannot make one exploring pass cost many steps, while a small batch
        after a skipped prefill still explores and its catch-up proceeds in
        chunks. None: the pass alone costs more than that."""
        limit = EXPLORE_MAX_COST * costs.target(target_tokens)
        if costs.draft(own_tokens) > limit:
            return None
        low, high = 0, max_room  # the largest room whose pass fits: draft() grows with tokens
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if costs.draft(own_tokens + mid) <= limit else (low, mid - 1)
        return low

    def _skip_drafter(self, req_ids: list[str], num_computed) -> None:
        """No drafter pass this step: every request lags and drafts nothing."""
        self.lag.skip(req_ids, num_computed)
        self._last_draft_probs = None  # vLLM resets it only inside its own propose
        for req_id in req_ids:
            self._signals.pop(req_id, None)
        self.stats.record_skipped_pass(len(req_ids))

    def observe_verification(self, req_ids: list[str], num_draft_tokens: list[int], num_accepted: torch.Tensor) -> None:
        """Each verification's outcome: the requests' acceptance history, and the
        calibration (every drafted token the verifier reached, by its confidence).
        The window learns the calibration too, for /metrics and for fitting a
        warm start (calibration.fit_warm_start)."""
        accepted_counts = num_accepted.tolist()
        if self.trace is not None:
            self.step_outcomes = {r: (d, a) for r, d, a in zip(req_ids, num_draft_tokens, accepted_counts) if d}
        if self.config.measures_costs:
            self.acceptance.observe(req_ids, num_draft_tokens, accepted_counts)
        confidences, outcomes = [], []
        for req_id, drafted, accepted in zip(req_ids, num_draft_tokens, accepted_counts):
            entry = self._signals.get(req_id) if drafted else None
            if entry is None or entry["confidence"].numel() < drafted:
                continue  # vLLM's warm-up batch: no drafts of ours
            reached = min(accepted + 1, drafted)
            confidences.append(entry["confidence"][:reached])
            outcomes.append(torch.arange(reached) < accepted)
        if confidences:
            self.calibration.observe(torch.cat(confidences), torch.cat(outcomes))

    def totals(self) -> dict[str, float]:
        """The controller's running totals (metrics.CONTROLLER_TOTALS)."""
        return {
            "skipped_drafter_passes": self.stats.num_skipped_passes,
            "catch_up_tokens": self.lag.num_catch_up_tokens,
            "split_catch_ups": self.lag.num_split_passes,
            "exploring_passes": self.stats.num_exploring_passes,
            "exploring_catch_up_tokens": self.stats.num_exploring_catch_up_tokens,
            "drafter_seconds": self.stats.drafter_seconds,
        }

    def report(self) -> dict:
        """What the controller has done and learnt so far, for ``/metrics``
        (vllm_patch.py carries it to the front end with the scheduler's stats):
        running totals, the calibration, the cost fit."""
        out = {**self.totals(), "calibration": self.calibration.summary()}
        if self.costs is not None:
            out["costs"] = self.costs.coefficients
            out["acceptance"] = self.acceptance.summary()
        return out

    def signal_for(self, name: str, req_ids: list[str], num_draft_tokens: list[int]) -> torch.Tensor | None:
        """A per-token drafter signal ("confidence" or "entropy") of the drafts being
        verified, flattened in batch order; None if no draft recorded it.

        Rows are looked up by request id (the batch may have been reordered
        since the drafts were proposed); the scheduler may have cut a draft
        short, so only the first ``n`` values of a row are used. A request
        without a row (vLLM's warm-up batch) gets the strictest value:
        confidence 0, entropy +inf.
        """
        missing = 0.0 if name == "confidence" else float("inf")
        parts, found = [], False
        for i, n in enumerate(num_draft_tokens):
            if n == 0:
                continue
            entry = self._signals.get(req_ids[i]) if i < len(req_ids) else None
            row = None if entry is None else entry.get(name)
            if row is None or row.numel() < n:
                parts.append(torch.full((n,), missing, device=self.device))
            else:
                parts.append(row[:n])
                found = True
        return torch.cat(parts) if found else None


class CmasdProposer(CmasdProposerMixin, DraftModelProposer):
    """Draft-model proposer (``method: draft_model``) whose drafts stop where the drafter's confidence does."""

    CATCH_UP_NEEDS_HIDDEN_STATES = False


class CmasdEagleProposer(CmasdProposerMixin, EagleProposer):
    """EAGLE head proposer (``method: eagle3``, or ``eagle`` for an EAGLE-1 head:
    vLLM drives both through one ``EagleProposer``) with the same window, signals
    and controller; its catch-ups read the target's hidden states kept for them
    (``CATCH_UP_NEEDS_HIDDEN_STATES``)."""

    CATCH_UP_NEEDS_HIDDEN_STATES = True
    _target_ids: torch.Tensor | None = None  # the head's d2t map as target ids, once its weights are in

    def _reduced_logits(self, hidden_states) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An EAGLE-3 head with ``draft_vocab_size`` columns and a ``d2t`` map:
        its own logits, and the full-vocabulary ones vLLM's ``compute_logits``
        makes of them (the same expansion: -inf off the mapped ids)."""
        d2t = getattr(self.model, "draft_id_to_target_id", None)
        if d2t is None:
            return None
        small = self.model.logits_processor(self.model.lm_head, hidden_states)
        if self._target_ids is None:
            self._target_ids = torch.arange(small.shape[-1], device=small.device) + d2t
        full = small.new_full((small.shape[0], self.model.config.vocab_size), float("-inf"))
        full[:, self._target_ids] = small
        return small, full
