"""Calibrated acceptance: P(a drafted token is accepted | its drafter confidence).

The unified confidence (confidence.py) ranks drafted tokens, but it is not a
probability of acceptance, and how often a token of a given confidence is
accepted depends on the verification policy (a lenient verifier accepts more
of the same drafts). The controller prices drafts by that probability, so it
learns it from every verification's outcome, for the policy the engine runs:

* **binned counts with a prior**: confidence in [0, 1] falls into
  ``NUM_BINS`` equal bins; per bin, the drafted tokens the verifier reached
  and those it accepted (a draft's tokens after its first rejection were
  never judged and count nowhere, so the estimate is the *conditional*
  acceptance that survival multiplies). Counts decay (``decay`` per observed
  step) so the estimate follows the running workload;
* a **prior** of pseudo-counts, from the warm start shipped with the draft
  (``cmasd_calibration.json``, fitted by ``scripts/fit_calibration.py`` on
  tuning prompts the benchmark never sees) or, without one, the identity
  (acceptance = confidence) with little weight;
* **monotone** by isotonic regression (pool-adjacent-violators over the bins,
  weighted by counts): acceptance should not fall as confidence rises, and
  pooling lends sparse bins their neighbours' evidence. No parametric shape is
  assumed (a logistic curve misfits the flat top that exact verification
  of a well-trained draft shows).

A second table keeps the reliability diagram: reached and accepted tokens
binned by the *predicted* probability the controller used, with the mean
prediction per bin (docs/confidence.md, "Calibrated acceptance").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

NUM_BINS = 20
CALIBRATION_FILE = "cmasd_calibration.json"
FORMAT_VERSION = 1


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Non-decreasing least-squares fit of ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean1, w1, n1 = blocks.pop()
            mean0, w0, n0 = blocks.pop()
            total = w0 + w1
            mean = (mean0 * w0 + mean1 * w1) / total if total > 0 else (mean0 + mean1) / 2
            blocks.append([mean, total, n0 + n1])
    return [mean for mean, _, n in blocks for _ in range(n)]


class AcceptanceCalibration:
    """Online, monotone estimate of P(accepted | confidence) for one verification policy."""

    def __init__(
        self,
        prior_accepted: list[float] | None = None,
        prior_reached: list[float] | None = None,
        decay: float = 0.995,
    ):
        centres = [(b + 0.5) / NUM_BINS for b in range(NUM_BINS)]
        if prior_reached is None:
            prior_reached = [1.0] * NUM_BINS  # identity, one pseudo-token per bin
            prior_accepted = centres
        if len(prior_reached) != NUM_BINS or prior_accepted is None or len(prior_accepted) != NUM_BINS:
            raise ValueError(f"a calibration prior needs {NUM_BINS} bins of accepted and reached counts")
        self.decay = decay
        self.prior = (list(map(float, prior_accepted)), list(map(float, prior_reached)))
        self.accepted = [0.0] * NUM_BINS
        self.reached = [0.0] * NUM_BINS
        # Reliability diagram: by predicted probability.
        self.predicted_sum = [0.0] * NUM_BINS
        self.predicted_reached = [0.0] * NUM_BINS
        self.predicted_accepted = [0.0] * NUM_BINS
        self.num_observed = 0
        self._table: torch.Tensor | None = None
        self._refit()

    @classmethod
    def from_file(cls, path: str | Path, policy: str) -> "AcceptanceCalibration | None":
        """The warm start for ``policy`` in a calibration file; None if it has none."""
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION or data.get("num_bins") != NUM_BINS:
            raise ValueError(f"{path}: calibration format {data.get('format_version')}/{data.get('num_bins')} bins, "
                             f"expected {FORMAT_VERSION}/{NUM_BINS}")
        entry = data.get("policies", {}).get(policy)
        if entry is None:
            return None
        return cls(prior_accepted=entry["accepted"], prior_reached=entry["reached"])

    @staticmethod
    def bins(confidence: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Each confidence's bin, on its device, or on the host for a host array (:meth:`observe`)."""
        if isinstance(confidence, np.ndarray):
            scaled = np.clip(confidence.astype(np.float32), 0.0, 1.0) * NUM_BINS
            return np.minimum(scaled.astype(np.int64), NUM_BINS - 1)
        return (confidence.float().clamp(0.0, 1.0) * NUM_BINS).long().clamp_(max=NUM_BINS - 1)

    def _refit(self) -> None:
        accepted = [p + d for p, d in zip(self.prior[0], self.accepted)]
        reached = [p + d for p, d in zip(self.prior[1], self.reached)]
        rates = [a / r if r > 0 else (b + 0.5) / NUM_BINS for b, (a, r) in enumerate(zip(accepted, reached))]
        self.curve = [min(max(p, 0.0), 1.0) for p in isotonic(rates, reached)]
        self._table = None

    def predict(self, confidence: torch.Tensor) -> torch.Tensor:
        """Calibrated acceptance of each drafted token, from its confidence (same shape, float32)."""
        if self._table is None or self._table.device != confidence.device:
            self._table = torch.tensor(self.curve, dtype=torch.float32, device=confidence.device)
        return self._table[self.bins(confidence)]

    def observe(self, confidence: torch.Tensor, accepted: torch.Tensor) -> None:
        """One step's verified tokens: the confidence of each drafted token the
        verifier reached, and whether it was accepted (flat, same length).

        On the host, in numpy: a handful of values a step, where a dozen small
        torch ops cost ~0.3 ms of every verifying step (batch 1, 2-core CPU)."""
        if confidence.numel() == 0:
            return
        confidence = confidence.detach().float().cpu().numpy()
        accepted = accepted.detach().cpu().numpy().astype(np.float64)
        bins = self.bins(confidence)
        predicted = np.asarray(self.curve, dtype=np.float32)[bins]  # what predict() gave these tokens

        def per_bin(index: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            return np.bincount(index, weights=weights, minlength=NUM_BINS)

        self.accepted = (self.decay * np.asarray(self.accepted) + per_bin(bins, accepted)).tolist()
        self.reached = (self.decay * np.asarray(self.reached) + per_bin(bins)).tolist()
        by_prediction = self.bins(predicted)
        tables = (("predicted_sum", predicted), ("predicted_accepted", accepted), ("predicted_reached", None))
        for name, values in tables:
            setattr(self, name, (np.asarray(getattr(self, name)) + per_bin(by_prediction, values)).tolist())
        self.num_observed += confidence.size
        self._refit()

    def summary(self) -> dict:
        """The fit and the reliability diagram (bench.json, /metrics)."""
        return {
            "num_bins": NUM_BINS,
            "curve": list(self.curve),
            "reached": list(self.reached),
            "accepted": list(self.accepted),
            "reliability": [
                {"bin": b, "predicted": s / n, "observed": a / n, "tokens": n}
                for b, (s, a, n) in enumerate(zip(self.predicted_sum, self.predicted_accepted, self.predicted_reached))
                if n > 0
            ],
            "num_observed": self.num_observed,
        }


def write_warm_start(path: str | Path, fits: dict[str, "AcceptanceCalibration"], weight: float, source: dict) -> None:
    """Save fitted calibrations as the warm start of a draft: per policy, the
    observed counts scaled to ``weight`` pseudo-tokens in all (a prior that
    online observations soon outweigh)."""
    policies = {}
    for policy, fit in fits.items():
        total = sum(fit.reached) or 1.0
        scale = weight / total
        policies[policy] = {
            "accepted": [a * scale for a in fit.accepted],
            "reached": [r * scale for r in fit.reached],
            "observed_tokens": round(total),
            "curve": list(fit.curve),
        }
    data = {"format_version": FORMAT_VERSION, "num_bins": NUM_BINS, "weight": weight, "source": source,
            "policies": policies}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


# Fitted under the default knobs of each policy (the warm start is a prior:
# an engine with other knobs corrects it online).
WARM_START_WEIGHT = 50.0
"""Pseudo-tokens a warm start carries in all: about 20 batch-1 steps of evidence.
(200 held the controller at the tuning prompts' lower acceptance through a
whole benchmark run: docs/notes/controller.md.)"""


def fit_warm_start(target: str, draft: str, out: str | Path, policies: list[str], prompts: list[str],
                   max_tokens: int = 128, k_max: int = 8, draft_method: str = "draft_model") -> dict:
    """Fit each policy's calibration on ``prompts`` and write ``out``.

    One engine per policy, the paper's window with threshold 0 (every request
    drafts k_max tokens each step, so every confidence bin is visited), greedy
    chat on all prompts at once; the drafter's calibration is read at the end.
    """
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the drafter lives in this process
    from vllm import LLM, SamplingParams

    from vllm_cmasd.engines import llm_kwargs, model_runner, shutdown

    fits, tokens = {}, {}
    for policy in policies:
        cmasd = {"verification": policy, "draft_length": "window", "threshold": 0.0, "calibration": "none"}
        llm = LLM(**llm_kwargs(target, draft=draft, draft_method=draft_method, num_speculative_tokens=k_max, cmasd=cmasd))
        try:
            drafter = model_runner(llm).drafter
            drafter.calibration = AcceptanceCalibration(decay=1.0)  # every outcome counts alike
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
            fits[policy] = drafter.calibration
            tokens[policy] = sum(len(o.outputs[0].token_ids) for o in outputs)
        finally:
            shutdown(llm)
    source = {"target": Path(target).name, "draft": Path(draft).name, "draft_method": draft_method, "k_max": k_max,
              "max_tokens": max_tokens,
              "prompts": "vllm_cmasd.bench.prompts.TUNING_PROMPTS", "num_prompts": len(prompts),
              "generated_tokens": tokens}
    write_warm_start(out, fits, weight=WARM_START_WEIGHT, source=source)
    return {policy: fit.curve for policy, fit in fits.items()}
