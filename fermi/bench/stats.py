"""Medians with min/max over repetitions, and percentiles."""

from __future__ import annotations

import statistics


def summarize(values: list[float]) -> dict | None:
    """{"median", "min", "max", "n"} of the repetitions, or None when there are none."""
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolated between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
