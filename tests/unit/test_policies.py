"""The threshold and gate policies, decision summaries, and JSON dispatch of every policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import expit

from roadwork_core.calibration import (
    DECISIONS,
    GatePolicy,
    ScrcPolicy,
    fit_gate_policy,
    fit_scrc_policy,
    fit_threshold_policy,
    policy_from_json,
    policy_to_json,
    registered_policies,
    summarize_decisions,
)
from roadwork_core.contracts.labels import hard_label
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES


def make_predictions(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """A predictions table like the contract's: p, the uncertainty features and labels."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    image_logit = np.where(labels == 1, 1.5, -1.5) + rng.normal(0.0, 1.6, n)
    view_logits = image_logit[:, None] + rng.normal(0.0, 0.8, (n, 5))  # (N, V) global first, then tiles
    view_probs = expit(view_logits)
    p = view_probs.mean(axis=1)
    hard = hard_label(p)
    features = {
        "max_prob": np.maximum(p, 1.0 - p),
        "entropy": -(p * np.log(p) + (1.0 - p) * np.log1p(-p)),
        "margin": np.abs(2.0 * p - 1.0),
        "view_var": view_probs.var(axis=1),
        "view_disagreement": (hard_label(view_probs) != hard[:, None]).mean(axis=1),
        "global_tile_disagreement": np.abs(view_probs[:, 0] - view_probs[:, 1:].mean(axis=1)),
    }
    assert set(features) == set(UNCERTAINTY_FEATURES), "test helper must produce every contract feature"
    return p, features, labels


def _coverage(p: np.ndarray, t_neg: float, t_pos: float) -> float:
    return float(((p >= t_pos) | (p < t_neg)).mean())


# -------------------------------------------------------------------------------------------------
# summarize_decisions


def test_summary_counts_deferred_positives_as_not_false_negatives():
    decisions = np.array(["roadwork", "no_roadwork", "defer", "roadwork", "no_roadwork", "defer"])
    labels = np.array([1, 1, 1, 0, 0, 0])
    s = summarize_decisions(decisions, labels)
    assert s == {
        "coverage": 4 / 6,
        "fnr": 1 / 3,  # one of three roadwork images said no_roadwork; the deferred one is not an FN
        "fpr": 1 / 3,
        "selective_accuracy": 2 / 4,
        "n": 6,
        "n_pos": 3,
        "n_neg": 3,
    }, s
    empty = summarize_decisions(np.array(["defer", "defer"]), np.array([1, 1]))
    assert empty["fpr"] is None and empty["selective_accuracy"] is None, (
        f"undefined rates must be None: {empty}"
    )
    with pytest.raises(ValueError, match=r"decisions\[1\] = 'maybe'"):
        summarize_decisions(np.array(["roadwork", "maybe"]), np.array([1, 0]))


# -------------------------------------------------------------------------------------------------
# policy "threshold"


def test_threshold_policy_meets_targets_and_maximizes_coverage_against_brute_force():
    p, _, labels = make_predictions(60, seed=3)
    policy = fit_threshold_policy(p, labels, target_fnr=0.05, target_fpr=0.1)
    s = policy.calib_summary
    assert policy.t_neg <= policy.t_pos, policy
    assert s["fnr"] <= 0.05 and s["fpr"] <= 0.1, f"targets missed on val_calib: {s}"
    assert s == summarize_decisions(policy.decide(p), labels), (
        "calib_summary must match decide() on val_calib"
    )

    cand = np.concatenate([[0.0], np.unique(p), [1.5]])  # 1.5: "never roadwork"
    best = 0.0
    for t_neg, t_pos in itertools.product(cand, cand):
        if t_neg <= t_pos:
            fnr = ((p < t_neg) & (labels == 1)).sum() / (labels == 1).sum()
            fpr = ((p >= t_pos) & (labels == 0)).sum() / (labels == 0).sum()
            if fnr <= 0.05 and fpr <= 0.1:
                best = max(best, _coverage(p, t_neg, t_pos))
    assert s["coverage"] == pytest.approx(best), f"coverage {s['coverage']} is not the best feasible {best}"
    assert policy.guarantee.startswith("none (empirical on val_calib)"), policy.guarantee


def test_threshold_policy_without_fpr_target_defers_nothing():
    p, _, labels = make_predictions(300, seed=4)
    policy = fit_threshold_policy(p, labels, target_fnr=0.02)
    assert policy.t_neg == policy.t_pos, "without an FPR target the coverage-optimal policy has one threshold"
    assert policy.calib_summary["coverage"] == 1.0 and policy.calib_summary["fnr"] <= 0.02, (
        policy.calib_summary
    )


def test_threshold_policy_rejects_logits_and_missing_positives():
    with pytest.raises(ValueError, match=r"p \(val_calib\)\[0\] = 2.0"):
        fit_threshold_policy(np.array([2.0, 0.5]), np.array([1, 0]))
    with pytest.raises(ValueError, match="no roadwork images"):
        fit_threshold_policy(np.array([0.2, 0.5]), np.array([0, 0]))


# -------------------------------------------------------------------------------------------------
# policy "gate"


@pytest.fixture(scope="module")
def gate_data():
    select = make_predictions(600, seed=10)
    calib = make_predictions(600, seed=11)
    return select, calib


