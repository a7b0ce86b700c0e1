"""Percentile bootstrap confidence intervals for any statistic of paired per-image arrays.

Resampling indices are drawn in one seeded numpy call per chunk (rows = resamples), and every
array is indexed with the same row, so pairs (p_i, label_i, decision_i) stay together. With
`groups` (the splits' near-duplicate `group_id`), whole groups are resampled instead of rows (the
cluster bootstrap): val_test keeps near-duplicates together, so its images are not independent, and
resampling rows would treat a group of five near-copies as five independent draws and give too
narrow an interval. A resample on which the statistic is undefined (NaN, e.g. no positives drawn for
FNR) is left out of that statistic's percentiles; `n_valid` says how many were used.
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
    groups: np.ndarray | None = None,
) -> dict:
    """Point value and percentile CI of `stat_fn(*arrays)` over `n_resamples` seeded resamples.

    groups: (N,) cluster id per row (e.g. `group_id`); when given, each resample draws as many
    groups as there are, with replacement, and takes every row of each drawn group.
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

    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} rows but the arrays have {n}; pass one group id per row")

    point = stat_fn(*arrays)
    named = isinstance(point, dict)
    point_d: dict[str, float] = dict(point) if named else {"_": point}
    samples = {name: np.full(n_resamples, math.nan) for name in point_d}

    if n > 0:
        draw = _row_draws(n, seed) if groups is None else _group_draws(np.asarray(groups), seed)
        chunk = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_resamples, chunk):
            for r, idx in enumerate(draw(min(chunk, n_resamples - start))):
                stat = stat_fn(*(a[idx] for a in arrays))
                stat_d = stat if named else {"_": stat}
                for name in point_d:
                    samples[name][start + r] = float(stat_d[name])

    out = {name: _interval(float(point_d[name]), samples[name], level) for name in point_d}
    return out if named else out["_"]


def _row_draws(n: int, seed: int) -> Callable[[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return lambda rows: rng.integers(0, n, size=(rows, n))  # (rows, N): one resample per row


def _group_draws(groups: np.ndarray, seed: int) -> Callable[[int], list[np.ndarray]]:
    """Resamples of whole groups: draw G group ids with replacement, take all rows of each."""
    _, codes = np.unique(groups, return_inverse=True)
    order = np.argsort(codes, kind="stable")  # rows grouped by code
    counts = np.bincount(codes)  # (G,)
    starts = np.r_[0, np.cumsum(counts)[:-1]]  # (G,) first position of each group in `order`
    rng = np.random.default_rng(seed)

    def draw(rows: int) -> list[np.ndarray]:
        picked = rng.integers(0, counts.size, size=(rows, counts.size))  # (rows, G) group codes
        out = []
        for g in picked:
            size = counts[g]  # (G,) rows each drawn group contributes
            offset = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
            out.append(order[np.repeat(starts[g], size) + offset])
        return out

    return draw
