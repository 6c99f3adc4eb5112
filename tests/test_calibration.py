"""The online acceptance calibration: monotone, learnt from outcomes, warm-started from a file."""

import json

import pytest
import torch

from vllm_cmasd.calibration import NUM_BINS, AcceptanceCalibration, isotonic, write_warm_start


def test_isotonic_pools_violators_by_weight():
    assert isotonic([0.1, 0.5, 0.3, 0.9], [1, 1, 1, 1]) == pytest.approx([0.1, 0.4, 0.4, 0.9])
    assert isotonic([0.2, 0.8, 0.0], [1, 3, 1]) == pytest.approx([0.2, 0.6, 0.6])


def test_learns_acceptance_by_confidence_and_stays_monotone():
    generator = torch.Generator().manual_seed(0)
    calibration = AcceptanceCalibration(decay=1.0)
    for _ in range(200):
        confidence = torch.rand(64, generator=generator)
        true_rate = 0.2 + 0.7 * (confidence > 0.5).float()  # a step, not the identity
        calibration.observe(confidence, torch.rand(64, generator=generator) < true_rate)
    curve = calibration.curve
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    assert curve[2] == pytest.approx(0.2, abs=0.06) and curve[-3] == pytest.approx(0.9, abs=0.06)
    low, high = calibration.predict(torch.tensor([0.1, 0.95])).tolist()
    assert low == pytest.approx(0.2, abs=0.06) and high == pytest.approx(0.9, abs=0.06)


def test_host_and_device_binning_agree_at_every_edge():
    """observe() bins on the host (numpy), predict() on the confidences' device:
    one token must land in the same bin both ways, edges and out-of-range values included."""
    edges = torch.arange(NUM_BINS + 1, dtype=torch.float32) / NUM_BINS
    values = torch.cat([edges, edges + 1e-7, edges - 1e-7, torch.tensor([-0.5, 1.5]), torch.rand(1000)])
    device_bins = AcceptanceCalibration.bins(values)
    assert AcceptanceCalibration.bins(values.numpy()).tolist() == device_bins.tolist()
    assert device_bins.min() == 0 and device_bins.max() == NUM_BINS - 1


def test_reliability_diagram_compares_what_was_predicted_with_what_happened():
    calibration = AcceptanceCalibration(prior_accepted=[0.0] * NUM_BINS, prior_reached=[1e6] * NUM_BINS)
    # Predicts 0 everywhere (a strong, wrong prior); every token is accepted.
    calibration.observe(torch.full((10,), 0.7), torch.ones(10, dtype=torch.bool))
    (row,) = calibration.summary()["reliability"]
    assert row == {"bin": 0, "predicted": 0.0, "observed": 1.0, "tokens": 10.0}


def test_warm_start_round_trips_per_policy(tmp_path):
    fitted = AcceptanceCalibration(decay=1.0)
    fitted.observe(torch.tensor([0.05, 0.95, 0.95]), torch.tensor([False, True, True]))
    path = tmp_path / "cmasd_calibration.json"
    write_warm_start(path, {"exact": fitted}, weight=30.0, source={"prompts": "tuning"})
    data = json.loads(path.read_text())
    assert sum(data["policies"]["exact"]["reached"]) == pytest.approx(30.0)
    warm = AcceptanceCalibration.from_file(path, "exact")
    assert warm.predict(torch.tensor([0.95])).item() > 0.9 and warm.predict(torch.tensor([0.05])).item() < 0.1
    assert AcceptanceCalibration.from_file(path, "confidence") is None
