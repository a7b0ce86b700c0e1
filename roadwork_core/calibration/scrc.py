"""Policy "scrc": selective conformal risk control of the false-negative rate.

Two thresholds, both fitted on val_calib:
- lambda1 on a confidence score decides accept vs defer: an image is accepted when it is strictly more
  confident than lambda1, ties on the score broken by the calibrated probability's distance from 1/2
  (`lambda1_tiebreak`): the key (confidence, |p - 1/2|) compared lexicographically. lambda1 is the key of
  the (m + 1)-th most confident calibration image, m = ceil(target_coverage * n), so m are accepted: a
  quantile of the scores alone (no labels, no order).
- lambda2 on the calibrated probability decides among accepted images: p >= lambda2 -> roadwork,
  else no_roadwork. It is fitted on exactly the calibration images the rule accepts, those strictly
  past lambda1. The image sitting at lambda1 is the one that chose lambda1: keeping it in the fit (as an
  early version did) biases it, e.g. a realized FNR of 0.64 against alpha = 0.5 with n = 10
  (tests/unit/test_scrc_guarantees.py). Given lambda1 = v, the calibration images past v are i.i.d.
  draws from (image | key past v), the law of an accepted test image, so both guarantees below hold
  conditionally on lambda1 (and hence marginally), atoms in the score included: a discrete score
  (view_disagreement is k / V) or one saturated in float32 (max_prob = 1 for |logit| > ~17) no longer
  lets images tied at lambda1 be accepted without being fitted on. An earlier version accepted
  confidence >= lambda1 but fitted past it: with 159 of 500 images tied at lambda1 its realized FNR was
  0.37 against alpha = 0.1. Images whose whole key equals lambda1's are neither accepted nor fitted
  (`n_tied_at_lambda1`). Policies saved before the tie-break (no `lambda1_tiebreak`) decide as they did.
  lambda2 controls FNR = (accepted roadwork images decided no_roadwork) / (accepted roadwork images)
  at level alpha, in one of two modes:
  * "crc" (Angelopoulos et al., "Conformal Risk Control"): lambda_hat = inf{lambda : n/(n+1) R_hat +
    B/(n+1) <= alpha}, B = 1. With the n+ accepted positive scores s_(1) <= ... <= s_(n+) this is
    lambda2 = s_(k), k = floor(alpha (n+ + 1)): at most k - 1 calibration positives lie strictly
    below s_(k), ties included. k = 0 means no threshold qualifies: everything accepted is flagged
    roadwork (lambda2 = 0). E[FNR] <= alpha.
  * "ltt" (Angelopoulos et al., "Learn then Test"): a fixed grid of lambda2 from 0 (safest) upward;
    a p-value per lambda for H0: FNR(lambda) > alpha (binomial tail or Hoeffding-Bentkus); fixed-
    sequence testing at level delta keeps the largest lambda of the rejected prefix. P(FNR <= alpha)
    >= 1 - delta over the calibration draw.
The guarantee is on accepted images only; deferred images go to a human. FPR is not controlled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field
from scipy.special import xlogy
from scipy.stats import binom

from roadwork_core.calibration.policy import (
    BasePolicy,
    check_labels,
    check_probabilities,
    decisions_from_masks,
    feature_column,
    register_policy,
    summarize_decisions,
)

ScrcMode = Literal["crc", "ltt"]
LttBound = Literal["binomial", "hoeffding_bentkus"]

# Which way each uncertainty feature points: +1 when larger means more confident.
CONFIDENCE_DIRECTION: dict[str, int] = {
    "max_prob": 1,
    "margin": 1,
    "entropy": -1,
    "view_var": -1,
    "view_disagreement": -1,
    "global_tile_disagreement": -1,
}


@register_policy
class ScrcPolicy(BasePolicy):
    policy: Literal["scrc"] = "scrc"
    guarantee: str
    mode: ScrcMode
    bound: LttBound | None  # p-value bound of "ltt"; None for "crc"
    alpha: float = Field(gt=0.0, lt=1.0)
    delta: float | None  # "ltt" only
    target_coverage: float = Field(gt=0.0, le=1.0)
    confidence_feature: str
    higher_is_confident: bool
    lambda1: float  # accept when confidence is past lambda1 (> when higher_is_confident, else <) ...
    # ... or equal to it with |p - 1/2| > lambda1_tiebreak. None (a policy saved before the tie-break):
    # accept confidence >= lambda1 (<= when not higher_is_confident), as it did then.
    lambda1_tiebreak: float | None = None
    lambda2: float = Field(ge=0.0, le=1.0)  # among accepted: p >= lambda2 -> roadwork
    # Which calibration images lambda2 was fitted on, and what the guarantee is given. Policies written
    # before lambda2 was fitted strictly past lambda1 lack the next three fields: they still load (None)
    # and decide as before, but their guarantee is only approximate at small n (refit to get it exact).
    conditioning: str | None = None
    k: int | None  # "crc": rank of lambda2 among accepted positive scores (0: flag everything)
    grid_size: int | None  # "ltt": lambda2 grid is linspace(0, 1, grid_size + 1)
    n: int
    n_accepted: int  # val_calib images the rule accepts
    n_fit: int | None = None  # val_calib images lambda2 was fitted on: those accepted, strictly past lambda1
    n_tied_at_lambda1: int | None = (
        None  # val_calib images whose key equals lambda1's: neither accepted nor fitted
    )
    n_pos_accepted: int  # roadwork images among the n_fit (the n+ of CRC / LTT)
    calib_fnr_accepted: float | None  # the guaranteed quantity, measured on the n_pos_accepted
    calib_summary: dict[str, float | int | None]  # achieved figures on val_calib (all images)

    def accept(self, confidence: np.ndarray, p: np.ndarray) -> np.ndarray:
        c = np.asarray(confidence, dtype=np.float64)
        if self.lambda1_tiebreak is None:
            return c >= self.lambda1 if self.higher_is_confident else c <= self.lambda1
        return past_key(c, np.abs(np.asarray(p, dtype=np.float64) - 0.5), self.higher_is_confident,
                        self.lambda1, self.lambda1_tiebreak)  # fmt: skip

    def decide(self, p: np.ndarray, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        p = check_probabilities(p)
        accepted = self.accept(feature_column(features, self.confidence_feature, p.shape[0]), p)
        return decisions_from_masks(roadwork=p >= self.lambda2, defer=~accepted)


def past_key(
    confidence: np.ndarray,
    tiebreak: np.ndarray,
    higher_is_confident: bool,
    lambda1: float,
    lambda1_tiebreak: float,
) -> np.ndarray:
    """(n,) bool: (confidence, tiebreak) strictly more confident than (lambda1, lambda1_tiebreak),
    lexicographically; a larger tiebreak (|p - 1/2|) is more confident."""
    past = confidence > lambda1 if higher_is_confident else confidence < lambda1
    return past | ((confidence == lambda1) & (tiebreak > lambda1_tiebreak))


def selection_key(
    confidence: np.ndarray, tiebreak: np.ndarray, target_coverage: float, higher_is_confident: bool = True
) -> tuple[float, float]:
    """(lambda1, lambda1_tiebreak): the key of the (m + 1)-th most confident image, m =
    ceil(target_coverage * n), keys (confidence, tiebreak) ordered lexicographically, so that m images lie
    strictly past it when no two keys tie. With m = n every image must pass: the least confident
    confidence with a tiebreak of -1, below any |p - 1/2|."""
    n = confidence.size
    m = max(1, math.ceil(round(target_coverage * n, 9)))  # round: 0.9 * 10 must be 9, not 10
    signed = confidence if higher_is_confident else -confidence
    order = np.lexsort((tiebreak, signed))  # ascending: least confident first
    if m >= n:
        return float(confidence[order[0]]), -1.0
    j = order[n - m - 1]
    return float(confidence[j]), float(tiebreak[j])


def crc_threshold(pos_scores: np.ndarray, alpha: float) -> tuple[float, int]:
    """(lambda2, k): the k-th smallest positive score, k = floor(alpha (n+ + 1)); (0.0, 0) when k = 0.

    k <= n+ for alpha < 1, so no clamping is needed (or done).
    """
    s = np.sort(np.asarray(pos_scores, dtype=np.float64))
    k = math.floor(alpha * (s.size + 1))
    return (float(s[k - 1]), k) if k >= 1 else (0.0, 0)


def ltt_pvalues(n_errors: np.ndarray, n: int, alpha: float, bound: LttBound) -> np.ndarray:
    """(L,) p-values of H0: risk > alpha, from (L,) error counts out of n Bernoulli losses."""
    binomial = binom.cdf(n_errors, n, alpha)  # P(Bin(n, alpha) <= errors)
    if bound == "binomial":
        return binomial
    if n == 0:
        return np.ones_like(binomial)
    r = np.minimum(n_errors / n, alpha)
    h1 = xlogy(r, r / alpha) + xlogy(1.0 - r, (1.0 - r) / (1.0 - alpha))  # KL(Ber(r) || Ber(alpha))
    return np.minimum(np.exp(-n * h1), math.e * binomial)


def ltt_threshold(
    pos_scores: np.ndarray, alpha: float, delta: float, bound: LttBound, grid_size: int
) -> float:
    """Largest lambda2 of the grid prefix whose p-values are all <= delta; 0.0 when the first fails."""
    s = np.sort(np.asarray(pos_scores, dtype=np.float64))
    grid = np.linspace(0.0, 1.0, grid_size + 1)  # (L,) safest (no false negatives) first
    pvals = ltt_pvalues(np.searchsorted(s, grid, side="left"), s.size, alpha, bound)
    rejected = pvals <= delta
    j = grid.size if rejected.all() else int(np.argmin(rejected))  # first lambda not rejected
    return float(grid[j - 1]) if j >= 1 else 0.0


def tie_warning(policy: ScrcPolicy) -> str | None:
    """A message when many val_calib images share lambda1's whole key, so that the policy accepts far fewer
    than target_coverage (they are deferred: the guarantee still holds, on fewer images). That happens when
    the confidence and the calibrated p are both saturated: a step calibrator (isotonic, histogram) maps every
    very confident logit to the same p."""
    tied = policy.n_tied_at_lambda1 or 0
    if policy.n == 0 or tied <= max(1, 0.05 * policy.n):
        return None
    return (
        f"{tied} of {policy.n} val_calib images share lambda1's {policy.confidence_feature} and |p - 1/2| "
        f"(a saturated score), so they are deferred: accepted {policy.n_accepted} against target_coverage "
        f"{policy.target_coverage}. Choose a confidence_feature that still separates them, or a calibrator "
        f"that keeps p continuous (calibrator.methods: [temperature] or [beta])"
    )


def _guarantee(
    mode: ScrcMode, alpha: float, delta: float | None, bound: LttBound | None, feature: str
) -> str:
    scope = (
        f"FNR among ACCEPTED images (accepted: {feature} passes lambda1; FNR = accepted roadwork images "
        f"decided no_roadwork / accepted roadwork images); deferred images go to a human and carry no "
        f"guarantee; FPR is not controlled; assumes test images exchangeable with val_calib"
    )
    if mode == "crc":
        return (
            f"E[FNR] <= {alpha} in expectation over the val_calib draw (conformal risk control, B=1), {scope}"
        )
    return (
        f"P(FNR <= {alpha}) >= {1.0 - delta:.6g} over the val_calib draw (Learn-then-Test, {bound} p-values, "
        f"fixed-sequence testing at delta={delta}), {scope}"
    )


def _conditioning(feature: str, higher: bool, n_fit: int, n_tied: int) -> str:
    past = ">" if higher else "<"
    return (
        f"lambda2 fitted on the {n_fit} val_calib images the rule accepts: {feature} {past} lambda1, or equal "
        f"to it with |p - 1/2| > lambda1_tiebreak (strictly past; the image that sets lambda1 and "
        f"{max(n_tied - 1, 0)} other(s) with the same key are neither accepted nor fitted). Given lambda1 these "
        f"are i.i.d. with an accepted test image, so the guarantee holds conditionally on lambda1 (hence "
        f"marginally), ties in {feature} included"
    )


def fit_scrc_policy(
    p: np.ndarray,
    confidence: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float = 0.1,
    delta: float = 0.1,
    mode: ScrcMode = "crc",
    target_coverage: float = 0.9,
    bound: LttBound = "binomial",
    confidence_feature: str = "max_prob",
    grid_size: int = 1000,
) -> ScrcPolicy:
    """Fit lambda1 (selection) and lambda2 (FNR control) on val_calib; see the module docstring."""
    p = check_probabilities(p, "p (val_calib)")
    y = check_labels(labels, p.shape[0], "labels (val_calib)")
    c = feature_column({confidence_feature: confidence}, confidence_feature, p.shape[0])
    if confidence_feature not in CONFIDENCE_DIRECTION:
        raise ValueError(f"confidence_feature={confidence_feature!r}; valid: {sorted(CONFIDENCE_DIRECTION)}")
    if mode not in ("crc", "ltt"):
        raise ValueError(
            f"mode={mode!r}; valid: 'crc' (in expectation) or 'ltt' (with probability 1 - delta)"
        )
    if bound not in ("binomial", "hoeffding_bentkus"):
        raise ValueError(f"bound={bound!r}; valid: 'binomial' or 'hoeffding_bentkus'")
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0 or not 0.0 < target_coverage <= 1.0:
        raise ValueError(
            f"need 0 < alpha < 1, 0 < delta < 1, 0 < target_coverage <= 1; got alpha={alpha}, "
            f"delta={delta}, target_coverage={target_coverage}"
        )
    if p.size == 0:
        raise ValueError("val_calib is empty; SCRC needs calibration predictions")
    if mode == "ltt" and not (isinstance(grid_size, int | np.integer) and grid_size >= 1):
        raise ValueError(
            f"grid_size = {grid_size!r}: LTT tests lambda2 on linspace(0, 1, grid_size + 1); pass >= 1"
        )

    higher = CONFIDENCE_DIRECTION[confidence_feature] > 0
    tiebreak = np.abs(p - 0.5)
    lambda1, lambda1_tiebreak = selection_key(c, tiebreak, target_coverage, higher)
    past = past_key(c, tiebreak, higher, lambda1, lambda1_tiebreak)  # accepted = fitted on, see the docstring
    tied = (c == lambda1) & (tiebreak == lambda1_tiebreak)
    pos_scores = p[past & (y == 1)]
    if mode == "crc":
        lambda2, k = crc_threshold(pos_scores, alpha)
    else:
        lambda2, k = ltt_threshold(pos_scores, alpha, delta, bound, grid_size), None

    policy = ScrcPolicy(
        guarantee=_guarantee(mode, alpha, delta, bound, confidence_feature),
        conditioning=_conditioning(confidence_feature, higher, int(past.sum()), int(tied.sum())),
        mode=mode,
        bound=bound if mode == "ltt" else None,
        alpha=alpha,
        delta=delta if mode == "ltt" else None,
        target_coverage=target_coverage,
        confidence_feature=confidence_feature,
        higher_is_confident=higher,
        lambda1=lambda1,
        lambda1_tiebreak=lambda1_tiebreak,
        lambda2=lambda2,
        k=k,
        grid_size=grid_size if mode == "ltt" else None,
        n=int(p.size),
        n_accepted=int(past.sum()),
        n_fit=int(past.sum()),
        n_tied_at_lambda1=int(tied.sum()),
        n_pos_accepted=int(pos_scores.size),
        calib_fnr_accepted=float((pos_scores < lambda2).mean()) if pos_scores.size else None,
        calib_summary={},
    )
    summary = summarize_decisions(policy.decide(p, {confidence_feature: c}), y)
    return policy.model_copy(update={"calib_summary": summary})
