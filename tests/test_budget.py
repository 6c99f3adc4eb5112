"""The batch-aware draft budget's decisions, on hand-made cost models."""

import math

import pytest
import torch

from vllm_cmasd.budget import CostModel, StepBudget
from vllm_cmasd.calibration import NUM_BINS, AcceptanceCalibration
from vllm_cmasd.config import CmasdConfig
from vllm_cmasd.proposer import MAX_HORIZON, DraftWindow

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)


def costs(target, draft):
    return CostModel(TOKENS, tuple(float(target(n)) for n in TOKENS), tuple(float(draft(n)) for n in TOKENS))


@pytest.fixture
def one_rank(monkeypatch):
    """``_who_drafts`` outside an engine: one tensor-parallel rank, nothing to broadcast."""
    from types import SimpleNamespace

    from vllm_cmasd import proposer as proposer_module

    monkeypatch.setattr(proposer_module, "get_tp_group", lambda: SimpleNamespace(world_size=1))


def deciding_proposer(model: CostModel, acceptance_prior: float, remaining=None, skipped_in_a_row: int = 0):
    """What ``CmasdProposer._who_drafts`` reads of its proposer, by hand: k_max 4,
    a draft model's one new slot a request, costs measured from ``model``, every
    request at ``acceptance_prior``, ``remaining`` tokens per request (1000 each
    by default)."""
    from types import SimpleNamespace

    import numpy as np

    from vllm_cmasd.budget import AcceptanceHistory, DraftingRuns, MeasuredCosts
    from vllm_cmasd.proposer import EXPLORE_EVERY

    return SimpleNamespace(
        config=CmasdConfig(k_max=4), costs=MeasuredCosts(model), net_num_new_slots_per_request=1,
        acceptance=AcceptanceHistory(prior=acceptance_prior), _skipped_in_a_row=skipped_in_a_row,
        _explore_every=EXPLORE_EVERY, runs=DraftingRuns(prior_run=MAX_HORIZON),
        _remaining_tokens=remaining or (lambda ids: np.full(len(ids), 1000.0)),
    )


def test_cost_model_interpolates_and_extends():
    model = costs(lambda n: 1.0 + 0.5 * n, lambda n: 0.1 * n)
    assert model.target(3) == pytest.approx(2.5)
    assert model.target(24) == pytest.approx(13.0)
    assert model.target(256) == pytest.approx(129.0)  # linear past the last point
    assert model.draft(1) == pytest.approx(0.1)


def test_free_verification_admits_every_likely_token():
    """Memory-bound target (flat cost): any survival > 0 is worth verifying."""
    budget = StepBudget(costs(lambda n: 1.0, lambda n: 0.1), batch_size=4)
    assert budget.admit([0.9, 0.05, 0.5, 0.0], [True, True, True, True]) == [True, True, True, False]


def test_compute_bound_verification_admits_only_what_pays():
    """target(n) = n: a token costs as much as a request's whole step, so only
    survival above tokens/seconds of the step pays."""
    budget = StepBudget(costs(lambda n: float(n), lambda n: 0.0), batch_size=4)
    # rate = 4 tokens / 4 s = 1 token/s; a token costs 1 s: needs survival > 1.
    assert budget.admit([0.99, 0.9, 0.5, 0.3], [True] * 4) == [False] * 4
    # A drafter that costs something makes the step slower, so likely tokens pay.
    budget = StepBudget(costs(lambda n: float(n), lambda n: 4.0), batch_size=4)  # 4 tokens / 8 s
    assert budget.admit([0.99, 0.9, 0.3, 0.6], [True] * 4) == [True, True, False, True]


def test_another_pass_only_when_it_raises_the_rate():
    cheap_pass = StepBudget(costs(lambda n: 1.0 + 0.01 * n, lambda n: 0.05), batch_size=2)
    assert cheap_pass.another_pass([0.8, 0.1], [True, True]) == [True, True]
    dear_pass = StepBudget(costs(lambda n: 1.0 + 0.01 * n, lambda n: 5.0), batch_size=2)
    assert dear_pass.another_pass([0.8, 0.1], [True, True]) == [False, False]
    before = dear_pass.seconds
    assert dear_pass.another_pass([0.8, 0.1], [True, True], force=True) == [True, True]
    assert dear_pass.seconds == pytest.approx(before + 5.0)


def test_a_step_that_would_verify_pays_for_verifying_before_it_drafts():
    """The same pass pays where verifying is free and does not where a step that
    verifies costs a fixed extra larger than what the drafts are expected to save."""
    from dataclasses import replace

    model = costs(lambda n: 1.0 + 0.01 * n, lambda n: 0.05)
    free = StepBudget(model, batch_size=2, first_pass_paid=False)
    assert free.another_pass([0.8, 0.7], [True, True]) == [True, True]
    dear = StepBudget(replace(model, verify_request_s=0.5), batch_size=2, first_pass_paid=False)
    assert dear.another_pass([0.8, 0.7], [True, True]) == [False, False]


