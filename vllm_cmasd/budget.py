"""Batch-aware draft budget (``cmasd.draft_budget = "auto"``).

At batch 1 verifying one more drafted token costs the memory-bound target
almost nothing; at larger batches it does not, and neither does a drafter
pass. The budget decides, position by position, which drafted tokens are
worth verifying and whether another drafter pass is worth running, from

* a **cost model** profiled once, on the engine's first drafting step
  (:func:`profile_costs`): seconds
  of one target forward (with its LM head) and of one drafter pass, against
  the number of tokens it processes, interpolated between measured points;
* each request's **predicted survival**: the running product of its drafted
  tokens' confidences, the estimate that the whole draft so far is accepted.

A step is worth ``B + sum(survival of verified drafts)`` tokens (each of the
B requests emits at least one) and costs ``target(B + drafts) + drafter
passes``. Tokens are admitted most-likely-first while each one's expected
gain per second (survival / the target's marginal cost of one more token)
beats the step's average; another drafter pass runs only when what it is
predicted to add (the next token's survival taken as survival x this
position's confidence) raises the step's rate. Equations: docs/confidence.md.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CostModel:
    """Seconds per forward pass against tokens processed (piecewise linear)."""

    tokens: tuple[int, ...]
    """Profiled token counts, ascending."""
    target_s: tuple[float, ...]
    """One target forward over that many tokens, logits included."""
    draft_s: tuple[float, ...]
    """One drafter pass over that many tokens, logits included."""
    verify_s: float = 0.0
    """What a target step that verifies drafts costs beyond the same tokens
    without them (the profile runs forwards only: none)."""

    def target(self, num_tokens: int) -> float:
        return _interpolate(self.tokens, self.target_s, num_tokens)

    def draft(self, num_tokens: int) -> float:
        return _interpolate(self.tokens, self.draft_s, num_tokens)


def _interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Linear between points, extended linearly past the last two."""
    if len(xs) == 1:
        return ys[0] * max(x, 1) / xs[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


class StepBudget:
    """One step's draft plan: admits drafted tokens while they pay for themselves.

    ``first_pass_paid``: the drafter's first pass has run (the budget is asked
    position by position while drafting); False when asking, before it,
    whether the first pass pays at all (:meth:`another_pass` prices it).
    """

    def __init__(self, costs: CostModel, batch_size: int, first_pass_paid: bool = True):
        self.costs = costs
        self.batch_size = batch_size
        self.first_pass_paid = first_pass_paid
        self.expected_tokens = float(batch_size)
        self.verify_tokens = batch_size
        # A step that drafts also verifies: its fixed extra (rejection sampling,
        # bookkeeping) comes with the first pass.
        self.seconds = costs.target(batch_size) + (
            costs.draft(batch_size) + costs.verify_s if first_pass_paid else 0.0
        )

    def _admit(self, survival: list[float], candidates: list[bool], seconds: float, force: bool,
               extra_seconds: list[float] | None = None):
        """Best value for its cost first (most likely first where costs are
        equal), while survival / marginal cost beats
        the average rate (every candidate when ``force``). A candidate's marginal
        cost is one more verified token, plus its ``extra_seconds`` if given
        (the drafter catch-up it needs).

        Returns (admitted, expected tokens, seconds, verified tokens) after admitting.
        """
        tokens, verify = self.expected_tokens, self.verify_tokens
        own = extra_seconds or [0.0] * len(survival)
        admitted = [False] * len(survival)
        first_extra = self.costs.target(verify + 1) - self.costs.target(verify)
        order = sorted((i for i, c in enumerate(candidates) if c),
                       key=lambda i: -survival[i] / max(first_extra + own[i], 1e-12))
        for i in order:
            extra = self.costs.target(verify + 1) - self.costs.target(verify) + own[i]
            # s / extra > tokens / seconds, without dividing by a zero cost.
            if not force and survival[i] * seconds <= tokens * extra:
                break  # the rest are worth less for their cost
            admitted[i] = True
            tokens, seconds, verify = tokens + survival[i], seconds + extra, verify + 1
        return admitted, tokens, seconds, verify

    def admit(self, survival: list[float], candidates: list[bool], force: bool = False) -> list[bool]:
        """Which of this position's drafted tokens to verify (and so keep)."""
        admitted, self.expected_tokens, self.seconds, self.verify_tokens = self._admit(
            survival, candidates, self.seconds, force
        )
        return admitted

    def another_pass(
        self,
        predicted_survival: list[float],
        candidates: list[bool],
        force: bool = False,
        pass_tokens: int | None = None,
        extra_seconds: list[float] | None = None,
    ) -> list[bool]:
        """Which requests should draft one more token; all False if the pass does
        not pay (all candidates, and the pass paid, when ``force``).

        vLLM's drafting loop runs every row of the batch, so a pass costs
        ``draft(batch_size)`` however few requests still draft; a first pass
        costs ``draft(pass_tokens)``: the verified tokens and one new slot per
        request, and makes the step one that verifies (``verify_s``). ``extra_seconds``: what drafting for each request adds to the
        pass beyond that (a lagging request's catch-up), paid only by those admitted.
        """
        with_pass = self.seconds + self.costs.draft(pass_tokens or self.batch_size)
        if not self.first_pass_paid:
            with_pass += self.costs.verify_s
        if force:
            self.seconds = with_pass
            return list(candidates)
        admitted, tokens, seconds, _ = self._admit(predicted_survival, candidates, with_pass, False, extra_seconds)
        if tokens * self.seconds <= self.expected_tokens * seconds:  # the rate would not rise
            return [False] * len(candidates)
        self.seconds = with_pass
        return admitted


class _DecayedLinearFit:
    """y = w . f, least squares over exponentially decayed samples, anchored by
    fixed pseudo-samples (the prior) so it is defined before data arrive and
    keeps a slope where the data have no spread."""

    def __init__(self, prior_features: list[tuple[float, ...]], prior_y: list[float], prior_weight: float,
                 decay: float):
        self.decay = decay
        features = np.asarray(prior_features, dtype=np.float64)
        weight = prior_weight / max(len(prior_y), 1)
        self.prior = (weight * features.T @ features, weight * features.T @ np.asarray(prior_y, dtype=np.float64))
        dim = features.shape[1]
        self.data = (np.zeros((dim, dim)), np.zeros(dim))  # F^T W F, F^T W y
        self.num_samples = 0
        self.weights = self._solve()

    def _solve(self) -> tuple[float, ...]:
        ff, fy = self.prior[0] + self.data[0], self.prior[1] + self.data[1]
        try:
            return tuple(np.linalg.solve(ff, fy).tolist())
        except np.linalg.LinAlgError:
            return (0.0,) * len(fy)

    def __call__(self, *features: float) -> float:
        return float(sum(w * f for w, f in zip(self.weights, features)))

    def update(self, *features: float, y: float) -> None:
        f = np.asarray(features, dtype=np.float64)
        ff, fy = self.data
        self.data = (self.decay * ff + np.outer(f, f), self.decay * fy + f * y)
        self.num_samples += 1
        self.weights = self._solve()


class MeasuredCosts:
    """Costs measured on the running engine, with the start-up profile as prior.

    The target's step: ``T(n) = a + b n`` seconds for n scheduled tokens, plus
    ``c`` (``verify_s``) on a step that verifies drafts: a least-squares fit
    through recent steps (each step's weight decays by
    ``decay`` per step), anchored by the profile's points. The line learns
    what the profile cannot see: per-step work outside the forward
    (scheduling, sampling, bookkeeping) in ``a``, attention over real
    contexts in the slope ``b`` (the profile runs no attention). Drafting: a
    step's whole drafting time (metadata, sampling, host syncs included) is
    ``passes x d0 + tokens x d1`` over its passes and the tokens they run, the
    same kind of fit; ``D(n) = d0 + d1 n`` is one pass over n tokens. Samples
    over ``outlier_ratio`` times the current estimate (an idle gap between
    requests, a stall) are ignored.
    """

    def __init__(self, prior: CostModel, decay: float = 0.95, prior_weight: float = 0.05, outlier_ratio: float = 4.0):
        self.prior = prior
        self.outlier_ratio = outlier_ratio
        points = [(1.0, float(n)) for n in prior.tokens]
        # The target's third feature is 1 on a step that verifies drafts; the
        # profile has none, so one pseudo-sample holds it at the profile's verify_s
        # until real steps with and without drafts tell them apart.
        self._target = _DecayedLinearFit([(*p, 0.0) for p in points] + [(0.0, 0.0, 1.0)],
                                         [*prior.target_s, prior.verify_s], prior_weight, decay)
        self._draft = _DecayedLinearFit(points, list(prior.draft_s), prior_weight, decay)

    @property
    def num_target_samples(self) -> int:
        return self._target.num_samples

    @property
    def num_draft_samples(self) -> int:
        return self._draft.num_samples

    def target(self, num_tokens: int) -> float:
        """A target step over ``num_tokens`` scheduled tokens (without drafts to verify)."""
        return max(self._target(1.0, num_tokens, 0.0), 0.0)

    @property
    def verify_s(self) -> float:
        """What a step that verifies drafts costs beyond the same tokens without them."""
        return max(self._target.weights[2], 0.0)

    def draft(self, num_tokens: int) -> float:
        return max(self._draft(1.0, num_tokens), 0.0)

    def _plausible(self, measured: float, estimate: float) -> bool:
        return measured > 0 and (estimate <= 0 or measured <= self.outlier_ratio * estimate)

    def observe_target_step(self, num_tokens: int, seconds: float, verified_drafts: bool = False) -> None:
        """One engine step's time outside the drafter, for ``num_tokens`` scheduled
        tokens, of which some were drafts to verify or not."""
        verifies = float(verified_drafts)
        if self._plausible(seconds, self.target(num_tokens) + verifies * self.verify_s):
            self._target.update(1.0, num_tokens, verifies, y=seconds)

    def observe_drafting(self, first_pass_tokens: int, more_passes: int, batch_size: int, seconds: float) -> None:
        """One step's drafting, everything included: a first pass over
        ``first_pass_tokens`` tokens and ``more_passes`` passes over the batch."""
        passes, tokens = 1 + more_passes, first_pass_tokens + more_passes * batch_size
        if self._plausible(seconds, self._draft(passes, tokens)):
            self._draft.update(passes, tokens, y=seconds)

    @property
    def coefficients(self) -> dict[str, float]:
        """The fitted lines: target step a + b n (+ c when it verifies drafts),
        drafting pass d0 + d1 n (seconds)."""
        (a, b, c), (d0, d1) = self._target.weights, self._draft.weights
        return {"target_step_s": a, "target_token_s": b, "target_verify_s": c, "draft_pass_s": d0, "draft_token_s": d1}

    def summary(self) -> dict:
        """The current fit at the profiled token counts, beside the profile."""
        points = self.prior.tokens
        return {
            "tokens": list(points),
            "target_s": [self.target(n) for n in points],
            "draft_s": [self.draft(n) for n in points],
            "profiled_target_s": list(self.prior.target_s),
            "profiled_draft_s": list(self.prior.draft_s),
            "target_samples": self.num_target_samples,
            "draft_samples": self.num_draft_samples,
            **self.coefficients,
        }


class AcceptanceHistory:
    """Each request's recent acceptance rate per drafted token, known before its
    next drafter pass (what the budget predicts the first drafted position by).

    Per request, exponentially decayed counts of accepted drafted tokens and
    of drafted tokens the verifier reached (the token after the last accepted
    one was reached and rejected; later ones were not reached); a request
    without history borrows the same counts over all requests, whose start is
    a weak prior of ``prior`` acceptance.
    """

    def __init__(self, prior: float = 0.5, prior_weight: float = 2.0, decay: float = 0.9, max_tracked: int = 1024):
        self.decay = decay
        self.max_tracked = max_tracked
        self.overall = [prior * prior_weight, prior_weight]
        self.per_request: dict[str, list[float]] = {}

    def observe(self, req_ids: list[str], num_draft_tokens: list[int], num_accepted: list[int]) -> None:
        for req_id, drafted, accepted in zip(req_ids, num_draft_tokens, num_accepted):
            if drafted == 0:
                continue
            reached = accepted + (accepted < drafted)
            counts = self.per_request.pop(req_id, None) or list(self.overall)
            for c in (counts, self.overall):
                c[0] = self.decay * c[0] + accepted
                c[1] = self.decay * c[1] + reached
            self.per_request[req_id] = counts  # most recent last
        while len(self.per_request) > self.max_tracked:
            self.per_request.pop(next(iter(self.per_request)))

    def predict(self, req_id: str) -> float:
        accepted, reached = self.per_request.get(req_id, self.overall)
        return accepted / reached if reached > 0 else 0.0


# The largest batch profiled; the cost model extends linearly past it. By
# then a forward is compute-bound (cost linear in tokens) on CPUs, and the
# curve's slope is what the budget needs. Profiling up to vLLM's default
# max_num_seqs x (k_max + 1) = 2304 tokens made the first step take 30 s on a
# 2-core CPU; capped, 4.2 s (scripts/probe_drafting.py --budget).
MAX_PROFILED_TOKENS = 256


def _profile_points(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to max_tokens (capped at MAX_PROFILED_TOKENS), which is included."""
    top = min(max_tokens, MAX_PROFILED_TOKENS)
    points, n = [], 1
    while n < top:
        points.append(n)
        n *= 2
    return points + [top]


@torch.inference_mode()
def profile_costs(runner, drafter, max_tokens: int, repeats: int = 3) -> CostModel:
    """Time the target and the drafter on dummy batches of 1..max_tokens tokens
    (at most MAX_PROFILED_TOKENS).

    Runs like vLLM's own dummy runs (no attention metadata, so attention is
    skipped): what grows with the number of tokens at short contexts is the
    linear layers and the LM head, which this measures. The median of
    ``repeats`` runs after one warm-up run. Called on every tensor-parallel
    rank (the forwards hold collectives); rank 0's figures are broadcast so
    every rank makes the same draft decisions.
    """
    from vllm.distributed import get_tp_group
    from vllm.forward_context import set_forward_context

    def seconds(model, n: int, **inputs) -> float:
        ids = torch.zeros(n, dtype=torch.long, device=drafter.device)
        positions = torch.arange(n, dtype=torch.long, device=drafter.device)
        times = []
        for attempt in range(repeats + 1):
            runner._sync_device()
            start = time.perf_counter()
            with set_forward_context(None, drafter.vllm_config, num_tokens=n, slot_mapping={}):
                hidden = model(input_ids=ids, positions=positions, **inputs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            model.compute_logits(hidden)
            runner._sync_device()
            if attempt:  # the first run warms up
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def drafter_inputs(n: int) -> dict:
        # An EAGLE head also takes the target's (combined) hidden states.
        if not drafter.pass_hidden_states_to_model:
            return {}
        return {"hidden_states": torch.zeros(n, drafter.hidden_size, dtype=drafter.dtype, device=drafter.device)}

    points = _profile_points(max_tokens)
    measured = torch.tensor(
        [[seconds(runner.model, n) for n in points], [seconds(drafter.model, n, **drafter_inputs(n)) for n in points]],
        dtype=torch.float64,
        device=drafter.device,
    )
    measured = get_tp_group().broadcast(measured, src=0).cpu()
    return CostModel(tuple(points), tuple(measured[0].tolist()), tuple(measured[1].tolist()))
