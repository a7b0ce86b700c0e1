"""The validator's reward for a miner's answers, query by query.

Facts from the StreetVision validator (natixnetwork/streetvision-subnet, MIT licence;
`natix/validator/reward.py`, `natix/validator/miner_performance_tracker.py`, read 2026-12), and the
cube from issue 14 / docs; the code is ours:

- Each answer joins the miner's history (the last 100 answers and labels are kept), -1 included.
- Metrics over a window of the last `w` history entries (fewer at the start): answers equal to -1 are
  dropped, the rest become predictions `np.round(answer)` (so 0.5 -> 0, 0.51 -> 1, 1.7 -> 2).
  accuracy = share of predictions equal to the label; MCC is sklearn's (multiclass formula when an
  out-of-range answer rounds to a third value), clipped at 0, and 0 when the window's labels are one
  class. A window with nothing left has accuracy = MCC = 0.
- reward = (0.5 * MCC over 100 + 0.5 * accuracy over 10) ** 3; an answer of -1 gets 0, an answer
  outside [0, 1] gets 0 (it still joins the history).
- A NaN or infinite answer makes sklearn raise inside the validator, which then uses zero metrics for
  every window that holds it; replicated.

`query_rewards` computes all windows at once from cumulative sums (no per-query sklearn call), so a
simulated stream of thousands of queries costs milliseconds.
"""

from __future__ import annotations

import numpy as np

MCC_WINDOW = 100
ACC_WINDOW = 10
HISTORY = 100  # the validator keeps this many answers per miner
NO_ANSWER = -1.0


def _window_sums(v: np.ndarray, window: int) -> np.ndarray:
    """sum(v[max(0, i - window + 1) : i + 1]) for every i; v is (n,) int."""
    c = np.concatenate([[0], np.cumsum(v, dtype=np.int64)])
    i = np.arange(len(v))
    return c[i + 1] - c[np.maximum(0, i + 1 - window)]


def _check(labels, answers) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64)
    a = np.asarray(answers, dtype=np.float64)
    if y.ndim != 1 or a.shape != y.shape:
        raise ValueError(
            f"labels {y.shape} and answers {a.shape} must be 1-D and of the same length (one answer per query)"
        )
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise ValueError(f"labels must be 0 or 1; query {int(bad[0])} has label {y[bad[0]]!r}")
    return y, a


def window_metrics(labels, answers, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(MCC, accuracy) the validator computes after each query over its last `window` history entries."""
    y, a = _check(labels, answers)
    window = min(window, HISTORY)
    kept = a != NO_ANSWER
    finite = np.isfinite(a)
    pred = np.where(finite, np.round(np.where(finite, a, 0.0)), np.nan)
    ok = kept & finite  # answers that enter sklearn without error
    poisoned = _window_sums((kept & ~finite).astype(np.int64), window) > 0

    s = _window_sums(ok.astype(np.int64), window).astype(np.float64)
    t1 = _window_sums((ok & (y == 1)).astype(np.int64), window).astype(np.float64)
    t0 = s - t1
    correct = _window_sums((ok & (pred == y)).astype(np.int64), window).astype(np.float64)
    sum_tp = np.zeros_like(s)  # sum over classes of (true count * predicted count)
    sum_pp = np.zeros_like(s)  # sum over classes of predicted count squared
    for value in np.unique(pred[ok]):
        p_k = _window_sums((ok & (pred == value)).astype(np.int64), window).astype(np.float64)
        sum_pp += p_k**2
        if value in (0.0, 1.0):
            sum_tp += p_k * (t1 if value == 1.0 else t0)

    # sklearn's matthews_corrcoef: (c*s - sum t_k p_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2)), 0 if 0/0
    den = (s**2 - sum_pp) * (s**2 - (t0**2 + t1**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = np.where(den > 0, (correct * s - sum_tp) / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
        acc = np.where(s > 0, correct / np.where(s > 0, s, 1.0), 0.0)
    mcc = np.where((t0 > 0) & (t1 > 0), np.maximum(mcc, 0.0), 0.0)
    return np.where(poisoned, 0.0, mcc), np.where(poisoned, 0.0, acc)


def query_rewards(labels, answers) -> np.ndarray:
    """Per-query reward the validator gives a miner that answered `answers` to `labels`, in order.

    `labels` are 0/1; `answers` are floats (-1 = no answer). Returns a float64 array of len(labels).
    """
    y, a = _check(labels, answers)
    mcc, _ = window_metrics(y, a, MCC_WINDOW)
    _, acc = window_metrics(y, a, ACC_WINDOW)
    reward = (0.5 * mcc + 0.5 * acc) ** 3
    penalized = (a == NO_ANSWER) | (a < 0.0) | (a > 1.0)
    return np.where(penalized, 0.0, reward)


def reward_proxy(labels, answers) -> dict[str, float]:
    """accuracy, MCC and (0.5 MCC + 0.5 accuracy)^3 over a whole set, by the validator's window rules.

    Answers of -1 (and non-finite answers) are dropped; MCC is clipped at 0 and 0 for one-class labels.
    """
    from sklearn.metrics import matthews_corrcoef

    y, a = _check(labels, answers)
    ok = (a != NO_ANSWER) & np.isfinite(a)
    pred, yy = np.round(a[ok]), y[ok]
    if yy.size == 0:
        return {"accuracy": 0.0, "mcc": 0.0, "reward_proxy": 0.0, "n": 0}
    mcc = max(0.0, float(matthews_corrcoef(yy, pred))) if np.unique(yy).size > 1 else 0.0
    acc = float((pred == yy).mean())
    return {"accuracy": acc, "mcc": mcc, "reward_proxy": (0.5 * mcc + 0.5 * acc) ** 3, "n": int(yy.size)}


__all__ = ["ACC_WINDOW", "MCC_WINDOW", "query_rewards", "reward_proxy", "window_metrics"]