@pytest.mark.parametrize("gain", [0.02, 0.09, 0.16])
@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_a_first_pass_runs_only_where_it_raises_the_rate_by_the_margin(gain, batch_size):
    """A step of B requests runs a first pass only where it is predicted to
    raise the rate by FIRST_PASS_MARGIN x sqrt(2 ln B): the requests it pays
    for are the best of B noisy estimates; at batch 1 nothing is picked and any
    rise will do. A later pass needs only to raise it."""
    from vllm_cmasd.budget import FIRST_PASS_MARGIN

    assert FIRST_PASS_MARGIN == 0.05  # the gains below sit off each batch size's margin
    margin = FIRST_PASS_MARGIN * math.sqrt(2 * math.log(batch_size))  # 0, 0.059, 0.132
    model = costs(lambda n: 1.0, lambda n: 0.1)  # flat target: a verified token is free
    # Rate without the pass: B tokens / 1 s; with it: B (1 + s) / 1.1 s.
    survival = (1 + gain) * 1.1 - 1.0
    first = StepBudget(model, batch_size=batch_size, first_pass_paid=False)
    assert first.another_pass([survival] * batch_size, [True] * batch_size) == [gain > margin] * batch_size
    later = StepBudget(model, batch_size=batch_size)  # its first pass ran
    assert later.another_pass([survival] * batch_size, [True] * batch_size) == [True] * batch_size


def test_a_request_whose_catch_up_costs_more_than_it_gains_does_not_draft():
    """Equal survival, but the second request would first have to catch its
    drafter up: only it is left out; the cheaper one still drafts."""
    model = costs(lambda n: 1.0 + 0.01 * n, lambda n: 0.05)
    budget = StepBudget(model, batch_size=2, first_pass_paid=False)
    assert budget.another_pass([0.8, 0.8], [True, True], extra_seconds=[0.0, 2.0]) == [True, False]
    budget = StepBudget(model, batch_size=2, first_pass_paid=False)
    assert budget.another_pass([0.8, 0.8], [True, True], extra_seconds=[0.0, 0.01]) == [True, True]
    # The cheaper one first, although less likely: its value per second is higher.
    budget = StepBudget(model, batch_size=2, first_pass_paid=False)
    assert budget.another_pass([0.5, 0.9], [True, True], extra_seconds=[0.0, 10.0]) == [True, False]


def test_window_with_budget_keeps_k_min_and_stops_what_does_not_pay():
    config = CmasdConfig(k_max=6, draft_length="window", k_min=2, threshold=0.0, draft_budget="auto")
    # Compute-bound target, dear drafter passes: after k_min nothing pays.
    budget = StepBudget(costs(lambda n: float(n), lambda n: 3.0), batch_size=3)
    window = DraftWindow(3, config, torch.device("cpu"), budget, AcceptanceCalibration())
    tokens = torch.tensor([1, 2, 3])
    confidence = torch.tensor([0.95, 0.6, 0.2])
    assert window.add(tokens, None, confidence)  # position 0 < k_min: kept, all draft on
    assert window.lengths.tolist() == [1, 1, 1]
    assert not window.add(tokens, None, confidence)  # position 1 < k_min: kept; no pass pays
    assert window.lengths.tolist() == [2, 2, 2]

    # Without a budget the same window (threshold 0) drafts to k_max.
    window = DraftWindow(3, config, torch.device("cpu"))
    while window.add(tokens, None, confidence):
        pass
    assert window.lengths.tolist() == [6, 6, 6]


def test_window_with_free_verification_drafts_the_likely_requests_longer():
    config = CmasdConfig(k_max=8, draft_length="window", k_min=1, threshold=0.0, draft_budget="auto")
    budget = StepBudget(costs(lambda n: 1.0 + 0.02 * n, lambda n: 0.08), batch_size=2)
    window = DraftWindow(2, config, torch.device("cpu"), budget, AcceptanceCalibration())
    confidence = torch.tensor([0.95, 0.3])
    while window.add(torch.tensor([5, 6]), None, confidence):
        pass
    confident, unsure = window.lengths.tolist()
    assert 1 <= unsure < confident <= 8


def flat_calibration(acceptance: float) -> AcceptanceCalibration:
    """Every confidence accepted with the same probability, firmly (many pseudo-tokens)."""
    return AcceptanceCalibration(prior_accepted=[1000 * acceptance] * NUM_BINS, prior_reached=[1000.0] * NUM_BINS)


def draft_lengths(config, budget, calibration, confidence) -> list[int]:
    window = DraftWindow(len(confidence), config, torch.device("cpu"), budget, calibration)
    tokens = torch.arange(len(confidence))
    while window.add(tokens, None, confidence):
        pass
    return window.lengths.tolist()


def test_controller_keeps_nothing_where_no_token_pays():
    """Compute-bound target: even the first drafted token is not worth verifying,
    so the controller keeps none (the window would keep k_min = 1)."""
    config = CmasdConfig(k_max=6)
    budget = StepBudget(costs(lambda n: float(n), lambda n: 0.0), batch_size=2)
    assert draft_lengths(config, budget, flat_calibration(0.9), torch.tensor([0.9, 0.9])) == [0, 0]


def test_controller_drafts_longer_under_a_more_lenient_verifier():
    """Same drafts, same costs: a calibration that accepts more (what a lenient
    verifier teaches it) makes longer drafts; the threshold plays no part."""
    config = CmasdConfig(k_max=8)
    confidence = torch.tensor([0.6])

    def lengths(acceptance):
        budget = StepBudget(costs(lambda n: 1.0 + 0.02 * n, lambda n: 0.15), batch_size=1)
        return draft_lengths(config, budget, flat_calibration(acceptance), confidence)[0]

    strict, lenient = lengths(0.5), lengths(0.95)
    assert 1 <= strict < lenient <= 8