def test_gate_meets_targets_on_calib_and_defers_the_uncertain(gate_data):
    (sp, sf, sy), (cp, cf, cy) = gate_data
    gate = fit_gate_policy(sp, sf, sy, cp, cf, cy, target_fnr=0.02, target_fpr=0.1)
    s = gate.calib_summary
    assert s["fnr"] <= 0.02 and s["fpr"] <= 0.1, f"gate targets missed on val_calib: {s}"
    assert 0.2 < s["coverage"] < 1.0, f"gate should defer some but not all images: {s}"
    d = gate.decide(cp, cf)
    accepted = d != "defer"
    label = np.where(cp >= gate.decision_threshold, "roadwork", "no_roadwork")
    np.testing.assert_array_equal(d[accepted], label[accepted], err_msg="accepted images must keep the label")
    assert cf["margin"][~accepted].mean() < cf["margin"][accepted].mean(), (
        "the gate should defer low-margin images"
    )
    assert gate.select_failure_rate > 0 and "logistic regression" in gate.fit_note, gate.fit_note


def test_gate_youden_threshold_and_no_failure_fallback(gate_data):
    (sp, sf, sy), (cp, cf, cy) = gate_data
    gate = fit_gate_policy(sp, sf, sy, cp, cf, cy, decision_threshold=None)
    assert 0.0 < gate.decision_threshold < 1.0, gate.decision_threshold
    perfect = hard_label(sp).astype(np.int64)  # labels the classifier never gets wrong
    fallback = fit_gate_policy(sp, sf, perfect, cp, cf, cy, target_fnr=0.05)
    assert "0/" in fallback.fit_note and fallback.calib_summary["fnr"] <= 0.05, fallback.fit_note


def test_gate_missing_feature_names_it(gate_data):
    (sp, sf, sy), (cp, cf, cy) = gate_data
    gate = fit_gate_policy(sp, sf, sy, cp, cf, cy)
    partial = {k: v for k, v in cf.items() if k != "view_var"}
    with pytest.raises(KeyError, match="view_var"):
        gate.decide(cp, partial)


# -------------------------------------------------------------------------------------------------
# every policy: JSON round trip, dispatch, decision vocabulary


@pytest.fixture(scope="module")
def all_policies(gate_data):
    (sp, sf, sy), (cp, cf, cy) = gate_data
    return [
        fit_threshold_policy(cp, cy, target_fnr=0.05, target_fpr=0.2),
        fit_threshold_policy(cp, cy),
        fit_gate_policy(sp, sf, sy, cp, cf, cy, target_fnr=0.02),
        fit_scrc_policy(cp, cf["max_prob"], cy, alpha=0.05, mode="crc"),
        fit_scrc_policy(cp, cf["entropy"], cy, mode="ltt", confidence_feature="entropy"),
        fit_scrc_policy(
            cp, cf["margin"], cy, mode="ltt", bound="hoeffding_bentkus", confidence_feature="margin"
        ),
    ]


def test_every_policy_round_trips_with_identical_decisions(all_policies, gate_data):
    _, (cp, cf, _) = gate_data
    test_p, test_f, _ = make_predictions(400, seed=12)
    assert set(registered_policies()) == {"threshold", "gate", "scrc"}, registered_policies()
    for policy in all_policies:
        text = policy_to_json(policy)
        again = policy_from_json(text)
        assert type(again) is type(policy) and again == policy, f"{policy.policy}: round trip changed it"
        assert policy_to_json(again) == text, f"{policy.policy}: JSON not stable"
        for p, f in ((cp, cf), (test_p, test_f)):
            np.testing.assert_array_equal(again.decide(p, f), policy.decide(p, f), err_msg=policy.policy)


def test_policy_json_written_as_softmax_reads_as_the_threshold_policy():
    """ "softmax" is the threshold policy's old name: its policy.json still loads, as "threshold"."""
    import json

    from roadwork_core.calibration.policy import policy_name
    from roadwork_core.calibration.threshold import ThresholdPolicy

    p, _, labels = make_predictions(400, seed=14)
    policy = fit_threshold_policy(p, labels, target_fnr=0.1, target_fpr=0.2)
    old = json.dumps({**json.loads(policy_to_json(policy)), "policy": "softmax"})
    again = policy_from_json(old)
    assert type(again) is ThresholdPolicy and again == policy and again.policy == "threshold"
    assert [policy_name(n) for n in ("softmax", "threshold", "gate", "scrc")] == [
        "threshold",
        "threshold",
        "gate",
        "scrc",
    ]


def test_decide_outputs_only_the_three_decisions(all_policies):
    p, f, _ = make_predictions(500, seed=13)
    p = np.concatenate([p, [0.0, 1.0, 0.5]])
    f = {
        k: np.concatenate([v, [1.0, 1.0, 0.0] if k in ("max_prob", "margin") else [0.0, 0.0, 0.7]])
        for k, v in f.items()
    }
    for policy in all_policies:
        d = policy.decide(p, f)
        assert d.shape == p.shape, f"{policy.policy}: one decision per image"
        assert set(np.unique(d)) <= set(DECISIONS), f"{policy.policy}: unexpected decisions {np.unique(d)}"


def test_policy_from_json_errors_are_clear(all_policies):
    with pytest.raises(ValueError, match="not valid JSON"):
        policy_from_json("{policy: softmax")
    with pytest.raises(ValueError, match=r"unknown policy 'magic'.*'gate'"):
        policy_from_json('{"policy": "magic"}')
    with pytest.raises(ValueError, match="'policy' field"):
        policy_from_json("[1, 2]")
    with pytest.raises(ValueError, match="does not match its schema"):
        policy_from_json('{"policy": "scrc", "alpha": 0.1}')
    scrc = next(p for p in all_policies if isinstance(p, ScrcPolicy))
    bad = policy_to_json(scrc).replace('"policy": "scrc"', '"policy": "gate"')
    with pytest.raises(ValueError, match="policy 'gate'"):
        policy_from_json(bad)
    assert isinstance(policy_from_json(policy_to_json(all_policies[2])), GatePolicy)
