"""How sure a speedup measured over rounds is.

On these machines an engine's process runs 15-40% faster or slower than the
next one of the same method, for its whole life (docs/notes/eagle3-training.md,
"The benchmark interleaved by calls"), and every round starts new engines. The
rounds are then the independent samples of a method's ratio to plain decoding,
and a figure within a few percent of a target (0.98x) means nothing without
the spread over them: four rounds of 0.84-1.04 and of 0.97-0.99 both average
0.95. The interval is Student's t over the rounds' log ratios (a ratio's noise
is multiplicative), turned back into a ratio: an interval for the geometric mean of
the rounds' speedups, if the rounds are independent.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def speedup_interval(ratios: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """(low, high) for the geometric mean of per-round ``ratios``; None under two rounds."""
    if len(ratios) < 2:
        return None
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    center, scale = float(logs.mean()), float(stats.sem(logs))
    if scale == 0.0:
        return math.exp(center), math.exp(center)
    low, high = stats.t.interval(confidence, len(logs) - 1, loc=center, scale=scale)
    return math.exp(low), math.exp(high)