def test_profile_points_are_capped():
    from vllm_cmasd.budget import MAX_PROFILED_TOKENS, _profile_points

    assert _profile_points(1) == [1]
    assert _profile_points(20) == [1, 2, 4, 8, 16, 20]
    assert _profile_points(2304)[-1] == MAX_PROFILED_TOKENS


def test_measured_costs_learn_what_the_profile_misses():
    from vllm_cmasd.budget import MeasuredCosts

    prior = costs(lambda n: 1.0 + 0.1 * n, lambda n: 0.2 + 0.01 * n)
    measured = MeasuredCosts(prior)
    assert measured.target(16) == pytest.approx(prior.target(16)) and measured.draft(9) == pytest.approx(prior.draft(9))
    # Real steps: 0.5 s more per step (scheduling, sampling) and attention
    # doubles the slope; measured at 16..40 tokens only.
    # A step that verifies drafts costs 0.03 s more per request (rejection
    # sampling, bookkeeping, the attention backend's path for longer queries)
    # and 0.05 s more per drafted token than per request token.
    for i in range(200):
        if i % 3:
            n = 16 + (i % 4) * 8
            measured.observe_target_step(n, 1.5 + 0.2 * n, batch_size=n)
        else:
            batch, drafted = 8 + (i % 5) * 2, 2 + (i % 4) * 4
            n = batch + drafted
            measured.observe_target_step(n, 1.5 + 0.2 * n + 0.03 * batch + 0.05 * drafted, batch_size=batch,
                                         verified_drafts=True)
    assert measured.target(24) == pytest.approx(1.5 + 0.2 * 24, rel=0.02)
    assert measured.target(25) - measured.target(24) == pytest.approx(0.2, rel=0.05)  # the marginal cost
    assert measured.verify(10) == pytest.approx(0.3, rel=0.1)
    assert measured.verified_token(24) == pytest.approx(0.25, rel=0.05)
    assert measured.coefficients["target_verify_request_s"] == pytest.approx(0.03, rel=0.1)
    # Drafting costs 25% more per pass and per token than its profiled forwards.
    for i in range(200):
        first, more = 24 + i % 3 * 8, 1 + i % 4
        measured.observe_drafting(first_pass_tokens=first, more_passes=more, batch_size=8,
                                  seconds=1.25 * (prior.draft(first) + more * prior.draft(8)))
    assert measured.draft(8) == pytest.approx(1.25 * prior.draft(8), rel=0.02)
    assert measured.draft(40) == pytest.approx(1.25 * prior.draft(40), rel=0.02)
    # An idle gap between requests is not a step's cost.
    before, samples = measured.target(24), measured.num_target_samples
    measured.observe_target_step(24, 100.0, batch_size=24)
    assert measured.target(24) == before and measured.num_target_samples == samples
    fit = measured.summary()
    assert fit["draft_samples"] == 200 and len(fit["target_s"]) == len(TOKENS)


def test_a_long_run_of_verifying_steps_keeps_what_a_step_without_drafts_costs():
    """Served at 8 streams on a 2-core CPU (step probe, 2026-12-05): a decode step
    of 8 requests took 173 ms without drafts and ~85 ms more with a draft to
    verify, then ~20 ms more per drafted token. Once the controller drafts on
    every step, the fit must still know both: a single decay over all steps
    forgot the steps without drafts and could not tell verifying's cost from the
    intercept (served, it fitted that cost at -15 to -69 ms, and a step without
    drafts looked as dear as one with)."""
    from vllm_cmasd.budget import MeasuredCosts

    # The profile: forwards only, cheaper than real steps.
    measured = MeasuredCosts(costs(lambda n: 0.05 + 0.008 * n, lambda n: 0.005 + 0.0005 * n))
    for i in range(40):  # decode steps without drafts, 6-8 requests
        batch = 6 + i % 3
        measured.observe_target_step(batch, 0.093 + 0.01 * batch, batch_size=batch)
    for i in range(300):  # then every step verifies 1-6 drafted tokens at 8 requests
        drafted = 1 + i % 6
        measured.observe_target_step(8 + drafted, 0.093 + 0.01 * 8 + 0.085 + 0.02 * (drafted - 1),
                                     batch_size=8, verified_drafts=True)
    assert measured.target(8) == pytest.approx(0.173, rel=0.05)
    assert measured.verify(8) == pytest.approx(0.085, rel=0.25)



@pytest.mark.parametrize("seed", range(6))
def test_steps_that_draft_one_token_a_request_leave_a_drafted_token_priced_as_a_step_s_own(seed):
    """Where the only verifying steps are exploring passes (every request drafts
    one token, now and then one or two left out), the per-request extra and the
    per-drafted-token extra are one column: the fit puts their sum on the
    request and keeps a drafted token at what a step's own token costs. Split
    by the noise instead, served at 32 streams, a drafted token fitted at -17 ms
    (priced free) and in-process at -15 to +8 ms (2026-12-04/05)."""
    import numpy as np

    from vllm_cmasd.budget import MeasuredCosts

    rng = np.random.default_rng(seed)
    measured = MeasuredCosts(costs(lambda n: 0.04 + 0.002 * n, lambda n: 0.004 + 0.0002 * n))
    for i in range(250):  # 2.5 ms a token, 2 ms more a request when verifying, 5 ms of noise
        if i % 20 == 19:
            batch, drafted = 32, 32 - int(rng.choice([0, 0, 0, 1, 2]))
            measured.observe_target_step(batch + drafted, 0.07 + 0.0025 * (batch + drafted) + 0.002 * batch
                                         + rng.normal(0, 0.005), batch_size=batch, verified_drafts=True)
        else:
            batch = int(rng.integers(24, 33))
            measured.observe_target_step(batch, 0.07 + 0.0025 * batch + rng.normal(0, 0.005), batch_size=batch)
    assert abs(measured.coefficients["target_drafted_token_s"]) < 0.0005
    assert 0.0015 < measured.verified_token(64) < 0.0035
    assert 0.032 < measured.verify(32) < 0.128

