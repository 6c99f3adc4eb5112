"""Counters of what CM-ASD did: draft lengths, early stops, acceptance per position."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftStats:
    k_max: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_early_stops: int = 0
    """Drafts that stopped before k_max because confidence fell."""
    num_mixed_steps: int = 0
    """Steps whose batch carried drafts of different lengths."""
    length_histogram: list[int] = field(default_factory=list)
    """length_histogram[n] = number of drafts with n tokens."""
    num_skipped_passes: int = 0
    """Steps that ran no drafter pass at all (draft_budget="auto")."""
    num_exploring_passes: int = 0
    """Drafter passes run only to explore (after EXPLORE_EVERY skipped steps)."""
    num_exploring_catch_up_tokens: int = 0
    """Catch-up tokens those exploring passes ran."""
    drafter_seconds: float = 0.0
    """Wall time inside the proposer: decisions, catch-ups, drafter passes."""

    def __post_init__(self):
        self.length_histogram = [0] * (self.k_max + 1)

    def record_drafts(self, lengths: list[int]) -> None:
        """Record one step's drafts, one length per request in the batch."""
        self.num_mixed_steps += len(set(lengths)) > 1
        for n in lengths:
            self.length_histogram[n] += 1
            self.num_drafts += 1
            self.num_draft_tokens += n
            self.num_early_stops += n < self.k_max

    def record_skipped_pass(self, batch_size: int) -> None:
        """A step without a drafter pass: every request's draft is empty."""
        self.num_skipped_passes += 1
        self.length_histogram[0] += batch_size
        self.num_drafts += batch_size
        self.num_early_stops += batch_size

    def record_exploring_pass(self, catch_up_tokens: int) -> None:
        self.num_exploring_passes += 1
        self.num_exploring_catch_up_tokens += catch_up_tokens

    @property
    def mean_draft_length(self) -> float:
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0


# The controller's running totals (proposer.CmasdProposerMixin.report), each a
# /metrics counter ``vllm:cmasd_<name>`` and a field of the benchmarks' records.
CONTROLLER_TOTALS = {
    "skipped_drafter_passes": "CM-ASD steps that ran no drafter pass (nothing paid).",
    "catch_up_tokens": "Tokens CM-ASD's drafter ran to catch up after skipped passes.",
    "split_catch_ups": "CM-ASD catch-ups too long for one pass, run in parts.",
    "exploring_passes": "CM-ASD drafter passes run only to explore (nothing paid).",
    "exploring_catch_up_tokens": "Catch-up tokens CM-ASD's exploring passes ran.",
    "drafter_seconds": "Wall time in CM-ASD's proposer (decisions, catch-ups, drafter passes), seconds.",
}


