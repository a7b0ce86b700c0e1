"""SCRC guarantees by simulation, plus the edge cases of the CRC / LTT thresholds.

Scores come from a known distribution: p ~ Beta(4, 2) for roadwork, Beta(2, 4) for no_roadwork
(prevalence 1/2), confidence = max_prob = max(p, 1 - p). For a fitted (lambda1, lambda2) the TRUE
FNR among accepted roadwork images is computed exactly from the Beta CDF, so each draw costs one fit
and no test sampling; one test checks that formula against a large sampled test set.

Tolerances: CRC promises E[FNR] <= alpha, checked as mean over draws <= alpha + 3 standard errors.
LTT promises P(FNR > alpha) <= delta, checked as violation fraction <= delta + 3 binomial standard
errors sqrt(delta (1 - delta) / draws).

Adversarial small-m cases (issue 15): roadwork images confidently wrong (p ~ U[0, 0.2], so
max_prob ~ U[0.8, 1]) and no_roadwork images unsure (p ~ U[0.3, 0.7]). The few accepted positives are
the most confident ones, and the one that sets lambda1 has the largest p any accepted positive can
have; fitting lambda2 on it (the old selection) gave a mean FNR of 0.64 against alpha = 0.5 (CRC) and
violations in 0.106 of draws against delta = 0.07 (LTT). With 4000 draws the standard errors are
0.004 (CRC mean) and 0.004 (LTT violation rate), so the old selection and a k + 1 mutation (mean FNR
about 0.67) fail by tens of standard errors, not by a hair.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from roadwork_core.calibration.scrc import (
    crc_threshold,
    fit_scrc_policy,
    ltt_pvalues,
    ltt_threshold,
    selection_key,
)

POS_BETA, NEG_BETA = (4.0, 2.0), (2.0, 4.0)
DRAWS = 400


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = (rng.random(n) < 0.5).astype(np.int64)
    p = np.where(labels == 1, rng.beta(*POS_BETA, n), rng.beta(*NEG_BETA, n))
    return p, np.maximum(p, 1.0 - p), labels


def true_accepted_fnr(lambda1: float, lambda2: float) -> float:
    """P(p < lambda2 | roadwork, max(p, 1-p) >= lambda1) under Beta(4, 2)."""
    cdf = beta(*POS_BETA).cdf
    if lambda1 <= 0.5:  # everything accepted
        return float(cdf(lambda2))
    accepted = cdf(1.0 - lambda1) + 1.0 - cdf(lambda1)  # p <= 1 - lambda1 or p >= lambda1
    missed = cdf(min(lambda2, 1.0 - lambda1)) + max(0.0, cdf(lambda2) - cdf(lambda1))
    return float(missed / accepted)


def simulate(
    mode: str, alpha: float, n: int, target_coverage: float, seed: int, **kw
) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    risks, n_pos = np.empty(DRAWS), np.empty(DRAWS)
    for i in range(DRAWS):
        p, conf, labels = draw(rng, n)
        policy = fit_scrc_policy(
            p, conf, labels, alpha=alpha, mode=mode, target_coverage=target_coverage, **kw
        )
        risks[i] = true_accepted_fnr(policy.lambda1, policy.lambda2)
        n_pos[i] = policy.n_pos_accepted
    return risks, float(n_pos.mean())


ADV_DRAWS = 4000


def adversarial_draw(rng: np.random.Generator, n: int, prevalence: float):
    labels = (rng.random(n) < prevalence).astype(np.int64)
    p = np.where(labels == 1, rng.uniform(0.0, 0.2, n), rng.uniform(0.3, 0.7, n))
    return p, np.maximum(p, 1.0 - p), labels


def adversarial_true_fnr(lambda1: float, lambda2: float) -> float:
    """P(p < lambda2 | roadwork, max(p, 1-p) >= lambda1) for p ~ U[0, 0.2]: accepted iff p <= 1 - lambda1."""
    top = min(1.0 - lambda1, 0.2)  # accepted roadwork images have p in [0, top]
    return min(lambda2, top) / top


def simulate_adversarial(mode: str, n: int, target_coverage: float, prevalence: float, **kw):
    rng = np.random.default_rng(11)
    risks = np.empty(ADV_DRAWS)
    for i in range(ADV_DRAWS):
        policy = fit_scrc_policy(
            *adversarial_draw(rng, n, prevalence), mode=mode, target_coverage=target_coverage, **kw
        )
        risks[i] = adversarial_true_fnr(policy.lambda1, policy.lambda2)
    return risks


def test_adversarial_formula_matches_a_sampled_test_set():
    rng = np.random.default_rng(12)
    policy = fit_scrc_policy(*adversarial_draw(rng, 40, 0.5), alpha=0.3, target_coverage=0.3)
    p, conf, labels = adversarial_draw(rng, 400_000, 0.5)
    d = policy.decide(p, {"max_prob": conf})
    sampled = (d[(d != "defer") & (labels == 1)] == "no_roadwork").mean()
    exact = adversarial_true_fnr(policy.lambda1, policy.lambda2)
    assert abs(sampled - exact) < 0.01, f"exact FNR {exact} disagrees with the sampled {sampled}"


def test_crc_holds_at_small_m_when_the_selected_positives_are_adversarial():
    # The case: alpha = 0.5, n = 10, target coverage 0.3 -> 3 accepted, 2 fitted on.
    alpha = 0.5
    risks = simulate_adversarial("crc", 10, 0.3, 0.5, alpha=alpha)
    se = risks.std(ddof=1) / math.sqrt(ADV_DRAWS)
    assert risks.mean() <= alpha + 3 * se, (
        f"CRC at small m: mean FNR among accepted {risks.mean():.4f} > alpha {alpha} + 3 SE {3 * se:.4f} "
        "(lambda2 fitted on the image at lambda1, or k off by one?)"
    )
    assert risks.mean() > 0.2, f"CRC is vacuous here: mean FNR {risks.mean():.4f} (expected about 1/3)"


def test_ltt_holds_at_small_m_when_the_selected_positives_are_adversarial():
    # 14 images, prevalence 0.7, coverage 0.5 -> 7 accepted, 6 fitted on; delta = 0.07 separates
    # "0 misses out of 6" (certified: Bin(6, .5) <= 0 has p = 0.016) from "1 out of 7" (p = 0.0625,
    # certified only when the image at lambda1 counts as a 7th positive that is never missed).
    alpha, delta = 0.5, 0.07
    risks = simulate_adversarial("ltt", 14, 0.5, 0.7, alpha=alpha, delta=delta)
    violated = (risks > alpha).mean()
    tol = 3 * math.sqrt(delta * (1 - delta) / ADV_DRAWS)
    assert violated <= delta + tol, (
        f"LTT at small m: FNR > alpha in {violated:.4f} of draws > delta + {tol:.4f}"
    )
    assert risks.mean() > 0.05, f"LTT is vacuous here: mean FNR {risks.mean():.4f}"


def test_lambda2_is_fitted_strictly_past_lambda1_and_the_json_says_so():
    conf = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55])
    p = 1.0 - conf  # all roadwork, all confidently wrong
    labels = np.ones(8, dtype=np.int64)
    policy = fit_scrc_policy(p, conf, labels, alpha=0.5, target_coverage=0.5)  # m = 4: lambda1 = 0.8
    assert policy.lambda1 == 0.8 and policy.n_accepted == 4, policy
    assert (policy.n_fit, policy.n_tied_at_lambda1, policy.n_pos_accepted) == (4, 1, 4), policy
    # k = floor(0.5 * 5) = 2 of the four accepted scores 0.01, 0.05, 0.1, 0.15 (the 0.2 at lambda1 is out)
    assert (policy.k, policy.lambda2) == (2, p[1]), policy
    assert "strictly past" in policy.conditioning and "conditionally on lambda1" in policy.conditioning
    assert "4 val_calib images" in policy.conditioning, policy.conditioning
    decided = policy.decide(p, {"max_prob": conf})
    assert (decided != "defer").sum() == policy.n_accepted == policy.n_fit, "accepted = fitted on"


def test_true_fnr_formula_matches_a_sampled_test_set():
    rng = np.random.default_rng(0)
    policy = fit_scrc_policy(*draw(rng, 300), alpha=0.1, target_coverage=0.7)
    p, conf, labels = draw(rng, 400_000)
    d = policy.decide(p, {"max_prob": conf})
    accepted_pos = (d != "defer") & (labels == 1)
    sampled = (d[accepted_pos] == "no_roadwork").mean()
    exact = true_accepted_fnr(policy.lambda1, policy.lambda2)
    assert abs(sampled - exact) < 0.005, f"exact FNR {exact} disagrees with the sampled {sampled}"


@pytest.mark.parametrize(("alpha", "n", "target_coverage"), [(0.1, 300, 0.8), (0.2, 150, 0.6)])
def test_crc_holds_in_expectation(alpha, n, target_coverage):
    risks, mean_n_pos = simulate("crc", alpha, n, target_coverage, seed=1)
    se = risks.std(ddof=1) / math.sqrt(DRAWS)
    assert risks.mean() <= alpha + 3 * se, (
        f"CRC: mean FNR {risks.mean():.4f} > alpha {alpha} + 3 SE {3 * se:.4f}"
    )
    # CRC is also tight: E[FNR] >= alpha - 2/(n+ + 1) for continuous scores; not a vacuous rule.
    floor = alpha - 2.0 / (mean_n_pos + 1.0) - 3 * se
    assert risks.mean() >= floor, f"CRC is needlessly conservative: mean FNR {risks.mean():.4f} < {floor:.4f}"


@pytest.mark.parametrize("bound", ["binomial", "hoeffding_bentkus"])
def test_ltt_holds_with_probability_one_minus_delta(bound):
    alpha, delta = 0.1, 0.1
    risks, _ = simulate("ltt", alpha, 300, 0.8, seed=2, delta=delta, bound=bound)
    violated = (risks > alpha).mean()
    tol = 3 * math.sqrt(delta * (1 - delta) / DRAWS)
    assert violated <= delta + tol, (
        f"LTT ({bound}): FNR > alpha in {violated:.3f} of draws, > delta + {tol:.3f}"
    )
    assert np.median(risks) > alpha / 4, f"LTT ({bound}) is vacuous: median FNR {np.median(risks):.4f}"


# -------------------------------------------------------------------------------------------------
# Edge cases


def test_k_zero_flags_every_accepted_image_roadwork():
    # 5 roadwork images, alpha = 0.1: k = floor(0.1 * 6) = 0 -> no threshold qualifies.
    p = np.array([0.9, 0.2, 0.55, 0.3, 0.8, 0.1, 0.05, 0.4])
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    policy = fit_scrc_policy(p, np.maximum(p, 1 - p), labels, alpha=0.1, target_coverage=1.0)
    assert policy.k == 0 and policy.lambda2 == 0.0, (
        f"k = 0 must flag everything: k={policy.k} l2={policy.lambda2}"
    )
    d = policy.decide(p, {"max_prob": np.maximum(p, 1 - p)})
    assert (d == "roadwork").all(), f"every accepted image must be roadwork when k = 0: {d}"
    assert policy.calib_fnr_accepted == 0.0
    ltt = fit_scrc_policy(p, np.maximum(p, 1 - p), labels, alpha=0.1, mode="ltt", target_coverage=1.0)
    assert ltt.lambda2 == 0.0, "LTT with 5 positives cannot certify any threshold: flag everything"


def test_crc_rank_is_never_clamped():
    s = np.linspace(0.05, 0.95, 19)  # n+ = 19
    assert crc_threshold(s, 0.1) == (s[1], 2), "k = floor(0.1 * 20) = 2 -> second smallest score"
    assert crc_threshold(s, 0.96) == (s[18], 19), "k = floor(0.96 * 20) = 19 = n+: the largest score"
    assert crc_threshold(s, 0.04) == (0.0, 0), "k = floor(0.04 * 20) = 0: flag everything"
    assert crc_threshold(np.array([]), 0.5) == (0.0, 0), "no accepted positives: flag everything"


def test_crc_with_tied_scores_is_the_sup_of_the_crc_condition():
    rng = np.random.default_rng(5)
    for alpha in (0.05, 0.1, 0.2, 0.3):
        for _ in range(50):
            n_pos = int(rng.integers(1, 40))
            s = rng.integers(0, 6, n_pos) / 5.0  # heavy ties on {0, .2, ..., 1}
            lam, k = crc_threshold(s, alpha)
            # brute force: largest candidate lambda with (#{s < lambda} + 1) / (n+ + 1) <= alpha
            cand = np.concatenate([[0.0], np.unique(s)])
            ok = [(s < c).sum() + 1 <= alpha * (n_pos + 1) for c in cand]
            expected = cand[np.flatnonzero(ok)].max() if any(ok) else 0.0
            assert lam == expected, f"alpha={alpha} s={s}: lambda2 {lam} != brute-force {expected}"
            assert (s < lam).mean() <= alpha, f"empirical FNR above alpha with ties: s={s} lambda2={lam}"
            assert k == math.floor(alpha * (n_pos + 1)), f"k must be floor(alpha (n+ + 1)), got {k}"


def test_tied_score_at_lambda2_is_roadwork():
    p = np.array([0.3, 0.3, 0.3, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95, 0.1])
    labels = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    conf = np.linspace(1.0, 0.6, 10)  # the no_roadwork image sets lambda1 and is left out of the fit
    policy = fit_scrc_policy(p, conf, labels, alpha=0.3, target_coverage=1.0)  # k = floor(3) = 3
    assert (policy.k, policy.lambda2) == (3, 0.3), policy
    d = policy.decide(p, {"max_prob": conf})
    assert (d[:4] == "roadwork").all(), f"scores tied at lambda2 must be roadwork (p >= lambda2): {d}"


def test_ltt_fixed_sequence_and_pvalues():
    rng = np.random.default_rng(7)
    s = rng.beta(*POS_BETA, 200)
    lam = ltt_threshold(s, 0.1, 0.1, "binomial", 1000)
    grid = np.linspace(0, 1, 1001)
    pv = ltt_pvalues(np.searchsorted(np.sort(s), grid, side="left"), s.size, 0.1, "binomial")
    j = int(np.argmin(pv <= 0.1))
    assert lam == grid[j - 1] and (pv[:j] <= 0.1).all(), "lambda2 must be the last of the rejected prefix"
    assert (s < lam).mean() < 0.1, "the certified threshold has empirical FNR below alpha"
    hb = ltt_pvalues(np.array([0, 10, 20, 40]), 200, 0.1, "hoeffding_bentkus")
    assert np.all(np.diff(hb) >= 0) and hb[0] < 1e-6 and hb[-1] == 1.0, (
        f"HB p-values: 0 errors -> ~0, 20% -> 1: {hb}"
    )


def test_selection_is_symmetric_label_free_and_hits_the_coverage():
    rng = np.random.default_rng(8)
    p, conf, labels = draw(rng, 500)
    a = fit_scrc_policy(p, conf, labels, target_coverage=0.85)
    perm = rng.permutation(500)
    b = fit_scrc_policy(p[perm], conf[perm], labels[perm], target_coverage=0.85)
    assert (a.lambda1, a.lambda2) == (b.lambda1, b.lambda2), "thresholds must not depend on row order"
    shuffled = fit_scrc_policy(p, conf, rng.permutation(labels), target_coverage=0.85)
    assert shuffled.lambda1 == a.lambda1, "lambda1 must ignore labels"
    assert selection_key(conf, np.abs(p - 0.5), 0.85) == (a.lambda1, a.lambda1_tiebreak)
    assert a.n_accepted == math.ceil(0.85 * 500), (
        f"accepted {a.n_accepted}, expected ceil(0.85 n) with no ties"
    )
    lower = fit_scrc_policy(p, -conf, labels, target_coverage=0.85, confidence_feature="entropy")
    assert lower.n_accepted == a.n_accepted and not lower.higher_is_confident, (
        "entropy: lower = more confident"
    )


def test_json_states_the_guarantee_precisely():
    rng = np.random.default_rng(9)
    p, conf, labels = draw(rng, 300)
    crc = fit_scrc_policy(p, conf, labels, alpha=0.05, mode="crc")
    ltt = fit_scrc_policy(p, conf, labels, alpha=0.05, delta=0.2, mode="ltt", bound="hoeffding_bentkus")
    assert "ACCEPTED" in crc.guarantee and "E[FNR] <= 0.05" in crc.guarantee, crc.guarantee
    assert "P(FNR <= 0.05) >= 0.8" in ltt.guarantee and "hoeffding_bentkus" in ltt.guarantee, ltt.guarantee
    assert (crc.delta, crc.bound, ltt.delta, ltt.bound) == (None, None, 0.2, "hoeffding_bentkus")
    for pol in (crc, ltt):
        assert pol.n == 300 and pol.n_pos_accepted > 0 and pol.confidence_feature == "max_prob", pol
    with pytest.raises(ValueError, match="alpha"):
        fit_scrc_policy(p, conf, labels, alpha=1.5)
    with pytest.raises(ValueError, match="mode"):
        fit_scrc_policy(p, conf, labels, mode="split")


def test_a_policy_written_before_the_strict_fit_still_loads_and_decides_the_same():
    """Bundles released before lambda2 was fitted strictly past lambda1 have no conditioning fields."""
    import json

    from roadwork_core.calibration.policy import policy_from_json, policy_to_json

    rng = np.random.default_rng(3)
    p, conf, labels = draw(rng, 200)
    new = fit_scrc_policy(p, conf, labels, alpha=0.1)
    old_json = json.loads(policy_to_json(new))
    for key in ("conditioning", "n_fit", "n_tied_at_lambda1"):
        del old_json[key]
    old = policy_from_json(json.dumps(old_json))
    assert (old.conditioning, old.n_fit, old.n_tied_at_lambda1) == (None, None, None)
    features = {"max_prob": conf}
    assert (old.decide(p, features) == new.decide(p, features)).all()


def test_crc_holds_when_the_confidence_score_is_discrete():
    """view_disagreement is k / V: here 30 % of images sit at one value, exactly where lambda1 falls. An
    earlier rule accepted confidence <= lambda1 but fitted lambda2 on the images strictly past it: 159 of
    500 tied images were accepted without being fitted on, and the realized FNR was 0.37 against 0.1."""
    rng = np.random.default_rng(0)

    def hard_draw(n: int):
        y = (rng.random(n) < 0.5).astype(np.int64)
        hard = rng.random(n) < 0.3
        p = np.where(
            y == 1, np.where(hard, rng.uniform(0, 0.5, n), rng.uniform(0.5, 1, n)), rng.uniform(0, 0.3, n)
        )
        return p, np.where(hard, 0.25, 0.0), y

    risks, coverage = [], []
    for _ in range(150):
        policy = fit_scrc_policy(
            *hard_draw(300), alpha=0.1, target_coverage=0.9, confidence_feature="view_disagreement"
        )
        p, c, y = hard_draw(4000)
        decided = policy.decide(p, {"view_disagreement": c})
        accepted_pos = (y == 1) & (decided != "defer")
        risks.append(float((decided[accepted_pos] == "no_roadwork").mean()))
        coverage.append(float((decided != "defer").mean()))
    mean, se = np.mean(risks), np.std(risks) / np.sqrt(len(risks))
    assert mean <= 0.1 + 3 * se, f"mean FNR among accepted {mean:.3f} > alpha 0.1 (+3 se {se:.3f})"
    assert abs(np.mean(coverage) - 0.9) < 0.02, np.mean(coverage)  # the tie-break keeps the coverage


def test_a_saturated_confidence_still_selects_and_does_not_flag_everything():
    """max_prob in float32 is exactly 1.0 for |logit| > ~17: a confident classifier puts most of val_calib
    at one value. The tie-break on |p - 1/2| still accepts 90 %, and lambda2 is fitted on them; before,
    lambda1 = 1.0 left nothing to fit on, lambda2 = 0 flagged every image roadwork (FPR 0.98)."""
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(np.int64)
    z = np.where(y == 1, rng.normal(25, 4, 400), rng.normal(-25, 4, 400))
    p32 = 1.0 / (1.0 + np.exp(-z.astype(np.float32)))
    max_prob = np.maximum(p32, 1.0 - p32).astype(np.float64)
    assert (max_prob == 1.0).mean() > 0.9, "the case needs a saturated score"
    policy = fit_scrc_policy(1.0 / (1.0 + np.exp(-z / 3.0)), max_prob, y, alpha=0.05, target_coverage=0.9)
    summary = policy.calib_summary
    assert policy.n_fit == policy.n_accepted == 360, policy
    assert summary["coverage"] == 0.9 and summary["fpr"] < 0.05, summary


def test_a_policy_saved_before_the_tiebreak_keeps_its_rule():
    import json

    from roadwork_core.calibration.policy import policy_from_json, policy_to_json

    conf = np.array([0.9, 0.8, 0.8, 0.8, 0.7, 0.6])
    p = np.array([0.9, 0.8, 0.75, 0.2, 0.7, 0.4])
    old_json = json.loads(
        policy_to_json(fit_scrc_policy(p, conf, np.array([1, 1, 1, 0, 1, 0]), target_coverage=0.5))
    )
    assert (old_json["lambda1"], old_json["lambda1_tiebreak"]) == (0.8, 0.25)  # 3rd most confident key
    assert (
        fit_scrc_policy(p, conf, np.array([1, 1, 1, 0, 1, 0]), target_coverage=0.5).decide(
            p, {"max_prob": conf}
        )
        != "defer"
    ).sum() == 3
    del old_json["lambda1_tiebreak"]
    old = policy_from_json(json.dumps(old_json))
    assert old.lambda1_tiebreak is None
    assert (old.decide(p, {"max_prob": conf}) != "defer").sum() == 4, (
        "a saved policy accepts confidence >= lambda1"
    )


def test_a_saturated_calibrated_p_leaves_the_tied_images_deferred_and_says_why():
    """A step calibrator (isotonic) maps every very confident logit to p = 0 or 1: with max_prob saturated
    too nothing breaks the tie at lambda1. The tied block is deferred (the guarantee holds on what is
    accepted) and `tie_warning` names the cause and the fix."""
    from roadwork_core.calibration.scrc import tie_warning

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(np.int64)
    p = np.where(y == 1, 1.0, 0.0)
    p[:20] = 0.5  # a few unsure images
    conf = np.maximum(p, 1 - p)
    policy = fit_scrc_policy(p, conf, y, alpha=0.05, target_coverage=0.9)
    assert policy.n_accepted < 0.9 * 400 and policy.n_tied_at_lambda1 > 300, policy
    message = tie_warning(policy)
    assert message and "calibrator.methods" in message and "saturated" in message, message
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.5).astype(np.int64)
    p = np.where(y == 1, rng.beta(4, 2, 400), rng.beta(2, 4, 400))
    assert tie_warning(fit_scrc_policy(p, np.maximum(p, 1 - p), y)) is None, (
        "a continuous score warns nothing"
    )