def test_measured_costs_learn_from_a_prior_several_times_too_low():
    """A profile that misses most of a step (a tiny model: 0.7 ms of forward in
    a 3-4 ms step) must not make every real step look like a stall: a sample
    is an outlier only against what recent samples measured, and an idle gap
    still is one."""
    from vllm_cmasd.budget import MeasuredCosts

    measured = MeasuredCosts(costs(lambda n: 0.0007, lambda n: 0.0002))
    for i in range(30):
        measured.observe_target_step(2, 0.0035 + 0.0001 * (i % 5), batch_size=2)
    assert measured.num_target_samples >= 25
    assert measured.target(2) == pytest.approx(0.0037, rel=0.1)
    samples = measured.num_target_samples
    measured.observe_target_step(2, 1.0, batch_size=2)  # an idle gap between two generate calls
    assert measured.num_target_samples == samples


def test_acceptance_history_predicts_per_request_and_falls_back_to_all():
    from vllm_cmasd.budget import AcceptanceHistory

    history = AcceptanceHistory(prior=0.5)
    assert history.predict_batch(["new"])[0] == pytest.approx(0.5)
    for _ in range(40):
        # "a" accepts all 4 drafted tokens; "b" rejects its first; "c" drafted nothing.
        history.observe(["a", "b", "c"], [4, 4, 0], [4, 0, 0])
    # Each shrunk toward the overall rate by two pseudo-tokens.
    assert history.predict_batch(["a"])[0] > 0.95 and history.predict_batch(["b"])[0] < 0.15
    assert 0.6 < history.predict_batch(["new"])[0] < 0.9  # 4 accepted of 5 reached per step overall
    assert "c" not in history.per_request
    # "b" stops drafting: on the steps it drafts nothing it returns to the
    # overall rate (and so drafts again), rather than keeping its bad stretch.
    for _ in range(40):
        history.forget(["b"])
    assert history.predict_batch(["b"])[0] == pytest.approx(history.predict_batch(["new"])[0], abs=0.01)


def test_a_batch_of_predictions_is_each_requests_own():
    """predict_batch (the rule's, all requests at once) gives each request its
    counts shrunk toward the overall rate, averaged over the weights' posterior."""
    from vllm_cmasd.budget import SHRINKAGE_WEIGHTS, AcceptanceHistory

    history = AcceptanceHistory(prior=0.5)
    history.observe(["a", "b", "c"], [4, 2, 3], [4, 0, 1])
    history.observe(["a", "c"], [3, 3], [1, 3])
    ids = ["c", "new", "a", "b"]
    rate = history.overall_rate
    for req_id, value in zip(ids, history.predict_batch(ids).tolist()):
        accepted, reached = history.per_request.get(req_id, (0.0, 0.0))
        shrunk = [(accepted + w * rate) / (reached + w) for w in SHRINKAGE_WEIGHTS]
        assert value == pytest.approx(sum(p * x for p, x in zip(history.posterior, shrunk))), req_id
    assert len(set(history.predict_batch(ids).round(6).tolist())) == 4


def test_the_shrinkage_weight_is_learnt_from_how_far_requests_differ():
    """Where every request drafts at one rate (the head's, near enough), one
    request's rejections say little of its next draft: the history learns to
    lean on the overall rate, and a request rejected twice still predicts near
    it (a fixed 2 pseudo-tokens read 0.13 and stopped it, 2026-12-05). Where
    requests differ (some nearly always accepted, some nearly never), it
    learns to believe each request."""
    import numpy as np

    from vllm_cmasd.budget import AcceptanceHistory

    def history_of(rates) -> AcceptanceHistory:
        rng = np.random.default_rng(0)
        history = AcceptanceHistory(prior=0.5)
        for i, rate in enumerate(rates):
            for _ in range(30):  # one-token drafts
                history.observe([f"r{i}"], [1], [int(rng.random() < rate)])
        return history

    alike = history_of([0.28] * 40)
    assert alike.shrinkage_weight >= 32
    alike.observe(["new", "new"], [1, 1], [0, 0])
    assert alike.predict_batch(["new"])[0] > 0.2
    differing = history_of([0.95, 0.05] * 20)
    assert differing.shrinkage_weight <= 2
    differing.observe(["new", "new"], [1, 1], [0, 0])
    assert differing.predict_batch(["new"])[0] < 0.2


def test_a_few_early_rejections_do_not_settle_the_shrinkage_weight():
    """Early on the weight is uncertain and a prediction averages over it: the
    single likeliest weight after a new engine's warm-up request saw two
    rejections was the smallest (0.5), every later rejection then put a request
    at ~0.1, under break-even, and that engine drafted on 7% of its steps (bench,
    2026-12-06)."""
    from vllm_cmasd.budget import AcceptanceHistory

    history = AcceptanceHistory(prior=0.5)
    history.observe(["warm-up", "warm-up"], [1, 1], [0, 0])
    history.observe(["next"], [1], [0])
    assert 0.5 < history.shrinkage_weight < 32
    assert history.predict_batch(["next"])[0] > 0.2


