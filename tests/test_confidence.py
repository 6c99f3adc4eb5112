"""Confidence signals and the drafting window, on hand-made distributions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_cmasd.confidence import (
    entropy,
    entropy_confidence,
    logit_margin_confidence,
    softmax_margin,
    unified_confidence,
)
from vllm_cmasd.config import CONFIDENCE_SIGNALS, CmasdConfig
from vllm_cmasd.proposer import DraftWindow


def test_signals_on_extremes():
    vocab = 50
    uniform = torch.zeros(1, vocab)
    peaked = torch.full((1, vocab), -30.0)
    peaked[0, 7] = 30.0
    assert entropy_confidence(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_confidence(peaked).item() == pytest.approx(1.0, abs=1e-6)
    assert softmax_margin(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert softmax_margin(peaked).item() == pytest.approx(1.0, abs=1e-6)
    assert logit_margin_confidence(peaked, scale=2.0).item() == pytest.approx(1.0, abs=1e-6)


def test_signal_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    probs = torch.softmax(logits, -1)[0]
    entropy = -(probs * probs.log()).sum().item()
    assert entropy_confidence(logits).item() == pytest.approx(1 - entropy / math.log(4), rel=1e-5)
    assert softmax_margin(logits).item() == pytest.approx((probs[0] - probs[1]).item(), rel=1e-5)
    assert logit_margin_confidence(logits, scale=2.0).item() == pytest.approx(math.tanh(0.5), rel=1e-5)


def test_unified_is_weighted_mean_and_orders_rows():
    torch.manual_seed(0)
    sharp = torch.randn(4, 100) * 8
    flat = torch.randn(4, 100) * 0.1
    config = CmasdConfig.from_dict({"weights": {"entropy": 0.25, "softmax_margin": 0.25, "logit_margin": 0.5}}, k_max=4)
    expected = (
        entropy_confidence(sharp) + softmax_margin(sharp) + 2 * logit_margin_confidence(sharp, 2.0)
    ) / 4
    assert torch.allclose(unified_confidence(sharp, config), expected, atol=1e-6)
    assert (unified_confidence(sharp, config) > unified_confidence(flat, config)).all()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    vocab=st.integers(2, 300),
    scale=st.sampled_from([0.01, 1.0, 8.0, 40.0]),
    ruled_out=st.floats(0.0, 0.95),
    weights=st.tuples(*[st.sampled_from([0.0, 0.2, 1.0])] * 3).filter(any),
)
def test_unified_in_one_pass_equals_the_weighted_mean_of_the_signals(seed, rows, vocab, scale, ruled_out, weights):
    """unified_confidence shares one softmax between the signals: the same
    values as the three definitions apart, on rows with ruled-out (-inf)
    tokens, near-ties and one-hot rows, for any weights (zeros skipped)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    logits[torch.rand(rows, vocab, generator=g) < ruled_out] = float("-inf")
    logits[:, 0] = logits[:, 0].nan_to_num(neginf=0.0)  # every row keeps a finite token
    config = CmasdConfig.from_dict({"weights": dict(zip(CONFIDENCE_SIGNALS, weights))}, k_max=4)
    w_entropy, w_softmax, w_logit = config.normalized_weights
    expected = (
        w_entropy * entropy_confidence(logits, 1000)
        + w_softmax * softmax_margin(logits)
        + w_logit * logit_margin_confidence(logits, config.logit_margin_scale)
    ).clamp(0.0, 1.0)
    assert torch.allclose(unified_confidence(logits, config, 1000), expected, atol=2e-6)


def broken_rows(vocab=10):
    """An all-NaN row, a row with one NaN, one with a +inf, and an all -inf row."""
    rows = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    rows[0] = float("nan")
    rows[1, 3] = float("nan")
    rows[2, 5] = float("inf")
    rows[3] = float("-inf")
    return rows


