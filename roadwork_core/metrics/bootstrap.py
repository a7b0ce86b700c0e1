"""Percentile bootstrap confidence intervals for any statistic of paired per-image arrays.

Resampling indices are drawn in one seeded numpy call per chunk (rows = resamples), and every
array is indexed with the same row, so pairs (p_i, label_i, decision_i) stay together. A resample
on which the statistic is undefined (NaN, e.g. no positives drawn for FNR) is left out of that
statistic's percentiles; `n_valid` says how many were used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# Index rows per chunk: bounds memory at chunk * N * 8 bytes whatever n_resamples is.
_CHUNK_ELEMENTS = 4_000_000


def _interval(value: float, samples: np.ndarray, level: float) -> dict[str, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return {"value": value, "low": math.nan, "high": math.nan, "n_valid": 0}
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return {"value": value, "low": float(low), "high": float(high), "n_valid": int(finite.size)}


def bootstrap_ci(
    stat_fn: Callable[..., float | dict[str, float]],
    *arrays: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Point value and percentile CI of `stat_fn(*arrays)` over `n_resamples` seeded resamples.

    Returns {"value", "low", "high", "n_valid"} when `stat_fn` returns a number, or
    {name: {"value", "low", "high", "n_valid"}} when it returns a dict of named numbers.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level = {level!r}; pass a confidence level in (0, 1), e.g. 0.95")
    if n_resamples < 1:
        raise ValueError(f"n_resamples = {n_resamples!r}; pass a positive number of resamples")
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    for k, a in enumerate(arrays):
        if len(a) != n:
            raise ValueError(
                f"array {k} has {len(a)} rows but array 0 has {n}; resampled arrays must be paired"
            )

    point = stat_fn(*arrays)
    named = isinstance(point, dict)
    point_d: dict[str, float] = dict(point) if named else {"_": point}
    samples = {name: np.full(n_resamples, math.nan) for name in point_d}

    if n > 0:
        rng = np.random.default_rng(seed)
        chunk = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_resamples, chunk):
            rows = min(chunk, n_resamples - start)
            idx = rng.integers(0, n, size=(rows, n))  # (rows, N)
            for r in range(rows):
                stat = stat_fn(*(a[idx[r]] for a in arrays))
                stat_d = stat if named else {"_": stat}
                for name in point_d:
                    samples[name][start + r] = float(stat_d[name])

    out = {name: _interval(float(point_d[name]), samples[name], level) for name in point_d}
    return out if named else out["_"]