def test_the_best_outcome_of_exploring_is_what_observing_it_would_leave():
    """``predict_if_accepted`` is the prediction after every request's one-token
    draft is observed accepted, computed without changing the history."""
    import copy

    from vllm_cmasd.budget import AcceptanceHistory

    history = AcceptanceHistory(prior=0.5)
    for i in range(50):
        history.observe(["a", f"old{i}"], [3, 1], [i % 3, 0])
    history.forget(["a"])
    ids = ["a", "new", "other"]
    before = copy.deepcopy((history.overall, history.per_request))
    best = history.predict_if_accepted(ids)
    assert (history.overall, history.per_request) == before  # nothing changed
    observed = copy.deepcopy(history)
    observed.observe(ids, [1, 1, 1], [1, 1, 1])
    assert best.tolist() == pytest.approx(observed.predict_batch(ids).tolist())
    assert (best > history.predict_batch(ids)).all()


def test_the_overall_rate_outlives_one_request_s_tail():
    """A new request borrows the rate over all requests; one request's bad tail
    does not become it (AMD, 2026-12-03: it did, at 0.28, and at batch 1 no new
    request drafted again)."""
    from vllm_cmasd.budget import AcceptanceHistory

    history = AcceptanceHistory(prior=0.5)
    for _ in range(100):  # a long run at 0.75: 3 accepted of 4 reached
        history.observe(["good"], [4], [3])
    for _ in range(10):  # then one request whose drafts are all rejected
        history.observe(["tail"], [2], [0])
    assert history.predict_batch(["tail"])[0] < 0.3
    assert history.predict_batch(["new"])[0] > 0.6


def test_a_draft_is_worth_its_expected_accepted_tokens():
    """Before the first pass a request's draft is valued as the draft the rule
    would make at its acceptance: positions while a^j beats a plain step's
    rate for their cost (a share of a pass and one verified token)."""
    from vllm_cmasd.budget import expected_draft

    model = costs(lambda n: 0.1, lambda n: 0.01)  # verifying is free: a position costs its pass
    (tokens, low), (seconds, _) = expected_draft(model, [0.8, 0.3], batch_size=1, k_max=8)
    # A plain step makes 10 tokens/s, a position costs 0.01 s: a^j > 0.1 up to j = 10, k_max stops at 8.
    assert tokens == pytest.approx(sum(0.8**j for j in range(1, 9)))
    assert seconds == pytest.approx(7 * 0.01)  # the first position is the caller's
    assert low == pytest.approx(0.3)  # 0.09 < 0.1: the first position only
    assert expected_draft(model, [0.3], batch_size=1, k_max=8)[1][0] == 0.0
    # Where verifying costs 0.01 s a token, a larger batch drafts shorter: at
    # batch 1 a position must beat 0.02 s x 9.1 tokens/s = 0.18, at batch 4
    # (a quarter of the pass each) 0.0125 s x 28.6 tokens/s = 0.36.
    model = costs(lambda n: 0.1 + 0.01 * n, lambda n: 0.01)
    assert expected_draft(model, [0.5], batch_size=1, k_max=8)[0][0] == pytest.approx(0.75)
    assert expected_draft(model, [0.5], batch_size=4, k_max=8)[0][0] == pytest.approx(0.5)


def test_a_long_pass_s_extra_tokens_are_priced_at_their_own_measured_rate():
    """Tokens a first pass runs beyond a decode step's (a prefill, a catch-up)
    cost less each than the short passes' slope: their own rate, from the
    profile's long passes first, then from such passes on the running engine."""
    from vllm_cmasd.budget import MeasuredCosts

    prior = costs(lambda n: 0.1 + 0.002 * n, lambda n: 0.01 + 0.001 * n if n < 16 else 0.02 + 0.0002 * n)
    measured = MeasuredCosts(prior)
    assert measured.warm_up(100) == pytest.approx(0.02)  # the profile's slope from 16 tokens
    for _ in range(50):
        measured.observe_warm_up(300, 300 * 0.0004)
    assert measured.warm_up(100) == pytest.approx(0.04, rel=0.01)
    assert measured.coefficients["warm_up_token_s"] == pytest.approx(0.0004, rel=0.01)
    measured.observe_warm_up(300, 100.0)  # a stall, not a cost
    assert measured.warm_up(100) == pytest.approx(0.04, rel=0.01)


