"""The miner's answer: one float in [0, 1] whose `np.round` is the reward-optimal decision.

What the validator does with an answer (natixnetwork/streetvision-subnet, natix/validator/reward.py;
MIT): `pred = np.round(answer)` (so 0.5 -> 0, no_roadwork), MCC over the miner's last 100 answers
(clipped at 0) and accuracy over the last 10, reward = (0.5 * MCC + 0.5 * accuracy) ** 3; an answer of
-1 or outside [0, 1] earns 0. Labels are 0 / 1 with probability 1/2 each. It rewards no deferral, so
the answer always commits.

`fit_answer_rule` picks, on val_calib, the threshold t on the calibrated p_roadwork that maximizes
the expected per-query reward on that stream (`expected_reward`), and `AnswerRule.answer` maps p to
a float with `answer > 0.5` exactly when `p >= t`. The map is monotone and the identity when t = 0.5
(except p = 0.5 itself, sent just above 0.5); it never sends -1 and never exactly 0.5.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import binom

__all__ = [
    "ANSWER_FILE",
    "ANSWER_SCHEMA_VERSION",
    "AnswerRule",
    "default_answer_rule",
    "expected_reward",
    "fit_answer_rule",
]

ANSWER_FILE = "answer.json"
ANSWER_SCHEMA_VERSION = 1
ACCURACY_WINDOW = 10  # the validator's accuracy window (its MCC window is 100)
_ABOVE_HALF = float(np.nextafter(0.5, 1.0))  # the smallest float np.round sends to 1
_BELOW_HALF = float(np.nextafter(0.5, 0.0))


class AnswerRule(BaseModel):
    """`answer.json` of a bundle: the threshold on p_roadwork above which the answer commits to roadwork."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = ANSWER_SCHEMA_VERSION
    threshold: float = Field(ge=0.0, le=1.0, description="p_roadwork >= threshold -> answer > 0.5 (roadwork)")
    source: str = Field(description="where the threshold comes from (val_calib, or a default and why)")
    n: int = 0  # val_calib images it was chosen on
    n_positive: int = 0
    expected_reward: float | None = None  # at `threshold`, on the validator's balanced stream
    expected_reward_at_half: float | None = None  # the same figure for the plain threshold 0.5
    tpr: float | None = None
    tnr: float | None = None

    def answer(self, p_roadwork: np.ndarray | float) -> np.ndarray:
        """p_roadwork (any shape) -> answers in [0, 1]; np.round(answer) == (p_roadwork >= threshold)."""
        p = np.clip(np.asarray(p_roadwork, dtype=np.float64), 0.0, 1.0)
        t = self.threshold
        commit = p >= t
        with np.errstate(divide="ignore", invalid="ignore"):
            above = 0.5 + 0.5 * (p - t) / (1.0 - t) if t < 1.0 else np.ones_like(p)
            below = 0.5 * p / t if t > 0.0 else np.zeros_like(p)
        return np.where(commit, np.maximum(above, _ABOVE_HALF), np.minimum(below, _BELOW_HALF))


def default_answer_rule(reason: str) -> AnswerRule:
    """The rule of a bundle that carries none: threshold 0.5 on p_roadwork (answer = p_roadwork)."""
    return AnswerRule(threshold=0.5, source=f"default threshold 0.5: {reason}")