class CmasdPrometheus:
    """CM-ASD's Prometheus series, beside vLLM's ``vllm:spec_decode_*`` ones.

    vLLM's scheduler already counts, per logging interval, how many drafts
    reached each position (``SpecDecodingStats.num_draft_tokens_per_pos``);
    the draft-length histogram and the early stops follow from it:
    drafts of length n = reached(n) - reached(n + 1).
    """

    def __init__(self, config, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        import prometheus_client

        self.k_max = config.k_max
        by_length = prometheus_client.Counter(
            "vllm:cmasd_num_drafts_by_length",
            "CM-ASD drafts by their length (tokens drafted for one request in one step).",
            labelnames=labelnames + ["length"],
        )
        per_pos = prometheus_client.Counter(
            "vllm:cmasd_num_draft_tokens_per_pos",
            "CM-ASD drafted tokens per draft position (acceptance per position = "
            "vllm:spec_decode_num_accepted_tokens_per_pos / this).",
            labelnames=labelnames + ["position"],
        )
        early = prometheus_client.Counter(
            "vllm:cmasd_num_early_stops",
            "CM-ASD drafts that stopped before k_max because confidence fell.",
            labelnames=labelnames,
        )
        policy = prometheus_client.Gauge(
            "vllm:cmasd_policy_info",
            "CM-ASD settings in use (value is always 1).",
            labelnames=labelnames + ["verification", "draft_length", "stop_rule", "threshold", "k_min", "k_max"],
        )
        self.by_length = {
            idx: [by_length.labels(*lv, str(n)) for n in range(self.k_max + 1)]
            for idx, lv in per_engine_labelvalues.items()
        }
        self.per_pos = {
            idx: [per_pos.labels(*lv, str(p)) for p in range(self.k_max)]
            for idx, lv in per_engine_labelvalues.items()
        }
        self.early = {idx: early.labels(*lv) for idx, lv in per_engine_labelvalues.items()}
        for lv in per_engine_labelvalues.values():
            policy.labels(
                *lv, config.verification, config.draft_length, config.stop_rule, str(config.threshold),
                str(config.k_min), str(config.k_max),
            ).set(1)

        # The controller's report (proposer.CmasdProposer.report), per step.
        def counter(name, doc):
            c = prometheus_client.Counter(name, doc, labelnames=labelnames)
            return {idx: c.labels(*lv) for idx, lv in per_engine_labelvalues.items()}

        def gauge(name, doc, extra):
            g = prometheus_client.Gauge(name, doc, labelnames=labelnames + [extra])
            return {idx: (lambda value, lv=lv: g.labels(*lv, value)) for idx, lv in per_engine_labelvalues.items()}

        self.totals = {name: counter(f"vllm:cmasd_{name}", doc) for name, doc in CONTROLLER_TOTALS.items()}
        self.seen = {idx: dict.fromkeys(self.totals, 0) for idx in per_engine_labelvalues}
        self.curve = gauge("vllm:cmasd_calibration_acceptance",
                           "CM-ASD's calibrated P(accepted | drafter confidence in bin [lower, lower + 1/bins)).",
                           "confidence_bin")
        self.predicted = gauge("vllm:cmasd_calibration_predicted",
                               "Reliability diagram: mean predicted acceptance of the drafted tokens verified, "
                               "by bin of that prediction.", "predicted_bin")
        self.observed = gauge("vllm:cmasd_calibration_observed",
                              "Reliability diagram: observed acceptance of those tokens, by bin of prediction.",
                              "predicted_bin")
        self.verified = gauge("vllm:cmasd_calibration_tokens",
                              "Reliability diagram: drafted tokens verified, by bin of prediction.", "predicted_bin")
        self.cost = gauge("vllm:cmasd_cost_seconds",
                          "CM-ASD's measured cost fit: target step a + b n (verifying: + c per request, + e per drafted "
                          "token), drafter pass d0 + d1 n, "
                          "a pass's tokens beyond a decode step's w each (seconds).",
                          "term")
        self.acceptance = gauge("vllm:cmasd_acceptance",
                                "CM-ASD's acceptance history: the rate over all requests per drafted token "
                                "(overall_rate) and the per-request shrinkage weight it learnt, in drafted "
                                "tokens (shrinkage_weight).", "term")

    def observe_controller(self, report: dict, engine_idx: int = 0) -> None:
        for name, counters in self.totals.items():
            total = report.get(name, 0)
            if total > self.seen[engine_idx][name]:
                counters[engine_idx].inc(total - self.seen[engine_idx][name])
            self.seen[engine_idx][name] = total
        calibration = report.get("calibration")
        if calibration:
            bins = calibration["num_bins"]
            for b, value in enumerate(calibration["curve"]):
                self.curve[engine_idx](f"{b / bins:.2f}").set(value)
            for row in calibration["reliability"]:
                label = f"{row['bin'] / bins:.2f}"
                self.predicted[engine_idx](label).set(row["predicted"])
                self.observed[engine_idx](label).set(row["observed"])
                self.verified[engine_idx](label).set(row["tokens"])
        for term, seconds in (report.get("costs") or {}).items():
            self.cost[engine_idx](term).set(seconds)
        for term, value in (report.get("acceptance") or {}).items():
            self.acceptance[engine_idx](term).set(value)

    def observe(self, stats, engine_idx: int = 0) -> None:
        reached = list(stats.num_draft_tokens_per_pos)[: self.k_max]
        reached += [0] * (self.k_max - len(reached))
        counts = draft_length_counts(stats.num_drafts, reached)
        for n, count in enumerate(counts):
            if count:
                self.by_length[engine_idx][n].inc(count)
        for p, count in enumerate(reached):
            if count:
                self.per_pos[engine_idx][p].inc(count)
        if stats.num_drafts - reached[-1]:
            self.early[engine_idx].inc(stats.num_drafts - reached[-1])


def draft_length_counts(num_drafts: int, reached_per_pos: list[int]) -> list[int]:
    """Drafts per length 0..k from how many drafts reached each position."""
    reached = [num_drafts, *reached_per_pos, 0]
    return [reached[n] - reached[n + 1] for n in range(len(reached_per_pos) + 1)]
