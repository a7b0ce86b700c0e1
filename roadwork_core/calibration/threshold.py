"""Policy "threshold": two thresholds on the calibrated probability, swept on val_calib. Called "softmax"
before; policy.json files with that name still read (roadwork_core.calibration.policy.OLD_POLICY_NAMES).

p >= t_pos -> roadwork; p < t_neg -> no_roadwork; otherwise defer (t_neg <= t_pos). The FNR depends
only on t_neg and the FPR only on t_pos, and for t_neg <= t_pos coverage is #(p < t_neg) + #(p >= t_pos),
so the coverage-maximizing feasible pair is the largest t_neg meeting the FNR target and the smallest
t_pos >= t_neg meeting the FPR target (t_pos = t_neg when there is no FPR target: nothing deferred).
Empirical on val_calib only: no guarantee on new data, and the JSON says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from roadwork_core.calibration.policy import (
    NEVER,
    BasePolicy,
    check_labels,
    check_probabilities,
    decisions_from_masks,
    register_policy,
    summarize_decisions,
)


@register_policy
class ThresholdPolicy(BasePolicy):
    policy: Literal["threshold"] = "threshold"
    guarantee: str = "none (empirical on val_calib)"
    t_neg: float = Field(ge=0.0, le=NEVER)  # p < t_neg -> no_roadwork
    t_pos: float = Field(ge=0.0, le=NEVER)  # p >= t_pos -> roadwork
    target_fnr: float
    target_fpr: float | None
    n: int
    calib_summary: dict[str, float | int | None]  # achieved coverage / fnr / fpr ... on val_calib

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdPolicy:
        if self.t_neg > self.t_pos:
            raise ValueError(f"t_neg={self.t_neg} must be <= t_pos={self.t_pos}")
        return self

    def decide(self, p: np.ndarray, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        p = check_probabilities(p)
        roadwork = p >= self.t_pos
        return decisions_from_masks(roadwork=roadwork, defer=~roadwork & (p >= self.t_neg))


def _check_target(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


def fit_threshold_policy(
    p: np.ndarray,
    labels: np.ndarray,
    *,
    target_fnr: float = 0.02,
    target_fpr: float | None = None,
) -> ThresholdPolicy:
    """Sweep both thresholds over the unique calibrated probabilities of val_calib (vectorized)."""
    p = check_probabilities(p, "p (val_calib)")
    y = check_labels(labels, p.shape[0], "labels (val_calib)")
    _check_target(target_fnr, "target_fnr")
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    if pos.size == 0:
        raise ValueError(
            "val_calib has no roadwork images, so FNR is undefined; add roadwork images to val_calib"
        )

    # Candidates: every observed value, 0.0 ("never no_roadwork") and NEVER ("never roadwork").
    cand = np.unique(np.concatenate([[0.0], p, [NEVER]]))  # (C,) ascending
    fnr = np.searchsorted(pos, cand, side="left") / pos.size  # (C,) positives with p < t, non-decreasing
    t_neg = float(cand[fnr <= target_fnr].max())  # cand[0] = 0.0 is always feasible

    if target_fpr is None:
        t_pos = t_neg
    else:
        _check_target(target_fpr, "target_fpr")
        if neg.size == 0:
            raise ValueError(
                "val_calib has no no_roadwork images, so FPR is undefined; drop target_fpr or add them"
            )
        fpr = (neg.size - np.searchsorted(neg, cand, side="left")) / neg.size  # (C,) negatives with p >= t
        t_pos = max(float(cand[fpr <= target_fpr].min()), t_neg)  # cand[-1] = NEVER is always feasible

    policy = ThresholdPolicy(
        t_neg=t_neg,
        t_pos=t_pos,
        target_fnr=target_fnr,
        target_fpr=target_fpr,
        n=int(p.shape[0]),
        calib_summary={},
    )
    return policy.model_copy(update={"calib_summary": summarize_decisions(policy.decide(p), y)})