def _balanced_mcc(tpr: np.ndarray, tnr: np.ndarray) -> np.ndarray:
    """MCC of a stream with 50 / 50 labels, from the per-class rates; 0 when one class is never predicted."""
    # TP = tpr/2, FN = (1-tpr)/2, TN = tnr/2, FP = (1-tnr)/2; the 1/2 factors cancel.
    denom = np.sqrt((tpr + 1.0 - tnr) * (tnr + 1.0 - tpr))
    with np.errstate(divide="ignore", invalid="ignore"):
        mcc = np.where(denom > 0, (tpr + tnr - 1.0) / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(mcc, 0.0, 1.0)


def _expected_reward_from_rates(tpr: np.ndarray, tnr: np.ndarray) -> np.ndarray:
    """E[(0.5 MCC + 0.5 acc_10) ** 3] with acc_10 ~ Binomial(10, acc) / 10 on the balanced stream.

    The MCC over 100 answers is replaced by its stream value (its window noise is smaller than that of
    the 10-answer accuracy, whose spread the cube turns into a real difference between thresholds).
    """
    tpr, tnr = np.asarray(tpr, dtype=np.float64), np.asarray(tnr, dtype=np.float64)
    mcc = _balanced_mcc(tpr, tnr)[..., None]
    acc = (0.5 * (tpr + tnr))[..., None]
    k = np.arange(ACCURACY_WINDOW + 1)
    pmf = binom.pmf(k, ACCURACY_WINDOW, acc)  # (..., 11)
    return np.sum(pmf * (0.5 * mcc + 0.5 * k / ACCURACY_WINDOW) ** 3, axis=-1)


def expected_reward(labels: np.ndarray, decisions: np.ndarray) -> float:
    """Expected per-query validator reward of answering `decisions` (0/1) to images with `labels`."""
    labels, decisions = np.asarray(labels).astype(int), np.asarray(decisions).astype(int)
    if labels.shape != decisions.shape:
        raise ValueError(f"labels {labels.shape} and decisions {decisions.shape} differ in shape")
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise ValueError("expected_reward needs both classes among the labels (the validator draws 50 / 50)")
    tpr = decisions[pos].mean()
    tnr = 1.0 - decisions[neg].mean()
    return float(_expected_reward_from_rates(np.array(tpr), np.array(tnr)))


def fit_answer_rule(p_roadwork: np.ndarray, labels: np.ndarray, *, source: str = "val_calib") -> AnswerRule:
    """The threshold on p_roadwork with the highest expected validator reward on these images.

    Candidates: 0 (always roadwork), every midpoint between consecutive distinct values of p, and one
    above the largest (always no_roadwork, when p stays below 1). Ties go to the threshold nearest 0.5.
    """
    p = np.asarray(p_roadwork, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(
            f"fit_answer_rule: p_roadwork {p.shape} and labels {y.shape} must be equal 1-d arrays"
        )
    if not np.isfinite(p).all():
        raise ValueError(
            "fit_answer_rule: p_roadwork holds NaN or inf; the calibrated probabilities are broken"
        )
    if not set(np.unique(y)) <= {0, 1} or (y == 1).all() or (y == 0).all():
        raise ValueError(
            f"fit_answer_rule: labels must hold both 0 and 1 (got {sorted(set(np.unique(y).tolist()))}); "
            f"{source} needs images of both classes"
        )
    p = np.clip(p, 0.0, 1.0)
    values = np.unique(p)
    candidates = [np.array([0.0]), (values[:-1] + values[1:]) / 2.0]
    if values[-1] < 1.0:
        candidates.append(np.array([(values[-1] + 1.0) / 2.0]))
    t = np.concatenate(candidates)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    tpr = 1.0 - np.searchsorted(pos, t, side="left") / len(pos)  # share of positives with p >= t
    tnr = np.searchsorted(neg, t, side="left") / len(neg)  # share of negatives with p < t
    reward = _expected_reward_from_rates(tpr, tnr)
    best = np.flatnonzero(reward >= reward.max() - 1e-12)
    i = int(best[np.argmin(np.abs(t[best] - 0.5))])
    at_half = _expected_reward_from_rates(np.array((pos >= 0.5).mean()), np.array((neg < 0.5).mean()))
    return AnswerRule(
        threshold=float(t[i]),
        source=f"{source}: threshold maximizing the expected validator reward",
        n=int(len(y)),
        n_positive=int(len(pos)),
        expected_reward=float(reward[i]),
        expected_reward_at_half=float(at_half),
        tpr=float(tpr[i]),
        tnr=float(tnr[i]),
    )