def test_only_requests_whose_catch_up_pays_draft_and_only_they_catch_up(one_rank):
    """The controller's first-pass decision on hand-made costs: of two
    requests with the same history, the one lagging by a long prompt does not
    draft; the catch-up plan then leaves it lagging (blocked, nothing missed
    run) and gives the room to the one that drafts."""
    import numpy as np

    from vllm_cmasd.catchup import DrafterLag
    from vllm_cmasd.proposer import CmasdProposer

    model = costs(lambda n: 0.1 + 0.002 * n, lambda n: 0.01 + 0.001 * n)
    remaining = {"current": 1000, "lagging": 1000}
    proposer = deciding_proposer(model, acceptance_prior=0.8,
                                 remaining=lambda ids: np.array([remaining[i] for i in ids], dtype=float))
    lag = DrafterLag(max_tracked=8)
    lag.skip(["current", "lagging"], np.array([40, 600]))
    lag.lag_start.pop("current")  # "current" drafted since
    num_computed, query_lens = np.array([42, 602]), np.array([2, 2])
    plan = lag.plan(["current", "lagging"], num_computed, query_lens, room=1000)
    catch_ups = np.maximum(plan.query_lens(query_lens) - query_lens, 0)
    assert catch_ups.tolist() == [0, 2]  # it missed two steps' tokens so far
    drafts, explore_room = CmasdProposer._who_drafts(proposer, ["current", "lagging"], query_lens, catch_ups)
    assert drafts.tolist() == [True, True] and explore_room is None  # a short catch-up pays
    lag.lag_start["lagging"] = 0  # a skipped prefill: the whole prompt missed
    plan = lag.plan(["current", "lagging"], num_computed, query_lens, room=1000)
    catch_ups = np.maximum(plan.query_lens(query_lens) - query_lens, 0)
    # Its prompt's drafter KV would serve the ~300 steps it may still run: it pays ...
    drafts, _ = CmasdProposer._who_drafts(proposer, ["current", "lagging"], query_lens, catch_ups)
    assert drafts.tolist() == [True, True]
    remaining["lagging"] = 20  # ... but not the few steps of a request near its end
    drafts, _ = CmasdProposer._who_drafts(proposer, ["current", "lagging"], query_lens, catch_ups)
    assert drafts.tolist() == [True, False]
    plan = lag.plan(["current", "lagging"], num_computed, query_lens, room=1000, wanted=drafts)
    assert plan.missed.tolist() == [0, 0] and plan.blocked.tolist() == [False, True]
    lag.ran(["current", "lagging"], plan, new_slots=1)
    assert lag.lag_start == {"lagging": 0}  # still lags from its prompt's start



def test_a_drafting_run_is_long_while_requests_draft_on_and_short_after_switch_ons_that_end():
    """The steps a request is expected to go on drafting once it drafts: long at
    batch 1, where one request drafts on every step; a step that switches 32
    requests on for that step alone shortens it to about 3; steps without a
    drafter pass tell nothing."""
    from vllm_cmasd.budget import DraftingRuns

    runs = DraftingRuns(prior_run=MAX_HORIZON)
    assert runs.expected_run == MAX_HORIZON  # nothing seen: the old horizon
    for _ in range(100):
        runs.observe(["a"], [True])
    assert runs.expected_run > MAX_HORIZON
    ids = [f"r{i}" for i in range(32)]
    runs.observe(ids, [True] * 32)  # "a" left: neither went on nor ended
    runs.observe(ids, [False] * 32)  # all 32 runs ended after one step
    assert 2.0 < runs.expected_run < 4.0
    before = runs.expected_run
    for _ in range(10):
        runs.observe(ids, [False] * 32)
    assert runs.expected_run == before
    for _ in range(40):  # they draft on, step after step
        runs.observe(ids, [True] * 32)
    assert runs.expected_run > 20


def test_a_catch_up_is_priced_over_the_run_it_is_expected_to_serve(one_rank):
    """32 lagging requests (60 tokens each) whose drafts would pay were their
    catch-ups priced over the tokens they may still generate (64 steps) do not
    switch on once switch-ons have been seen to last one step: the catch-ups'
    drafter KV then serves about 3 steps (served at 32 streams, 2026-12-05,
    such a switch-on ran ~2,000 catch-up tokens for one step of drafts).
    Requests that do not lag still draft."""
    import numpy as np

    from vllm_cmasd.proposer import CmasdProposer

    model = costs(lambda n: 0.1 + 0.001 * n, lambda n: 0.002 + 0.0002 * n)  # a cheap drafter
    ids = [f"r{i}" for i in range(32)]
    proposer = deciding_proposer(model, acceptance_prior=0.7)
    query_lens, lagging, current = np.ones(32, dtype=np.int64), np.full(32, 60), np.zeros(32, dtype=np.int64)
    drafts, _ = CmasdProposer._who_drafts(proposer, ids, query_lens, lagging)
    assert drafts.all()
    proposer.runs.observe(ids, [False] * 32)  # the next step drafted nothing: the runs ended
    drafts, _ = CmasdProposer._who_drafts(proposer, ids, query_lens, lagging)
    assert not drafts.any() and proposer.runs.expected_run < 4.0
    drafts, _ = CmasdProposer._who_drafts(proposer, ids, query_lens, current)
    assert drafts.all()

