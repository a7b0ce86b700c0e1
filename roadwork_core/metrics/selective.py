"""Selective-prediction metrics: risk-coverage curve, AURC, AUGRC, and a policy's decision summary.

Risk-coverage: accept images in order of decreasing confidence. At coverage c (fraction accepted),
  selective risk   = wrong accepted / accepted           (what a user of accepted answers sees)
  generalized risk = wrong accepted / ALL images         (Traub et al. 2024)
AUGRC (Traub et al., "Overcoming Common Flaws in the Evaluation of Selective Classification
Systems", NeurIPS 2024) integrates the generalized risk over coverage. With error rate π and
AUROC_f = AUROC of the confidence for separating correct from failed predictions it equals
    AUGRC = ½π² + π(1-π)(1-AUROC_f)
exactly for the trapezoid below (ties count ½ in both), so the optimum (perfect ranking) is ½π².

Ties in confidence are one group: the curve has one point per distinct confidence, and the
trapezoid between points is the expectation over random tie-breaking.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

DECISIONS: tuple[str, ...] = ("roadwork", "no_roadwork", "defer")


def _check_pair(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct).reshape(-1)
    if conf.shape != ok.shape:
        raise ValueError(f"confidence has {conf.size} values but correct has {ok.size}; pass one per image")
    if not np.isfinite(conf).all():
        i = int(np.flatnonzero(~np.isfinite(conf))[0])
        raise ValueError(
            f"confidence[{i}] = {conf[i].item()!r} is not finite; confidence must be a real score"
        )
    if ok.size and not np.isin(ok, (0, 1, True, False)).all():
        i = int(np.flatnonzero(~np.isin(ok, (0, 1)))[0])
        raise ValueError(f"correct[{i}] = {ok[i].item()!r}; correct must be boolean (prediction == label)")
    return conf, ok.astype(bool)


def risk_coverage_curve(
    confidence: np.ndarray, correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, selective_risk, generalized_risk), one point per distinct confidence, descending.

    confidence: (N,) higher = more confident; correct: (N,) bool. Arrays are empty when N == 0.
    """
    coverage, selective, generalized, _ = _curve_with_thresholds(confidence, correct)
    return coverage, selective, generalized


def _curve_with_thresholds(
    confidence: np.ndarray, correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    conf, ok = _check_pair(confidence, correct)
    n = conf.size
    if n == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    order = np.argsort(-conf, kind="stable")
    conf_sorted, wrong_sorted = conf[order], ~ok[order]
    cum_wrong = np.cumsum(wrong_sorted)  # (N,)
    # last index of each tie group (confidence changes after it, or the end)
    group_end = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    accepted = group_end + 1
    wrong = cum_wrong[group_end]
    coverage = accepted / n
    return coverage, wrong / accepted, wrong / n, conf_sorted[group_end]


def risk_coverage_table(confidence: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """The curve as a table: confidence_threshold, coverage, selective_risk, generalized_risk,
    optimal_generalized_risk (a perfect ranking at the same error rate)."""
    coverage, selective, generalized, threshold = _curve_with_thresholds(confidence, correct)
    correct = np.asarray(correct, dtype=bool)
    error_rate = 1.0 - float(correct.mean()) if correct.size else math.nan
    return pd.DataFrame(
        {
            "confidence_threshold": threshold,
            "coverage": coverage,
            "selective_risk": selective,
            "generalized_risk": generalized,
            "optimal_generalized_risk": optimal_generalized_risk(coverage, error_rate),
        }
    )


def augrc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the generalized risk-coverage curve (trapezoid from (0, 0)); NaN when empty."""
    coverage, _, generalized = risk_coverage_curve(confidence, correct)
    if coverage.size == 0:
        return math.nan
    return float(np.trapezoid(np.r_[0.0, generalized], np.r_[0.0, coverage]))


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the selective risk-coverage curve (Geifman & El-Yaniv): (1/N) Σ_k risk(k).

    A tie group contributes its end-of-group risk for each of its members. NaN when empty.
    """
    coverage, selective, _ = risk_coverage_curve(confidence, correct)
    if coverage.size == 0:
        return math.nan
    widths = np.diff(np.r_[0.0, coverage])
    return float(np.sum(widths * selective))


def augrc_optimal(error_rate: float) -> float:
    """AUGRC of a perfect failure ranking at error rate π: ½π²."""
    return 0.5 * float(error_rate) ** 2


def optimal_generalized_risk(coverage: np.ndarray, error_rate: float) -> np.ndarray:
    """Generalized risk of a perfect ranking: zero until 1-π is accepted, then rising with slope 1."""
    return np.clip(np.asarray(coverage, dtype=np.float64) - (1.0 - error_rate), 0.0, None)


def check_decisions(decisions: np.ndarray) -> np.ndarray:
    """Return decisions as a str array; raise ValueError naming the first value outside DECISIONS."""
    d = np.asarray(decisions).reshape(-1).astype(str)
    bad = ~np.isin(d, DECISIONS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"decisions[{i}] = {d[i].item()!r} ({int(bad.sum())} bad rows); each decision must be one of {DECISIONS}"
        )
    return d


def selective_summary(decisions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Coverage, FNR, FPR and selective accuracy of a policy's decisions against 0/1 labels.

    FNR = roadwork images decided no_roadwork / all roadwork images (deferred ones count as not
    missed); FPR = no_roadwork images decided roadwork / all no_roadwork images; selective accuracy
    is over accepted (non-deferred) images. `fnr_accepted` = roadwork images decided no_roadwork /
    accepted roadwork images (what SCRC guarantees). NaN where the denominator is zero.
    Counts: n_positive, n_positive_accepted, n_false_negative, n_negative, n_false_positive.
    """
    d = check_decisions(decisions)
    y = np.asarray(labels).reshape(-1)
    if y.shape != d.shape:
        raise ValueError(
            f"decisions has {d.size} values but labels has {y.size}; pass one decision per label"
        )
    n = int(d.size)
    pos, neg = y == 1, y == 0
    accepted = d != "defer"
    n_pos, n_neg, n_acc = int(pos.sum()), int(neg.sum()), int(accepted.sum())
    n_pos_acc = int((pos & accepted).sum())
    false_neg = int((pos & (d == "no_roadwork")).sum())
    false_pos = int((neg & (d == "roadwork")).sum())
    correct = int(((d == "roadwork") & pos).sum() + ((d == "no_roadwork") & neg).sum())
    return {
        "n": n,
        "coverage": n_acc / n if n else math.nan,
        "fnr": false_neg / n_pos if n_pos else math.nan,
        "fnr_accepted": false_neg / n_pos_acc if n_pos_acc else math.nan,
        "fpr": false_pos / n_neg if n_neg else math.nan,
        "selective_accuracy": correct / n_acc if n_acc else math.nan,
        "n_positive": n_pos,
        "n_positive_accepted": n_pos_acc,
        "n_false_negative": false_neg,
        "n_negative": n_neg,
        "n_false_positive": false_pos,
    }
