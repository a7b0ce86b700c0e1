"""Policy "gate": a failure predictor on the uncertainty features decides when to defer.

Fit on val_select: a logistic regression on the standardized UNCERTAINTY_FEATURES plus the calibrated
probability `p` predicts "the classifier's label (hard_label: p > decision_threshold) is wrong". Its threshold on
the failure score is then set on val_calib: defer when score >= gate_threshold, the largest threshold
(most coverage) at which the FNR (and FPR, if given) targets hold on val_calib. Otherwise the decision
is the classifier's label. Empirical only, and the JSON says so. The fitted sklearn objects are reduced
to their parameters (scaler mean / scale, coefficients, intercept).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.preprocessing import StandardScaler

from roadwork_core.calibration.policy import (
    NEVER,
    BasePolicy,
    check_labels,
    check_probabilities,
    decisions_from_masks,
    feature_column,
    register_policy,
    summarize_decisions,
)
from roadwork_core.contracts.labels import HARD_LABEL_THRESHOLD, hard_label
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES

# Columns of the failure predictor's design matrix; "p" is the calibrated probability itself.
GATE_FEATURES: tuple[str, ...] = (*UNCERTAINTY_FEATURES, "p")


@register_policy
class GatePolicy(BasePolicy):
    policy: Literal["gate"] = "gate"
    guarantee: str = "none (empirical on val_calib)"
    feature_names: list[str]
    scaler_mean: list[float]
    scaler_scale: list[float]
    coef: list[float]
    intercept: float
    decision_threshold: float  # classifier label: hard_label(p, decision_threshold), p > threshold
    gate_threshold: float  # defer when failure score >= gate_threshold
    target_fnr: float
    target_fpr: float | None
    n_select: int
    n_calib: int
    select_failure_rate: float
    fit_note: str
    calib_summary: dict[str, float | int | None]  # achieved coverage / fnr / fpr ... on val_calib

    def failure_score(self, p: np.ndarray, features: Mapping[str, np.ndarray] | None) -> np.ndarray:
        """(N,) estimated probability that the classifier's label is wrong."""
        x = _design_matrix(check_probabilities(p), features, self.feature_names)  # (N, F)
        z = (x - np.asarray(self.scaler_mean)) / np.asarray(self.scaler_scale)
        return expit(z @ np.asarray(self.coef) + self.intercept)

    def decide(self, p: np.ndarray, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        p = check_probabilities(p)
        defer = self.failure_score(p, features) >= self.gate_threshold
        return decisions_from_masks(roadwork=hard_label(p, self.decision_threshold), defer=defer)


def _design_matrix(p: np.ndarray, features: Mapping[str, np.ndarray] | None, names: list[str]) -> np.ndarray:
    cols = [p if name == "p" else feature_column(features, name, p.shape[0]) for name in names]
    return np.stack(cols, axis=1)  # (N, F)


def _youden_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold on p maximizing TPR - FPR on val_select (Youden's J), for `p > threshold`.

    sklearn's ROC counts `p >= t` as positive; the float just below t gives the same labels with `>`.
    """
    if y.min() == y.max():
        return HARD_LABEL_THRESHOLD
    fpr, tpr, thresholds = roc_curve(y, p)
    t = float(np.clip(thresholds[np.argmax(tpr - fpr)], 0.0, 1.0))
    return float(np.nextafter(t, -np.inf)) if t > 0.0 else 0.0


def fit_gate_policy(
    select_p: np.ndarray,
    select_features: Mapping[str, np.ndarray],
    select_labels: np.ndarray,
    calib_p: np.ndarray,
    calib_features: Mapping[str, np.ndarray],
    calib_labels: np.ndarray,
    *,
    target_fnr: float = 0.02,
    target_fpr: float | None = None,
    decision_threshold: float | None = 0.5,
    C: float = 1.0,
) -> GatePolicy:
    """Fit the failure predictor on val_select, then its deferral threshold on val_calib.

    decision_threshold=None chooses the classifier's threshold on val_select by Youden's J.
    """
    sp = check_probabilities(select_p, "select_p (val_select)")
    sy = check_labels(select_labels, sp.shape[0], "select_labels (val_select)")
    cp = check_probabilities(calib_p, "calib_p (val_calib)")
    cy = check_labels(calib_labels, cp.shape[0], "calib_labels (val_calib)")
    for name, value in (("target_fnr", target_fnr), ("target_fpr", target_fpr)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} must be in [0, 1)")
    if cy.sum() == 0:
        raise ValueError(
            "val_calib has no roadwork images, so FNR is undefined; add roadwork images to val_calib"
        )
    if target_fpr is not None and cy.sum() == cy.size:
        raise ValueError(
            "val_calib has no no_roadwork images, so FPR is undefined; drop target_fpr or add them"
        )
    if decision_threshold is not None and not 0.0 <= decision_threshold < 1.0:
        raise ValueError(
            f"decision_threshold = {decision_threshold!r}: the classifier's label is p > decision_threshold, "
            f"so it must be in [0, 1) (0.5 by default), or None to choose it on val_select"
        )
    threshold = _youden_threshold(sp, sy) if decision_threshold is None else float(decision_threshold)

    # 1. Failure predictor on val_select.
    names = list(GATE_FEATURES)
    x = _design_matrix(sp, select_features, names)  # (N_select, F)
    wrong = (hard_label(sp, threshold).astype(np.int64) != sy).astype(np.int64)
    scaler = StandardScaler().fit(x)
    if 0 < wrong.sum() < wrong.size:
        clf = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(x), wrong)
        coef, intercept = clf.coef_[0].tolist(), float(clf.intercept_[0])
        note = f"logistic regression on {len(names)} standardized features, {int(wrong.sum())} failures in val_select"
    else:
        # No failures (or only failures) on val_select: nothing to learn, so score by low margin.
        coef = [-1.0 if name == "margin" else 0.0 for name in names]
        intercept = 0.0
        note = (
            f"val_select has {int(wrong.sum())}/{wrong.size} failures: score = sigmoid(-standardized margin)"
        )

    gate = GatePolicy(
        feature_names=names,
        scaler_mean=scaler.mean_.tolist(),
        scaler_scale=scaler.scale_.tolist(),
        coef=coef,
        intercept=intercept,
        decision_threshold=threshold,
        gate_threshold=NEVER,
        target_fnr=target_fnr,
        target_fpr=target_fpr,
        n_select=int(sp.shape[0]),
        n_calib=int(cp.shape[0]),
        select_failure_rate=float(wrong.mean()),
        fit_note=note,
        calib_summary={},
    )

    # 2. Deferral threshold on val_calib: defer iff score >= tau; coverage grows with tau, so take
    # the largest candidate at which the targets hold (tau = 0.0 defers everything: always feasible).
    score = gate.failure_score(cp, calib_features)  # (N_calib,)
    says_roadwork = hard_label(cp, threshold)
    fn_scores = np.sort(score[(cy == 1) & ~says_roadwork])
    fp_scores = np.sort(score[(cy == 0) & says_roadwork])
    n_pos, n_neg = int(cy.sum()), int((cy == 0).sum())
    cand = np.unique(np.concatenate([[0.0], score, [NEVER]]))  # (C,)
    feasible = np.searchsorted(fn_scores, cand, side="left") / n_pos <= target_fnr
    if target_fpr is not None:
        feasible &= np.searchsorted(fp_scores, cand, side="left") / n_neg <= target_fpr
    gate = gate.model_copy(update={"gate_threshold": float(cand[feasible].max())})
    return gate.model_copy(update={"calib_summary": summarize_decisions(gate.decide(cp, calib_features), cy)})
