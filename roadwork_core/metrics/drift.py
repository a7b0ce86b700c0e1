"""Drift statistics: MMD with a permutation test on embeddings, PSI and KS on prediction scores."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, *, n_permutations: int = 500, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d) with an RBF kernel (median heuristic
    bandwidth on the pooled sample), and its permutation p-value (Gretton et al., JMLR 2012)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings must be (n, d) and (m, d) with the same d; got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side; got {len(x)} and {len(y)}")
    z = np.concatenate([x, y])
    d2 = _sq_dists(z, z)
    off = d2[~np.eye(len(z), dtype=bool)]
    bandwidth = np.median(off) if np.median(off) > 0 else 1.0
    k = np.exp(-d2 / bandwidth)
    n, m = len(x), len(y)

    def mmd2(idx_x: np.ndarray, idx_y: np.ndarray) -> float:
        kxx, kyy, kxy = k[np.ix_(idx_x, idx_x)], k[np.ix_(idx_y, idx_y)], k[np.ix_(idx_x, idx_y)]
        return float(
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )

    observed = mmd2(np.arange(n), np.arange(n, n + m))
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        perm = rng.permutation(n + m)
        exceed += mmd2(perm[:n], perm[n:]) >= observed
    return observed, (exceed + 1) / (n_permutations + 1)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected`, on quantile bins of `expected`."""
    expected, actual = np.asarray(expected, float), np.asarray(actual, float)
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    e = np.histogram(expected, edges)[0] / max(len(expected), 1) + eps
    a = np.histogram(actual, edges)[0] / max(len(actual), 1) + eps
    return float(((a - e) * np.log(a / e)).sum())


@dataclass
class DriftResult:
    mmd2: float
    mmd_pvalue: float
    psi: float
    ks_statistic: float
    ks_pvalue: float
    n_reference: int
    n_current: int
    drifted: bool

    def as_tags(self) -> dict[str, str]:
        return {
            f"roadwork/drift_{k}": f"{v:.6g}" if isinstance(v, float) else str(v)
            for k, v in asdict(self).items()
        }


def drift_report(
    ref_emb: np.ndarray,
    cur_emb: np.ndarray,
    ref_scores: np.ndarray,
    cur_scores: np.ndarray,
    *,
    alpha: float = 0.01,
    psi_threshold: float = 0.25,
    n_permutations: int = 500,
    seed: int = 0,
) -> DriftResult:
    """Drift is significant when the MMD permutation p-value < alpha, or PSI > psi_threshold
    (0.25 is the customary 'major shift' level), or the KS test on scores rejects at alpha."""
    mmd2, p_mmd = mmd_permutation_test(ref_emb, cur_emb, n_permutations=n_permutations, seed=seed)
    ks = stats.ks_2samp(ref_scores, cur_scores)
    value = psi(ref_scores, cur_scores)
    drifted = bool(p_mmd < alpha or value > psi_threshold or ks.pvalue < alpha)
    return DriftResult(
        mmd2, p_mmd, value, float(ks.statistic), float(ks.pvalue), len(ref_emb), len(cur_emb), drifted
    )
