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

    @property
    def mean_draft_length(self) -> float:
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0


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
            labelnames=labelnames + ["verification", "stop_rule", "threshold", "k_min", "k_max"],
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
                *lv, config.verification, config.stop_rule, str(config.threshold),
                str(config.k_min), str(config.k_max),
            ).set(1)

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
