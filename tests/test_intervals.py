"""The benchmarks' confidence interval of a speedup over rounds (bench/intervals.py)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_cmasd.bench.intervals import speedup_interval


def test_three_rounds_give_students_t_around_the_geometric_mean():
    # ln ratios 0, ln 1.1, ln 1.21: mean ln 1.1, sample sd ln 1.1, t(0.975, df=2) = 4.3027.
    low, high = speedup_interval([1.0, 1.1, 1.21])
    half = 4.302653 * math.log(1.1) / math.sqrt(3)
    assert (low, high) == pytest.approx((1.1 * math.exp(-half), 1.1 * math.exp(half)), rel=1e-5)


def test_no_interval_from_one_round_and_none_wide_from_identical_rounds():
    assert speedup_interval([0.95]) is None and speedup_interval([]) is None
    assert speedup_interval([0.97, 0.97, 0.97]) == pytest.approx((0.97, 0.97))


def test_rounds_with_multiplicative_noise_are_covered_95_times_in_100():
    """Rounds drawn around a true ratio of 0.97 with the per-engine noise seen
    here (~7% a round): the interval holds 0.97 in ~95% of 4-round runs."""
    rng = np.random.default_rng(0)
    covered = 0
    runs = 4000
    for _ in range(runs):
        low, high = speedup_interval(list(0.97 * np.exp(rng.normal(0.0, 0.07, size=4))))
        covered += low <= 0.97 <= high
    assert 0.93 < covered / runs < 0.97


@given(st.lists(st.floats(min_value=0.3, max_value=3.0), min_size=2, max_size=12))
def test_the_interval_holds_the_geometric_mean_and_widens_with_confidence(ratios):
    center = math.exp(np.mean(np.log(ratios)))
    low, high = speedup_interval(ratios)
    wide_low, wide_high = speedup_interval(ratios, confidence=0.99)
    assert low <= center * (1 + 1e-9) and center <= high * (1 + 1e-9)
    assert wide_low <= low * (1 + 1e-9) and high <= wide_high * (1 + 1e-9)