def test_an_exploring_pass_spends_at_most_its_share_of_the_step(one_rank):
    """After EXPLORE_EVERY steps without a drafter pass every request explores,
    in a pass that costs at most EXPLORE_MAX_COST of the target's step for the
    tokens it schedules, every token at full price: the catch-ups that fit run,
    cheapest first, the next one is split, the rest wait. Priced per step over
    the catch-up horizon instead, one exploring pass at 32 streams ran a
    handful of whole-prompt catch-ups to draft a token each (bench-serve,
    2026-12-02: 13093 catch-up tokens for 64 requests)."""
    import numpy as np

    from vllm_cmasd.catchup import DrafterLag
    from vllm_cmasd.proposer import EXPLORE_EVERY, CmasdProposer

    ids = ["a", "b", "c", "d"]
    query_lens = np.ones(4, dtype=np.int64)  # a decode step: 0.108 s of target, half of it 54 ms

    def decide(skipped_in_a_row: int, catch_ups: list[int], draft_pass_s: float = 0.0105, query_lens=query_lens):
        # Acceptance so low that no draft pays by the rule: only exploring drafts.
        model = costs(lambda n: 0.1 + 0.002 * n, lambda n: draft_pass_s + 0.001 * n)
        proposer = deciding_proposer(model, acceptance_prior=0.01, skipped_in_a_row=skipped_in_a_row)
        drafts, explore_room = CmasdProposer._who_drafts(proposer, ids, query_lens, np.array(catch_ups))
        return drafts.tolist(), explore_room

    assert decide(EXPLORE_EVERY - 1, [0, 0, 0, 0]) == ([False] * 4, None)
    assert decide(EXPLORE_EVERY, [0, 0, 0, 0]) == ([True] * 4, 0)  # 18.5 ms of drafter
    # 8 own tokens and 35 catch-up tokens cost 53.5 ms; lags of 8 and 20 tokens fit whole.
    assert decide(EXPLORE_EVERY, [8, 0, 20, 0]) == ([True] * 4, 28)
    drafts, room = decide(EXPLORE_EVERY, [8, 600, 20, 600])
    assert drafts == [True] * 4 and room == 35
    # The plan runs the two short catch-ups, splits the next, and the last runs
    # one missed token in place of its own.
    lag = DrafterLag(max_tracked=8)
    num_computed = np.array([100, 600, 200, 600])
    lag.lag_start.update(a=92, b=0, c=180, d=0)
    plan = lag.plan(ids, num_computed, query_lens, room=room, cheapest_first=True)
    assert plan.missed.tolist() == [8, 8, 20, 1] and plan.partial.tolist() == [False, True, False, True]
    assert plan.blocked.tolist() == [False, True, False, True]
    # A drafter pass that alone costs more than half the step does not explore.
    assert decide(EXPLORE_EVERY, [0, 0, 0, 0], draft_pass_s=0.06) == ([False] * 4, None)
    # A step that also prefills 500 tokens of a new request: its share is of a
    # decode step's, which the prefill's own tokens in the pass exceed (a share
    # of the 1.1 s step would have been 0.55 s of drafter); the next step explores.
    prefilling = np.array([1, 1, 1, 500])
    assert decide(EXPLORE_EVERY, [0, 0, 0, 0], query_lens=prefilling) == ([False] * 4, None)


def test_exploring_backs_off_while_it_finds_nothing_and_resets_once_the_rule_drafts(one_rank):
    """Exploring that leads to no drafting by the rule comes half as often each
    time (8, 16, 32, 64 steps apart, then 64); once the rule drafts by itself,
    the next exploring pass comes EXPLORE_EVERY steps after it stops."""
    import numpy as np

    from vllm_cmasd.proposer import EXPLORE_EVERY, MAX_EXPLORE_EVERY, CmasdProposer

    model = costs(lambda n: 0.1 + 0.002 * n, lambda n: 0.0105 + 0.001 * n)
    proposer = deciding_proposer(model, acceptance_prior=0.01)
    ids, query_lens, catch_ups = ["a", "b"], np.ones(2, dtype=np.int64), np.zeros(2, dtype=np.int64)

    def exploring_steps(num_steps: int) -> list[int]:
        steps = []
        for step in range(num_steps):
            drafts, explore_room = CmasdProposer._who_drafts(proposer, ids, query_lens, catch_ups)
            if explore_room is not None:
                assert drafts.all()
                steps.append(step)
            else:
                assert not drafts.any()  # nothing pays by the rule
        return steps

    gaps = np.diff([-1, *exploring_steps(400)]).tolist()
    assert gaps[:5] == [EXPLORE_EVERY + 1, 17, 33, MAX_EXPLORE_EVERY + 1, MAX_EXPLORE_EVERY + 1]
    # The acceptance turns good: the rule drafts by itself, and resets the interval.
    for _ in range(30):
        proposer.acceptance.observe(ids, [4, 4], [4, 4])
    drafts, explore_room = CmasdProposer._who_drafts(proposer, ids, query_lens, catch_ups)
    assert drafts.all() and explore_room is None and proposer._explore_every == EXPLORE_EVERY


def test_exploring_waits_where_even_its_best_outcome_would_not_switch_drafting_on(one_rank):
    """An exploring pass runs only if the rule would draft after the best it
    could show (every request's draft accepted, every catch-up run). At 32
    requests on a CPU-like target (a drafted token ~ a request's own token) the
    rule needs ~0.9 accepted per drafted token: a drafter seen to accept 35% is
    not explored there (at 32 streams exploring cost ~2% and never switched
    drafting on), but is at 4 requests (~0.4 needed), and so is one with nothing verified yet."""
    import numpy as np

    from vllm_cmasd.proposer import EXPLORE_EVERY, CmasdProposer

    # The served 32-stream fit (bench-serve, 2026-12-05): 68 ms + 3.1 ms a token; 5.5 ms + 0.22 ms a drafter token.
    model = CostModel(TOKENS, tuple(0.068 + 0.0031 * n for n in TOKENS), tuple(0.0055 + 0.00022 * n for n in TOKENS),
                      verify_request_s=0.0005)

    def explores(batch_size: int, seen: bool) -> bool:
        proposer = deciding_proposer(model, acceptance_prior=0.5, skipped_in_a_row=EXPLORE_EVERY)
        if seen:  # 400 one-token drafts of earlier requests, 35% accepted
            for i in range(400):
                proposer.acceptance.observe([f"old{i}"], [1], [int(i % 20 < 7)])
        ids = [f"r{i}" for i in range(batch_size)]
        drafts, explore_room = CmasdProposer._who_drafts(
            proposer, ids, np.ones(batch_size, dtype=np.int64), np.zeros(batch_size, dtype=np.int64)
        )
        assert drafts.all() == (explore_room is not None) and drafts.any() == drafts.all()
        return explore_room is not None

    assert not explores(batch_size=32, seen=True)
    assert explores(batch_size=4, seen=True)
    assert explores(batch_size=32, seen=False)


