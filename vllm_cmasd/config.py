"""CM-ASD settings: one typed config, read from vLLM's ``additional_config``.

Users switch CM-ASD on with vLLM's own flags only::

    --speculative-config '{"method": "draft_model", "model": "DRAFT", "num_speculative_tokens": 8}'
    --additional-config '{"cmasd": {"verification": "exact"}}'

``num_speculative_tokens`` is the largest draft (k_max); everything CM-ASD adds
lives under the ``"cmasd"`` key. Every field is checked here, at startup, and a
bad value raises :class:`CmasdConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vllm_cmasd.policies import VERIFICATION_POLICIES

CONFIG_KEY = "cmasd"

DraftLength = Literal["controller", "window"]
DRAFT_LENGTHS: tuple[str, ...] = ("controller", "window")
DraftBudget = Literal["off", "auto"]
DRAFT_BUDGETS: tuple[str, ...] = ("off", "auto")
# Settings of the paper's fixed-threshold window only. A config that names one
# of them and no draft_length means the window, as it did before the
# controller became the default.
WINDOW_FIELDS: tuple[str, ...] = ("k_min", "stop_rule", "threshold", "draft_budget")
StopRule = Literal["mean", "product"]
STOP_RULES: tuple[str, ...] = ("mean", "product")
CONFIDENCE_SIGNALS: tuple[str, ...] = ("entropy", "softmax_margin", "logit_margin")


class CmasdConfigError(ValueError):
    """A CM-ASD setting is invalid. The message names the field."""


@dataclass(frozen=True)
class CmasdConfig:
    k_max: int
    """Largest draft per request and step: speculative_config.num_speculative_tokens."""

    draft_length: DraftLength = "controller"
    """How long each request's draft is. controller: per step, request and
    position, a token is drafted only where its expected gain (its calibrated
    probability of surviving verification) beats its measured marginal cost,
    and a step where nothing pays runs no drafter pass (docs/confidence.md,
    "The controller"); window: the paper's window, drafting while the stop
    signal is at least ``threshold`` (k_min, stop_rule, threshold,
    draft_budget apply to it only)."""

    calibration: str = "auto"
    """controller: warm start of P(accepted | confidence): auto = the draft's
    cmasd_calibration.json if it has one (else a weak identity prior), none =
    the weak prior, or a path to a calibration file."""

    k_min: int = 1
    """window: every request drafts at least this many tokens per step (1..k_max)."""

    stop_rule: StopRule = "product"
    """window: how drafted positions' confidences combine into the stop signal:
    'product' = running product (an estimate that the whole draft survives),
    'mean' = running mean (the paper's average confidence)."""

    threshold: float = 0.3
    """window: a request stops drafting once its stop signal falls below this (0..1)."""

    weights: dict[str, float] = field(
        default_factory=lambda: {"entropy": 0.3, "softmax_margin": 0.5, "logit_margin": 0.2}
    )
    """Weights of the unified confidence score; normalised to sum 1."""

    logit_margin_scale: float = 2.0
    """Logit margin m is squashed to tanh(m / scale) in [0, 1)."""

    verification: str = "exact"
    """One of VERIFICATION_POLICIES (vllm_cmasd.policies): exact (lossless),
    confidence (CM-ASD relaxed), topk-tolerance (SpecDec), rstitch (R-Stitch
    entropy routing)."""

    leniency: float = 1.0
    """confidence policy: largest log-ratio relaxation delta (>= 0); 0 equals exact."""

    confidence_floor: float = 0.5
    """confidence policy: at or below this confidence verification is exact (0..1)."""

    topk_beta: int = 3
    """topk-tolerance: the drafted token must be within the target's top-beta."""

    topk_tau: float = 2.0
    """topk-tolerance: ... and its log-probability within tau of the top-1 (>= 0)."""

    rstitch_entropy: float = 0.5
    """rstitch: a drafted token whose drafter entropy (nats) is below this is
    kept without the target's check; the others are verified exactly (>= 0; 0 = exact)."""

    draft_budget: DraftBudget = "off"
    """window: auto = the window's tokens are also capped by the controller's
    gain-vs-cost rule (and steps where nothing pays skip the drafter); off =
    every request drafts as its window allows."""

    @property
    def measures_costs(self) -> bool:
        """Decisions priced by measured costs and calibrated acceptance."""
        return self.draft_length == "controller" or self.draft_budget == "auto"

    @property
    def min_draft(self) -> int:
        """Tokens every drafting request drafts: the controller may draft none."""
        return 0 if self.draft_length == "controller" else self.k_min

    @property
    def normalized_weights(self) -> tuple[float, float, float]:
        total = sum(self.weights.values())
        return tuple(self.weights.get(name, 0.0) / total for name in CONFIDENCE_SIGNALS)  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, raw: Any, k_max: int) -> "CmasdConfig":
        """Build and validate from the ``additional_config["cmasd"]`` dict."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise CmasdConfigError(
                f"additional_config.{CONFIG_KEY}: must be a JSON object, got {raw!r}"
            )
        allowed = [f.name for f in dataclasses.fields(cls) if f.name != "k_max"]
        if "k_max" in raw:
            raise CmasdConfigError(
                f"{CONFIG_KEY}.k_max: set it as speculative_config.num_speculative_tokens "
                f"(currently {k_max}), not in additional_config"
            )
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise CmasdConfigError(
                f"{CONFIG_KEY}.{unknown[0]}: unknown field; allowed fields: {', '.join(allowed)}"
            )
        if "draft_length" not in raw and any(name in raw for name in WINDOW_FIELDS):
            raw = {**raw, "draft_length": "window"}
        elif raw.get("draft_length") == "controller":
            for name in WINDOW_FIELDS:
                if name in raw:
                    raise CmasdConfigError(
                        f"{CONFIG_KEY}.{name}: applies to draft_length 'window' only; "
                        f"drop it or set draft_length to one of {list(DRAFT_LENGTHS)}"
                    )
        config = cls(k_max=k_max, **raw)
        config.validate()
        return config

    def validate(self) -> None:
        def fail(name: str, allowed: str, value: Any) -> None:
            raise CmasdConfigError(f"{CONFIG_KEY}.{name}: must be {allowed}; got {value!r}")

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        if not isinstance(self.k_max, int) or self.k_max < 1:
            fail("k_max (speculative_config.num_speculative_tokens)", "an integer >= 1", self.k_max)
        if self.draft_length not in DRAFT_LENGTHS:
            fail("draft_length", f"one of {list(DRAFT_LENGTHS)}", self.draft_length)
        if not isinstance(self.calibration, str) or not self.calibration:
            fail("calibration", "'auto', 'none' or the path of a calibration file", self.calibration)
        if self.calibration not in ("auto", "none") and not Path(self.calibration).is_file():
            fail("calibration", "'auto', 'none' or the path of an existing calibration file", self.calibration)
        if not isinstance(self.k_min, int) or isinstance(self.k_min, bool) or not 1 <= self.k_min <= self.k_max:
            fail("k_min", f"an integer in [1, k_max={self.k_max}] (k_max is num_speculative_tokens)", self.k_min)
        if self.stop_rule not in STOP_RULES:
            fail("stop_rule", f"one of {list(STOP_RULES)}", self.stop_rule)
        if not is_number(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            fail("threshold", "a number in [0, 1]", self.threshold)
        if not isinstance(self.weights, dict) or not self.weights:
            fail("weights", f"an object with keys from {list(CONFIDENCE_SIGNALS)}", self.weights)
        for name, weight in self.weights.items():
            if name not in CONFIDENCE_SIGNALS:
                fail(f"weights.{name}", f"a key from {list(CONFIDENCE_SIGNALS)}", name)
            if not is_number(weight) or not 0.0 <= weight <= 1.0:
                fail(f"weights.{name}", "a number in [0, 1]", weight)
        if sum(self.weights.values()) <= 0:
            fail("weights", "weights with a positive sum", self.weights)
        if not is_number(self.logit_margin_scale) or self.logit_margin_scale <= 0:
            fail("logit_margin_scale", "a number > 0", self.logit_margin_scale)
        if self.verification not in VERIFICATION_POLICIES:
            fail("verification", f"one of {list(VERIFICATION_POLICIES)}", self.verification)
        if not is_number(self.leniency) or not 0.0 <= self.leniency <= 20.0:
            fail("leniency", "a number in [0, 20]", self.leniency)
        if not is_number(self.confidence_floor) or not 0.0 <= self.confidence_floor < 1.0:
            fail("confidence_floor", "a number in [0, 1)", self.confidence_floor)
        if not isinstance(self.topk_beta, int) or isinstance(self.topk_beta, bool) or self.topk_beta < 1:
            fail("topk_beta", "an integer >= 1", self.topk_beta)
        if not is_number(self.topk_tau) or self.topk_tau < 0:
            fail("topk_tau", "a number >= 0", self.topk_tau)
        if not is_number(self.rstitch_entropy) or self.rstitch_entropy < 0:
            fail("rstitch_entropy", "a number >= 0 (nats)", self.rstitch_entropy)
        if self.draft_budget not in DRAFT_BUDGETS:
            fail("draft_budget", f"one of {list(DRAFT_BUDGETS)}", self.draft_budget)
