"""Batch-aware draft budget (``cmasd.draft_budget = "auto"``).

At batch 1 verifying one more drafted token costs the memory-bound target
almost nothing; at larger batches it does not, and neither does a drafter
pass. The budget decides, position by position, which drafted tokens are
worth verifying and whether another drafter pass is worth running, from

* a **cost model** profiled once, at engine start after vLLM's warm-up
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
import collections
import copy
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch


# A step of B requests runs the drafter's first pass only where that is
# predicted to raise its rate of tokens by at least this share x sqrt(2 ln B)
# (0 at batch 1, 0.083 at 4, 0.10 at 8, 0.13 at 32). The pass pays for the
# requests the rule picks by their estimated acceptance (a few verified
# drafts each): picked from many, the best estimates are the luckiest, by
# about sqrt(2 ln B) of their spread (the expected maximum of B draws). And at
# a large batch a switch-on costs more than the rule prices: served at 32
# streams it switched all 32 requests on at a predicted 1.18 while their
# catch-ups (~2,000 tokens), priced over up to MAX_HORIZON steps, served one
# step (a decision log; docs/notes/eagle3-training.md, twentieth session).
# Without a margin the controller served 0.967x plain there, an engine that
# never drafted 1.023x. At batch 1 nothing is picked and the prediction errs
# low: a flat margin of 0.1 kept the draft model off in whole rounds that
# drafting ran at 1.27x.
FIRST_PASS_MARGIN = 0.05


@dataclass(frozen=True)
class CostModel:
    """Seconds per forward pass against tokens processed (piecewise linear)."""

    tokens: tuple[int, ...]
    """Profiled token counts, ascending."""
    target_s: tuple[float, ...]
    """One target forward over that many tokens, logits included."""
    draft_s: tuple[float, ...]
    """One drafter pass over that many tokens, logits included."""
    verify_request_s: float = 0.0
    """What a target step that verifies drafts costs beyond the same tokens
    without them, per request of its batch (the profile runs forwards only: none)."""

    def target(self, num_tokens: int) -> float:
        return _interpolate(self.tokens, self.target_s, num_tokens)

    def verify(self, batch_size: int) -> float:
        """What verifying drafts adds to a step of ``batch_size`` requests."""
        return self.verify_request_s * batch_size

    def verified_token(self, num_tokens: int) -> float:
        """What one more drafted token adds to a step that verifies ``num_tokens`` tokens."""
        return self.target(num_tokens + 1) - self.target(num_tokens)

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
            costs.draft(batch_size) + costs.verify(batch_size) if first_pass_paid else 0.0
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
        first_extra = self.costs.verified_token(verify)
        order = sorted((i for i, c in enumerate(candidates) if c),
                       key=lambda i: -survival[i] / max(first_extra + own[i], 1e-12))
        for i in order:
            extra = self.costs.verified_token(verify) + own[i]
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
        not pay (a first pass: unless it raises the rate by ``FIRST_PASS_MARGIN``
        x sqrt(2 ln batch size);
        all candidates, and the pass paid, when ``force``).

        vLLM's drafting loop runs every row of the batch, so a pass costs
        ``draft(batch_size)`` however few requests still draft; a first pass
        costs ``draft(pass_tokens)``: the verified tokens and one new slot per
        request, and makes the step one that verifies (``costs.verify``). ``extra_seconds``: what drafting for each request adds to the
        pass beyond that (a lagging request's catch-up), paid only by those admitted.
        """
        with_pass = self.seconds + self.costs.draft(pass_tokens or self.batch_size)
        if not self.first_pass_paid:
            with_pass += self.costs.verify(self.batch_size)
        if force:
            self.seconds = with_pass
            return list(candidates)
        admitted, tokens, seconds, _ = self._admit(predicted_survival, candidates, with_pass, False, extra_seconds)
        # The rate would not rise (a first pass: by its margin).
        margin = 1.0 if self.first_pass_paid else 1.0 + FIRST_PASS_MARGIN * math.sqrt(2.0 * math.log(self.batch_size))
        if tokens * self.seconds <= margin * self.expected_tokens * seconds:
            return [False] * len(candidates)
        self.seconds = with_pass
        return admitted


