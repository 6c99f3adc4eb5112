"""CM-ASD settings: every bad value fails with a message naming its field."""

import pytest

from vllm_cmasd.config import CmasdConfig, CmasdConfigError


def test_defaults_are_valid():
    config = CmasdConfig.from_dict({}, k_max=8)
    assert config.draft_length == "controller" and config.verification == "exact"
    assert config.measures_costs and config.min_draft == 0
    assert sum(config.normalized_weights) == pytest.approx(1.0)


@pytest.mark.parametrize("window_field", [{"k_min": 2}, {"threshold": 0.2}, {"stop_rule": "mean"},
                                          {"draft_budget": "auto"}])
def test_a_config_written_for_the_window_keeps_meaning_the_window(window_field):
    config = CmasdConfig.from_dict({"verification": "exact", **window_field}, k_max=8)
    assert config.draft_length == "window" and config.min_draft == config.k_min
    assert config.measures_costs == (config.draft_budget == "auto")


@pytest.mark.parametrize("window_field", ["k_min", "threshold", "stop_rule", "draft_budget"])
def test_window_settings_under_the_controller_are_refused(window_field):
    value = {"k_min": 2, "threshold": 0.2, "stop_rule": "mean", "draft_budget": "auto"}[window_field]
    with pytest.raises(CmasdConfigError) as info:
        CmasdConfig.from_dict({"draft_length": "controller", window_field: value}, k_max=8)
    assert str(info.value).startswith(f"cmasd.{window_field}: applies to draft_length 'window' only")


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"k_min": 9}, "cmasd.k_min"),
        ({"k_min": 0}, "cmasd.k_min"),
        ({"k_min": 2.5}, "cmasd.k_min"),
        ({"k_max": 4}, "cmasd.k_max"),
        ({"threshold": 1.5}, "cmasd.threshold"),
        ({"threshold": float("nan")}, "cmasd.threshold"),
        ({"stop_rule": "median"}, "cmasd.stop_rule"),
        ({"weights": {"entropy": -0.1}}, "cmasd.weights.entropy"),
        ({"weights": {"perplexity": 0.5}}, "cmasd.weights.perplexity"),
        ({"weights": {"entropy": 0.0, "softmax_margin": 0.0}}, "cmasd.weights"),
        ({"logit_margin_scale": 0}, "cmasd.logit_margin_scale"),
        ({"verification": "lenient"}, "cmasd.verification"),
        ({"leniency": -1}, "cmasd.leniency"),
        ({"confidence_floor": 1.0}, "cmasd.confidence_floor"),
        ({"topk_beta": 0}, "cmasd.topk_beta"),
        ({"topk_tau": -0.5}, "cmasd.topk_tau"),
        ({"rstitch_entropy": -0.1}, "cmasd.rstitch_entropy"),
        ({"rstitch_entropy": "high"}, "cmasd.rstitch_entropy"),
        ({"draft_budget": "on"}, "cmasd.draft_budget"),
        ({"draft_length": "fixed"}, "cmasd.draft_length"),
        ({"calibration": ""}, "cmasd.calibration"),
        ({"calibration": "/no/such/calibration.json"}, "cmasd.calibration"),
        ({"thresold": 0.5}, "cmasd.thresold"),
        ("exact", "additional_config.cmasd"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(CmasdConfigError) as info:
        CmasdConfig.from_dict(raw, k_max=8)
    message = str(info.value)
    assert message.startswith(field + ":"), message


def test_allowed_values_are_listed():
    with pytest.raises(CmasdConfigError, match=r"\['exact', 'confidence', 'topk-tolerance', 'rstitch'\]"):
        CmasdConfig.from_dict({"verification": "greedy"}, k_max=4)
    with pytest.raises(CmasdConfigError, match=r"\['off', 'auto'\]"):
        CmasdConfig.from_dict({"draft_budget": True}, k_max=4)
    with pytest.raises(CmasdConfigError, match=r"\['controller', 'window'\]"):
        CmasdConfig.from_dict({"draft_length": "auto"}, k_max=4)
    with pytest.raises(CmasdConfigError, match="allowed fields: draft_length, calibration, k_min"):
        CmasdConfig.from_dict({"bogus": 1}, k_max=4)
