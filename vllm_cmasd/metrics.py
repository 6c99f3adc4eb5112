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

    @property
    def mean_draft_length(self) -> float:
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0