def test_a_broken_drafter_row_is_least_confident_for_every_signal():
    """Confidence 0 and entropy +inf, so no policy relaxes on it and R-Stitch
    never keeps its token unchecked (nansum used to give a NaN row entropy 0)."""
    logits = broken_rows()
    config = CmasdConfig.from_dict({}, k_max=4)
    only = {name: CmasdConfig.from_dict({"weights": {name: 1.0}}, k_max=4) for name in CONFIDENCE_SIGNALS}
    assert entropy(logits).tolist() == [math.inf] * 4
    assert entropy_confidence(logits).tolist() == [0.0] * 4
    assert softmax_margin(logits).tolist() == [0.0] * 4
    assert logit_margin_confidence(logits, scale=2.0).tolist() == [0.0] * 4
    assert unified_confidence(logits, config).tolist() == [0.0] * 4
    for name, single in only.items():
        assert unified_confidence(logits, single).tolist() == [0.0] * 4, name


def test_ruled_out_tokens_alone_are_not_broken():
    """-inf logits (a reduced-vocabulary drafter's missing tokens) are a valid row."""
    logits = torch.full((1, 10), float("-inf"))
    logits[0, 2], logits[0, 6] = 3.0, 1.0
    probs = torch.tensor([3.0, 1.0]).softmax(-1)
    assert entropy(logits).item() == pytest.approx(-(probs * probs.log()).sum().item(), rel=1e-5)
    assert softmax_margin(logits).item() == pytest.approx((probs[0] - probs[1]).item(), rel=1e-5)
    assert 0 < unified_confidence(logits, CmasdConfig.from_dict({}, k_max=4)).item() < 1


def _run_window(config, confidences):
    """Feed per-position confidences [positions][batch]; return lengths, positions run."""
    window = DraftWindow(len(confidences[0]), config, torch.device("cpu"))
    positions = 0
    for row in confidences:
        positions += 1
        tokens = torch.zeros(len(row), dtype=torch.int64)
        if not window.add(tokens, None, torch.tensor(row)):
            break
    return window.lengths.tolist(), positions


def test_window_product_rule_gives_per_request_lengths():
    config = CmasdConfig.from_dict({"threshold": 0.5, "stop_rule": "product"}, k_max=5)
    # Request 0 is confident throughout; 1 falls below at position 2 (0.9 * 0.9 * 0.3),
    # 2 at once: each keeps the token that crossed (its pass is paid) and drafts no more.
    lengths, positions = _run_window(config, [[0.99, 0.9, 0.3]] * 2 + [[0.99, 0.3, 0.3]] * 3)
    assert lengths == [5, 3, 1]
    assert positions == 5


def test_window_stops_loop_when_nobody_drafts():
    config = CmasdConfig.from_dict({"threshold": 0.5}, k_max=8)
    lengths, positions = _run_window(config, [[0.9, 0.9]] * 2 + [[0.1, 0.1]] * 6)
    assert lengths == [3, 3]
    assert positions == 3  # the loop ended at the first failing position, not at k_max


def test_window_mean_rule_and_k_min():
    config = CmasdConfig.from_dict({"threshold": 0.5, "stop_rule": "mean", "k_min": 3}, k_max=6)
    # Running means 0.2, 0.2, 0.47, 0.5, 0.42: k_min makes it draft three tokens
    # despite the low start; after the third the mean (0.47) is below 0.5: stop.
    lengths, _ = _run_window(config, [[0.2], [0.2], [1.0], [0.6], [0.1], [1.0]])
    assert lengths == [3]
    # With a lower threshold the fourth and fifth pass (0.5, 0.42 >= 0.4) and the
    # sixth is drafted and then stops at k_max.
    config = CmasdConfig.from_dict({"threshold": 0.4, "stop_rule": "mean", "k_min": 3}, k_max=6)
    lengths, _ = _run_window(config, [[0.2], [0.2], [1.0], [0.6], [0.1], [1.0]])
    assert lengths == [6]


def test_signals_on_kept_tokens_equal_signals_on_full_logits():
    """A reduced-vocabulary draft's signals come from its kept tokens' logits:
    the -inf entries of the full logits add nothing, with V the full vocabulary."""

    g = torch.Generator().manual_seed(0)
    small = torch.randn(5, 64, generator=g) * 3
    kept = torch.randperm(1000, generator=g)[:64]
    full = torch.full((5, 1000), float("-inf"))
    full[:, kept] = small
    config = CmasdConfig(k_max=4)
    assert torch.allclose(unified_confidence(small, config, vocab_size=1000), unified_confidence(full, config), atol=1e-6)
    assert torch.allclose(entropy(small), entropy(full), atol=1e-6)
    assert not torch.allclose(entropy_confidence(small), entropy_confidence(full))  # V matters
