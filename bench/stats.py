"""Small statistics for noisy machines: medians of repetitions and nearest-rank percentiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median_run(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Field-wise median of repetitions: numbers (and nested dicts of numbers) get their median,
    anything else is taken from the first run; booleans must hold in every run."""
    if not runs:
        return {}
    merged: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs if key in run]
        if isinstance(first, bool):
            merged[key] = all(values)
        elif isinstance(first, int | float):
            numbers = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
            merged[key] = statistics.median(numbers) if numbers else math.nan
        elif isinstance(first, Mapping):
            merged[key] = median_run(values)
        else:
            merged[key] = first
    return merged