def expected_draft(
    costs: CostModel | MeasuredCosts, acceptance: np.ndarray, batch_size: int, k_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """What each request expects from drafting this step, known before the first
    pass: ``(tokens, seconds)`` per request (arrays like ``acceptance``), the
    expected accepted tokens of the draft the rule would make and what its
    positions after the first cost.

    With per-token acceptance ``a``, position j survives with ``a^j``; it is
    drafted while ``a^j`` per its cost beats a plain step's rate, its cost being
    its share of a drafter pass over the batch and one more verified token.
    The first position's cost is not here: the caller prices the first pass
    (shared by the batch) and the first verified token. Valuing a first pass by
    its first token alone undervalues it (at batch 1 a request whose drafts
    average 0.96 accepted tokens was priced at 0.6) and kept it from paying for
    its prefill (docs/notes/controller.md, Step 10). All requests at once: one
    request at a time cost 0.14 ms a step at 32 requests."""
    acceptance = np.asarray(acceptance, dtype=np.float64)
    rate = batch_size / max(costs.target(batch_size), 1e-12)  # tokens per second without drafting
    per_position = costs.draft(batch_size) / batch_size + costs.verified_token(batch_size)
    # Positions 2..k_max survive with a^2..a^k_max; drafting stops at the first that does not pay.
    survival = acceptance[:, None] ** np.arange(2, k_max + 1)
    drafted = np.cumprod(survival > rate * per_position, axis=1, dtype=bool)
    return acceptance + (survival * drafted).sum(axis=1), drafted.sum(axis=1) * per_position


class _DecayedLinearFit:
    """y = w . f, least squares over exponentially decayed samples, anchored by
    fixed pseudo-samples (the prior) so it is defined before data arrive and
    keeps a slope where the data have no spread.

    Samples come in ``groups`` that decay apart: a sample decays the earlier
    samples of its own group only. Where a feature tells the groups apart (a
    step that verifies drafts or not), a long run of one group keeps what the
    other measured last; one decay over both erased it, and the fit could no
    longer tell that feature's term from the intercept."""

    def __init__(self, prior_features: list[tuple[float, ...]], prior_y: list[float], prior_weight: float,
                 decay: float, groups: int = 1):
        self.decay = decay
        features = np.asarray(prior_features, dtype=np.float64)
        weight = prior_weight / max(len(prior_y), 1)
        self.prior = (weight * features.T @ features, weight * features.T @ np.asarray(prior_y, dtype=np.float64))
        dim = features.shape[1]
        self.data = [(np.zeros((dim, dim)), np.zeros(dim)) for _ in range(groups)]  # per group F^T W F, F^T W y
        self.num_samples = 0
        self.weights = self._solve()

    def _solve(self) -> tuple[float, ...]:
        ff = self.prior[0] + sum(data[0] for data in self.data)
        fy = self.prior[1] + sum(data[1] for data in self.data)
        try:
            return tuple(np.linalg.solve(ff, fy).tolist())
        except np.linalg.LinAlgError:
            return (0.0,) * len(fy)

    def hold(self, index: int, value: float, weight: float) -> None:
        """Holds one weight at ``value`` unless the data tell it apart: a ridge
        term ``weight (w_index - value)^2``, in the squared units of its feature."""
        ff, fy = self.prior[0].copy(), self.prior[1].copy()
        ff[index, index] += weight
        fy[index] += weight * value
        self.prior = (ff, fy)
        self.weights = self._solve()

    def __call__(self, *features: float) -> float:
        return float(sum(w * f for w, f in zip(self.weights, features)))

    def update(self, *features: float, y: float, group: int = 0) -> None:
        f = np.asarray(features, dtype=np.float64)
        ff, fy = self.data[group]
        self.data[group] = (self.decay * ff + np.outer(f, f), self.decay * fy + f * y)
        self.num_samples += 1
        self.weights = self._solve()


# How firmly the target fit holds a drafted token's extra cost at 0, in
# squared drafted tokens: as firmly as ~16 steps whose drafts are two tokens a
# request longer than one (blocked requests in exploring passes, one or two
# fewer, move it little; a drafting engine's varied lengths move it).
DRAFTED_TOKEN_PRIOR_WEIGHT = 64.0

# How firmly the target fit holds the verifying extra per request at the
# profile's (which cannot see it: 0), in squared requests: as firmly as 8
# verifying steps of one request, an eighth of one step of 8. A step without
# drafts measures nothing of it, so what the first verifying steps say stays.
# At batch 1 an engine's first verifying steps ran 6-10 ms over its steps
# without drafts, later ones 0-4 ms (bench engines, 2026-12-05): fitted from
# the warm-up request's three, the extra read 5-6 ms, drafting the head paid
# only above ~0.28 accepted per drafted token (its warm-up left 0.20, it
# accepts ~0.26), and the engine drafted on 1-23% of its steps for the rest
# of its life (3 rounds of 4; the other drafted on 69%). Held, the same
# steps read 0.1-1.2 ms. At 8 requests and more one verifying step outweighs
# the hold 8 times over.
VERIFY_PRIOR_WEIGHT = 8.0


class MeasuredCosts:
    """Costs measured on the running engine, with the start-up profile as prior.

    The target's step: ``T(n) = a + b n`` seconds for n scheduled tokens; a
    step of B requests that verifies d drafted tokens (n = B + d) costs
    ``c B`` (:meth:`verify`) and ``e d`` more (each drafted token ``b + e``,
    :meth:`verified_token`): a least-squares fit through recent steps (each
    step's weight decays by ``decay`` per step of its kind, verifying or
    not), anchored by the profile's points. The line learns what the profile
    cannot see: per-step work outside the forward (scheduling, sampling,
    bookkeeping) in ``a``, attention over real contexts in the slope ``b``
    (the profile runs no attention). Both verifying terms are there because
    that is how verifying was measured: on vLLM's CPU backend a decode step
    of 8 requests took 172-202 ms without drafts, 24-85 ms more (two runs)
    with one drafted token and ~20 ms more for each further one, against
    ~10 ms for each request's own token; at one request the first drafted
    token added ~8 ms (AMD, 2026-12-05; the step probe,
    docs/notes/eagle3-training.md). With
    one term for all tokens, the fit gave verifying a zero or negative fixed
    cost and a steeper ``b``. Drafting: a
    step's whole drafting time (metadata, sampling, host syncs included) is
    ``passes x d0 + tokens x d1`` over its passes and the tokens they run, the
    same kind of fit; ``D(n) = d0 + d1 n`` is one pass over n tokens. A
    sample over ``outlier_ratio`` times the current estimate, times the
    median ratio of measured to estimated of the last ``OUTLIER_WINDOW``
    samples of its kind where that is above 1, is ignored (an idle gap
    between requests, a stall). The median keeps a prior that is several
    times too low from refusing every sample: on the tiny test pair the
    profile's forward is 0.7 ms and a real step 3-4 ms, and the fit never
    learnt.
    """

    OUTLIER_WINDOW = 9

    def __init__(self, prior: CostModel, decay: float = 0.95, prior_weight: float = 0.05, outlier_ratio: float = 4.0):
        self.prior = prior
        self.outlier_ratio = outlier_ratio
        # Per kind of sample (target, draft, warm-up): recent measured / estimated.
        self._recent_ratios: dict[str, collections.deque[float]] = {
            kind: collections.deque(maxlen=self.OUTLIER_WINDOW) for kind in ("target", "draft", "warm_up")
        }
        points = [(1.0, float(n)) for n in prior.tokens]
        # The target's features beyond (1, n), on a step that verifies drafts:
        # its batch size and its drafted tokens (0 and 0 on one that does not).
        # The profile has neither, so ridges (below) hold the first at the
        # profile's and the second at 0 until real steps with
        # and without drafts tell them apart. Those two kinds decay apart (group = verifies): when every step
        # of a long stretch verified, one decay over both left only verifying
        # steps, whose extra the intercept could then take (served at 8 streams:
        # a fixed verifying cost fitted at -15 to -69 ms), and a step without
        # drafts looked as dear as one with.
        self._target = _DecayedLinearFit(
            [(*p, 0.0, 0.0) for p in points], list(prior.target_s), prior_weight, decay, groups=2
        )
        # A drafted token's extra (e) stays at 0, a drafted token priced as one
        # of the step's own, until steps whose drafts differ in length tell it
        # from the per-request extra (c): where every request drafts one token
        # (an exploring pass) the two are one column, and the few steps with a
        # request left out split them by noise (served: c, e = +2.2, -17 ms;
        # in-process c = e exactly, or -15 / +8 ms).
        self._target.hold(3, 0.0, DRAFTED_TOKEN_PRIOR_WEIGHT)
        self._target.hold(2, prior.verify_request_s, VERIFY_PRIOR_WEIGHT)
        self._draft = _DecayedLinearFit(points, list(prior.draft_s), prior_weight, decay)
        # A pass's tokens beyond a decode step's (a prompt's prefill, a
        # catch-up) are priced per token on their own: a long pass costs far
        # less per token than the short decode passes D(n) is fitted to (AMD,
        # 2026-12-03: 0.15 ms a prompt token measured, against the decode
        # fit's 0.4-0.6 ms).
        self._warm_up = _DecayedLinearFit([(1.0,)], [_long_pass_slope(prior)], prior_weight, decay)

    @property
    def num_target_samples(self) -> int:
        return self._target.num_samples

    @property
    def num_draft_samples(self) -> int:
        return self._draft.num_samples

    def target(self, num_tokens: int) -> float:
        """A target step over ``num_tokens`` scheduled tokens (without drafts to verify)."""
        return max(self._target(1.0, num_tokens, 0.0, 0.0), 0.0)

    def verify(self, batch_size: int) -> float:
        """What a step of ``batch_size`` requests that verifies drafts costs beyond its requests' own tokens."""
        return max(self._target.weights[2], 0.0) * batch_size

    def verified_token(self, num_tokens: int) -> float:
        """What one more drafted token adds to a step that verifies drafts (``b + e``:
        the same at any ``num_tokens``, the fit being linear)."""
        return max(self._target.weights[1] + self._target.weights[3], 0.0)

    def draft(self, num_tokens: int) -> float:
        return max(self._draft(1.0, num_tokens), 0.0)

    def warm_up(self, num_tokens: float) -> float:
        """What ``num_tokens`` more tokens add to a drafter pass beyond its decode step's tokens."""
        return max(self._warm_up.weights[0], 0.0) * num_tokens

    def _plausible(self, kind: str, measured: float, estimate: float) -> bool:
        if measured <= 0:
            return False
        if estimate <= 0:
            return True
        ratios = self._recent_ratios[kind]
        typical = max(statistics.median(ratios), 1.0) if ratios else 1.0
        ratios.append(measured / estimate)
        return measured <= self.outlier_ratio * typical * estimate

    def observe_target_step(self, num_tokens: int, seconds: float, *, batch_size: int,
                            verified_drafts: bool = False) -> None:
        """One engine step's time outside the drafter, for ``num_tokens`` scheduled
        tokens of ``batch_size`` requests, of which some were drafts to verify or not."""
        features = (1.0, num_tokens, batch_size, num_tokens - batch_size) if verified_drafts else (1.0, num_tokens, 0.0, 0.0)
        if self._plausible("target", seconds, max(self._target(*features), 0.0)):
            self._target.update(*features, y=seconds, group=int(verified_drafts))

    def observe_drafting(self, first_pass_tokens: int, more_passes: int, batch_size: int, seconds: float) -> None:
        """One step's drafting, everything included: a first pass over
        ``first_pass_tokens`` tokens and ``more_passes`` passes over the batch."""
        passes, tokens = 1 + more_passes, first_pass_tokens + more_passes * batch_size
        if self._plausible("draft", seconds, self._draft(passes, tokens)):
            self._draft.update(passes, tokens, y=seconds)

    def observe_warm_up(self, num_tokens: int, seconds: float) -> None:
        """A drafter pass that ran ``num_tokens`` beyond its decode step's tokens,
        and the ``seconds`` it took beyond what its decode tokens cost."""
        if num_tokens > 0 and self._plausible("warm_up", seconds, self.warm_up(num_tokens)):
            self._warm_up.update(float(num_tokens), y=seconds)

    @property
    def coefficients(self) -> dict[str, float]:
        """The fitted lines: target step a + b n (+ c per request and e per drafted
        token when it verifies drafts),
        drafting pass d0 + d1 n, and a pass's tokens beyond a decode step's (seconds)."""
        (a, b, c, e), (d0, d1) = self._target.weights, self._draft.weights
        return {"target_step_s": a, "target_token_s": b, "target_verify_request_s": c, "target_drafted_token_s": e,
                "draft_pass_s": d0, "draft_token_s": d1,
                "warm_up_token_s": self._warm_up.weights[0]}

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


def _long_pass_slope(profile: CostModel, from_tokens: int = 16) -> float:
    """The profile's seconds per drafter token in long passes: the median slope
    between its points from ``from_tokens`` on (one noisy point moves a median
    little), the prior of :meth:`MeasuredCosts.warm_up`."""
    points = [(n, s) for n, s in zip(profile.tokens, profile.draft_s) if n >= from_tokens]
    if len(points) < 2:
        points = list(zip(profile.tokens, profile.draft_s))
    if len(points) < 2:
        return profile.draft_s[0] / max(profile.tokens[0], 1)
    slopes = sorted(max((s1 - s0) / (n1 - n0), 0.0) for (n0, s0), (n1, s1) in zip(points, points[1:]))
    return slopes[len(slopes) // 2]


# How firmly the rate over all requests starts at its prior, in drafted
# tokens. Nothing moves it while no request drafts, so what a new engine's
# first drafts show stays. At batch 1 the head accepts ~0.26 of its first
# drafted tokens and drafting pays from ~0.17: held as 2 tokens, the rate read
# 0.12-0.18 after the warm-up request's first rejections (none of 6 accepted:
# 16% likely at 0.26) and the engine drafted on ~1% of its later steps (bench
# engines, 2026-12-05: 2 of 4 once the verifying extra was held). Simulated
# (that rule, one token a draft, 0.26): 28% of engines drafted on under 30% of
# their steps held as 2 tokens, 9% as 8, 1% as 16; but as 16 a new engine no
# longer explored at 32 requests where drafting pays from ~0.9 (its best
# outcome, 0.90, falls short), as 8 it does (0.95). It fades by
# ``overall_decay`` per drafted token: at 32 requests within a few steps.
OVERALL_PRIOR_TOKENS = 8.0


# The per-request shrinkage weights (pseudo-drafted tokens) the history's
# posterior spans, from "believe each request" to "believe only the overall rate". What
# one request's own rate tells of its next draft depends on the drafter: the
# head's requests differ little (a decision log at batch 1, 2026-12-05: 0.26
# accepted after a rejected draft, 0.33 after an accepted one; ~23 pseudo-tokens
# by the between-request spread), and a fixed 2 stopped a request after one
# rejection (0.13, under break-even 0.165) whose next drafts accepted ~1.6x
# break-even; the draft model's requests differ more.
SHRINKAGE_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class AcceptanceHistory:
    """Each request's recent acceptance rate per drafted token, known before its
    next drafter pass (what the budget predicts the first drafted position by).

    Per request, exponentially decayed counts (``decay`` per verification) of
    accepted drafted tokens and of drafted tokens the verifier reached (the
    token after the last accepted one was reached and rejected; later ones were
    not reached). The prediction shrinks them toward the rate over all requests
    with ``w`` pseudo-tokens, ``(accepted + w p) / (reached + w)``;
    that rate decays slower (``overall_decay``), from ``prior`` held as
    ``prior_tokens`` drafted tokens (see :data:`OVERALL_PRIOR_TOKENS`).
    The weight is learnt (hierarchical Bayes over :data:`SHRINKAGE_WEIGHTS`,
    uniform at first): each verified draft multiplies every candidate's
    posterior by the likelihood of its outcome under the prediction that weight
    would have made just before it (``score_decay`` a draft forgets old
    evidence), and a prediction averages the candidates' by their posterior.
    Not the single best candidate: one engine picked 0.5 after the warm-up
    request's first two rejections (bench, 2026-12-06), every later rejection
    then put a request at ~0.07, it skipped the steps whose drafts would have
    shown otherwise, and it drafted on 7% of its steps.
    A request's counts also fade (``idle_decay``) on every step it drafts
    nothing (:meth:`forget`): a request that stopped drafting after a bad
    stretch learns nothing more, and kept its bad rate to its end (at batch 1,
    2026-12-03, the drafter then stayed off for most of a request; so did the
    rate over all requests, which decayed as fast as a request's and took the
    last request's tail: new requests borrowed it and never drafted).
    """

    def __init__(self, prior: float = 0.5, decay: float = 0.9,
                 overall_decay: float = 0.99, idle_decay: float = 0.8, max_tracked: int = 1024,
                 prior_tokens: float = OVERALL_PRIOR_TOKENS, score_decay: float = 0.999):
        self.score_decay = score_decay
        self.weight_scores = np.zeros(len(SHRINKAGE_WEIGHTS))  # log posterior, up to a constant
        self.posterior = self._normalised(self.weight_scores)  # what every prediction reads until the next observe
        self.decay = decay
        self.overall_decay = overall_decay
        self.idle_decay = idle_decay
        self.max_tracked = max_tracked
        self.overall = [prior * prior_tokens, prior_tokens]
        self.per_request: dict[str, list[float]] = {}

    def observe(self, req_ids: list[str], num_draft_tokens: list[int], num_accepted: list[int]) -> None:
        for req_id, drafted, accepted in zip(req_ids, num_draft_tokens, num_accepted):
            if drafted == 0:
                continue
            reached = accepted + (accepted < drafted)
            counts = self.per_request.pop(req_id, None) or [0.0, 0.0]
            self._score_weights(counts, accepted=accepted, rejected=reached - accepted)
            for c, decay in ((counts, self.decay), (self.overall, self.overall_decay)):
                c[0] = decay * c[0] + accepted
                c[1] = decay * c[1] + reached
            self.per_request[req_id] = counts  # most recent last
        while len(self.per_request) > self.max_tracked:
            self.per_request.pop(next(iter(self.per_request)))
        self.posterior = self._normalised(self.weight_scores)

    def _score_weights(self, counts: list[float], accepted: int, rejected: int) -> None:
        """Add to each candidate weight's log posterior the log-likelihood of one
        verified draft under the prediction it would have made before it (the
        request's counts then, the overall rate now)."""
        rate = np.clip(self._candidates(*counts, self.overall_rate), 1e-6, 1.0 - 1e-6)
        self.weight_scores = self.score_decay * self.weight_scores + accepted * np.log(rate) + rejected * np.log1p(-rate)

    @staticmethod
    def _normalised(log_posterior: np.ndarray) -> np.ndarray:
        odds = np.exp(log_posterior - log_posterior.max())
        return odds / odds.sum()

    def forget(self, req_ids: list[str]) -> None:
        """These requests draft nothing this step: their own counts fade toward the overall rate."""
        for req_id in req_ids:
            counts = self.per_request.get(req_id)
            if counts is not None:
                counts[0] *= self.idle_decay
                counts[1] *= self.idle_decay

    @property
    def overall_rate(self) -> float:
        accepted, reached = self.overall
        return accepted / reached if reached > 0 else 0.0

    @property
    def shrinkage_weight(self) -> float:
        """The weight learnt: the posterior's geometric mean over the candidates."""
        return float(np.exp(self.posterior @ np.log(SHRINKAGE_WEIGHTS)))

    def summary(self) -> dict[str, float]:
        """The rate over all requests and the shrinkage weight learnt (for /metrics and the benchmarks)."""
        return {"overall_rate": self.overall_rate, "shrinkage_weight": self.shrinkage_weight}

    @staticmethod
    def _candidates(accepted, reached, overall_rate: float) -> np.ndarray:
        """Counts shrunk toward ``overall_rate`` by each candidate weight (the
        last axis; counts may be arrays of column vectors)."""
        weights = np.asarray(SHRINKAGE_WEIGHTS)
        return (accepted + weights * overall_rate) / (reached + weights)

    def predict_batch(self, req_ids: list[str]) -> np.ndarray:
        """Each request's predicted acceptance per drafted token, all at once:
        one request at a time cost ~10 us each a step (0.16 ms at 16 requests,
        2-core CPU)."""
        counts = np.array([self.per_request.get(r, (0.0, 0.0)) for r in req_ids], dtype=np.float64).reshape(-1, 2)
        return self._candidates(counts[:, :1], counts[:, 1:], self.overall_rate) @ self.posterior

    def predict_if_accepted(self, req_ids: list[str]) -> np.ndarray:
        """Each request's prediction were every one of them to draft one token
        now and have it accepted (what :meth:`observe` would then leave, the
        weight's scores included; nothing is changed): the best that an
        exploring pass could show."""
        trial = copy.copy(self)
        trial.overall = list(self.overall)
        trial.per_request = {r: list(self.per_request[r]) for r in req_ids if r in self.per_request}
        trial.observe(req_ids, [1] * len(req_ids), [1] * len(req_ids))
        return trial.predict_batch(req_ids)


class DraftingRuns:
    """How many steps in a row a request goes on drafting once it drafts: the
    steps a catch-up's drafter KV serves before the request stops drafting and
    lags again (what :meth:`~vllm_cmasd.proposer.CmasdProposerMixin._who_drafts`
    prices a catch-up over, with the tokens the request may still generate).

    On every step, each request that drafted on the engine's previous step
    either drafts again or its run ends (a request that left the batch is
    neither). Decayed counts (``decay`` per step that observes one) of the
    two; the expected run is ``1 / P(end)``, ``(went_on + ended + w P) /
    (ended + w)`` with a prior run ``P`` of ``prior_weight`` ``w`` ends. Near
    break-even (served at 32 streams) the rule switched 32 lagging requests on
    for one step, their catch-ups (~2,000 tokens) priced over up to 64 steps;
    at batch 1 a request drafts on every step and the run stays long.
    """

    def __init__(self, prior_run: float, prior_weight: float = 1.0, decay: float = 0.95):
        self.prior_run = prior_run
        self.prior_weight = prior_weight
        self.decay = decay
        self.went_on = 0.0
        self.ended = 0.0
        self._drafted: set[str] = set()

    def observe(self, req_ids: list[str], drafts: list[bool]) -> None:
        """This step's requests and which of them draft (all False: no drafter pass)."""
        went_on = ended = 0
        for req_id, drafting in zip(req_ids, drafts):
            if req_id in self._drafted:
                went_on, ended = went_on + drafting, ended + (not drafting)
        if went_on or ended:
            self.went_on = self.decay * self.went_on + went_on
            self.ended = self.decay * self.ended + ended
        self._drafted = {r for r, d in zip(req_ids, drafts) if d}

    @property
    def expected_run(self) -> float:
        return (self.went_on + self.ended + self.prior_weight * self.prior_run) / (self.ended + self.prior_weight)


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
