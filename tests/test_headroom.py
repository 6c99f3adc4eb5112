"""The length-rule replay (vllm_cmasd/bench/headroom.py) on hand-made drafts."""

from __future__ import annotations

import pytest

from vllm_cmasd.bench.headroom import (
    Draft, StepCosts, acceptance_profile, fit_step_costs, fixed, headroom, oracle, replay, survival, window,
)

COSTS = StepCosts(fixed=0.2, per_token=0.1)
# Two drafts of 3 tokens: a confident one fully accepted, an unsure one rejected at once.
DRAFTS = [Draft((0.9, 0.9, 0.9), 3), Draft((0.2, 0.9, 0.9), 0)]


def test_fit_recovers_the_step_costs():
    rows = [(k, length, length / COSTS.step(k)) for k, length in ((1, 1.6), (2, 1.9), (4, 2.2))]
    fit = fit_step_costs(rows)
    assert fit.fixed == pytest.approx(0.2) and fit.per_token == pytest.approx(0.1)
    with pytest.raises(ValueError, match="two or more k"):
        fit_step_costs(rows[:1])


def test_replay_counts_tokens_and_time_by_hand():
    # k=2: tokens (2 + 1) + (0 + 1) = 4; time 2 x (1 + 0.2 + 0.2) = 2.8.
    assert replay(DRAFTS, fixed(2), COSTS) == pytest.approx(4 / 2.8)
    # The oracle drafts 3 then 0: tokens 4 + 1, time 1.5 + 1.
    assert replay(DRAFTS, oracle, COSTS) == pytest.approx(5 / 2.5)


def test_rules_stop_where_their_signal_falls():
    # (tokens kept, drafter passes run)
    assert [window(0.5, "product")(d) for d in DRAFTS] == [(3, 3), (1, 1)]  # 0.9^3 = 0.73 stays above
    assert window(0.85, "product")(DRAFTS[0]) == (2, 2)  # 0.9, then 0.81 < 0.85: that token kept, then stop
    assert window(0.5, "mean")(DRAFTS[1]) == (1, 1)
    # Survival drops the token below its threshold, after the pass that drafted it.
    assert survival(0.5, lambda c: c)(DRAFTS[0]) == (3, 3) and survival(0.5, lambda c: c)(DRAFTS[1]) == (0, 1)
    assert replay(DRAFTS, survival(0.5, lambda c: c), COSTS) == pytest.approx(5 / 2.5)
    # Charged: the second draft's dropped token adds its pass (0.1), not a verifying step's 0.2.
    assert replay(DRAFTS, survival(0.5, lambda c: c), COSTS, charged=True) == pytest.approx(5 / 2.6)


def test_headroom_ranks_the_families_against_the_best_fixed_k():
    drafts = DRAFTS * 10
    rows = {r["family"]: r for r in headroom(drafts, COSTS)}
    best_fixed = max(replay(drafts, fixed(k), COSTS) for k in (1, 2, 3))
    assert rows["fixed k"]["speedup_vs_plain"] == pytest.approx(best_fixed)
    assert rows["oracle"]["vs_best_fixed_k"] == pytest.approx(2.0 / best_fixed)
    # Confidence separates these drafts: the best window drafts 3 and 1 tokens,
    # tokens 4 + 1 in 1.5 + 1.3 steps, above every fixed k (best: k=3, 5 / 3).
    assert best_fixed == pytest.approx(5 / 3)
    assert rows["window, product"]["speedup_vs_plain"] == pytest.approx(5 / 2.8)
    assert acceptance_profile(DRAFTS) == [0.5, 0.5, 0.5]


def test_a_gate_skips_the_pass_before_it_runs():
    from vllm_cmasd.bench.headroom import gated

    unsure, sure, unknown = Draft((0.9,), 1, 0.1), Draft((0.9,), 1, 0.8), Draft((0.9,), 1, None)
    rule = gated(0.5, fixed(1))
    # Below the gate: no token, no pass; above it or unknown (after a prefill): the rule.
    assert [rule(d) for d in (unsure, sure, unknown)] == [(0, 0), (1, 1), (1, 1)]


def test_history_skips_right_after_a_miss():
    from vllm_cmasd.bench.headroom import after_a_miss

    drafts = [Draft((0.9,), 1, previous_accepted=0), Draft((0.9,), 1, previous_accepted=2), Draft((0.9,), 1)]
    assert [after_a_miss(fixed(1))(d) for d in drafts] == [(0, 0), (1, 1), (1, 1)]


def test_a_static_batch_waits_for_its_slowest_request():
    from vllm_cmasd.bench.headroom import StaticBatch, fit_static_batch_costs, static_batch_replay

    always = [Draft((0.9, 0.9), 2)]
    batch = StaticBatch(size=2, tokens=6, trials=3)
    # fixed(2): each request takes 3 tokens a step, so 2 steps, both verifying, 2 drafted a slot each.
    assert static_batch_replay(always, fixed(2), COSTS, batch) == pytest.approx(6 / (2 + 0.2 * 2 + 0.1 * 4))
    # Drafts that are all-or-nothing: per request the replay averages them, but a static
    # batch runs until its unluckiest request is done, so it gains less.
    mixed = [Draft((0.9, 0.9), 2), Draft((0.9, 0.9), 0)]
    wide = StaticBatch(size=8, tokens=12, trials=50)
    assert static_batch_replay(mixed, fixed(2), COSTS, wide) < replay(mixed, fixed(2), COSTS)
    # Costs fitted to rows the static replay produced come back.
    rows = [(k, 0.0, static_batch_replay(mixed, fixed(k), COSTS, wide)) for k in (1, 2)]
    fit = fit_static_batch_costs(mixed, rows, wide)
    assert fit.fixed == pytest.approx(0.2) and fit.per_token == pytest.approx(0.1)