def test_an_engine_s_first_verifying_steps_do_not_keep_it_from_drafting(one_rank):
    """A bench engine's first steps on the head at batch 1 (2026-12-05), replayed:
    its warm-up request's three verifying steps ran 6-10 ms over the steps without
    drafts around them, and it drafted with a ~5 ms head pass. At 0.2 accepted per
    drafted token (what its warm-up left; the head accepts ~0.26) drafting one
    token pays if verifying adds what later steps measured (0-4 ms). Fitted from
    those three steps alone, verifying read 5-6 ms, drafting paid only above
    ~0.28, and the engine, measuring nothing of verifying while it did not draft,
    drafted on 1-23% of its steps from then on."""
    import numpy as np

    from vllm_cmasd.proposer import CmasdProposer

    # Its profile: forwards only (38-41 ms for the target, 2 ms for the head).
    model = costs(lambda n: 0.038 + 0.001 * n, lambda n: 0.002 + 0.00015 * n)
    proposer = deciding_proposer(model, acceptance_prior=0.2)
    proposer.net_num_new_slots_per_request = 0  # a head: no new slot
    verifying = {0: (2, 0.0530), 2: (3, 0.0525), 5: (3, 0.0544)}  # (scheduled tokens, seconds)
    without = [0.0456, 0.0450, 0.0488, 0.0452, 0.0451, 0.0437, 0.0443, 0.0438, 0.0450, 0.0446, 0.0446, 0.0479]
    for step in range(len(without) + len(verifying)):
        if step in verifying:
            n, seconds = verifying[step]
            proposer.costs.observe_target_step(n, seconds, batch_size=1, verified_drafts=True)
            proposer.costs.observe_drafting(first_pass_tokens=n, more_passes=1, batch_size=1, seconds=0.0055)
        else:
            proposer.costs.observe_target_step(1, without.pop(0), batch_size=1)
    assert proposer.costs.verify(1) < 0.002
    drafts, explore_room = CmasdProposer._who_drafts(proposer, ["next"], np.ones(1, dtype=np.int64),
                                                     np.zeros(1, dtype=np.int64))
    assert drafts.all() and explore_room is None  # the rule drafts, not an exploring pass


def test_a_new_engine_s_first_rejections_do_not_keep_it_from_drafting(one_rank):
    """At batch 1 the head accepts ~0.26 of its first drafted tokens and drafting
    one pays from ~0.17 (the costs a bench engine measured, 2026-12-05). A new
    engine whose first six drafts were rejected (16% likely at 0.26) still
    drafts the next request; with the rate over all requests held at its prior
    as 2 drafted tokens it read 0.12 and the engine drafted on ~1% of its later
    steps, since nothing moves that rate while no request drafts. A drafter seen
    to accept 10% over 60 drafts is not drafted."""
    import numpy as np

    from vllm_cmasd.proposer import CmasdProposer

    model = CostModel(TOKENS, tuple(0.0446 + 0.0012 * n for n in TOKENS), tuple(0.005 + 0.00015 * n for n in TOKENS),
                      verify_request_s=0.001)

    def drafts_next_request(observed: list[int]) -> bool:
        proposer = deciding_proposer(model, acceptance_prior=0.5)
        proposer.net_num_new_slots_per_request = 0  # a head: no new slot
        for accepted in observed:
            proposer.acceptance.observe(["earlier"], [1], [accepted])
        drafts, explore_room = CmasdProposer._who_drafts(proposer, ["next"], np.ones(1, dtype=np.int64),
                                                         np.zeros(1, dtype=np.int64))
        return bool(drafts.all()) and explore_room is None

    assert drafts_next_request([0] * 6)
    assert not drafts_next_request([int(i % 10 == 0) for i in range(60)])


def test_a_request_s_rejections_do_not_stop_it_where_requests_differ_little(one_rank):
    """The batch-1 decision log on the head (2026-12-05), replayed: requests
    accept ~0.28 of their drafted tokens alike, drafting one pays from ~0.17,
    and a request's next draft after a rejection accepted ~0.26. With 2
    pseudo-tokens of shrinkage two rejections put a request at ~0.13 and it
    skipped the next steps (vLLM's fixed k drafted through them and ran ~4%
    faster); with the weight learnt from the earlier requests it drafts on."""
    import numpy as np

    from vllm_cmasd.proposer import CmasdProposer

    model = CostModel(TOKENS, tuple(0.0446 + 0.0012 * n for n in TOKENS), tuple(0.005 + 0.00015 * n for n in TOKENS),
                      verify_request_s=0.001)
    proposer = deciding_proposer(model, acceptance_prior=0.5)
    proposer.net_num_new_slots_per_request = 0  # a head: no new slot
    rng = np.random.default_rng(0)
    for i in range(40):
        for _ in range(30):
            proposer.acceptance.observe([f"earlier{i}"], [1], [int(rng.random() < 0.28)])
    proposer.acceptance.observe(["next", "next"], [1, 1], [0, 0])
    drafts, explore_room = CmasdProposer._who_drafts(proposer, ["next"], np.ones(1, dtype=np.int64),
                                                     np.zeros(1, dtype=np.int64))
    assert drafts.all() and explore_room is None
