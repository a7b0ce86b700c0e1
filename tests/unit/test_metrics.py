"""Metrics against sklearn references, the AUGRC closed form, bootstrap CIs, slices and plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from roadwork_core.calibration import expected_calibration_error
from roadwork_core.contracts.labels import hard_label
from roadwork_core.metrics import (
    METRIC_NAMES,
    augrc,
    augrc_optimal,
    aurc,
    bootstrap_ci,
    classification_metrics,
    metadata_columns,
    reliability_diagram,
    reward_proxy,
    risk_coverage_curve,
    risk_coverage_plot,
    robustness_plot,
    save_png,
    selective_summary,
    slice_bars,
    slice_metrics,
)


def _scores(n: int, seed: int = 0, separation: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + separation * (2 * y - 1))))
    return p, y


# ---------------------------------------------------------------- classification


def test_classification_metrics_match_sklearn():
    p, y = _scores(400, seed=1)
    m = classification_metrics(p, y)
    hard = hard_label(p).astype(int)
    refs = {
        "accuracy": skm.accuracy_score(y, hard),
        "mcc": skm.matthews_corrcoef(y, hard),
        "f1": skm.f1_score(y, hard),
        "auroc": skm.roc_auc_score(y, p),
        "auprc": skm.average_precision_score(y, p),
        "brier": skm.brier_score_loss(y, p),
        "nll": skm.log_loss(y, p),
    }
    for name, ref in refs.items():
        assert m[name] == pytest.approx(ref, abs=1e-5), f"{name}: ours {m[name]} vs sklearn {ref}"
    assert m["n"] == 400 and m["positive_rate"] == pytest.approx(y.mean())
    assert set(m) == set(METRIC_NAMES), f"unexpected keys {set(m) ^ set(METRIC_NAMES)}"


def test_classification_metrics_threshold_is_used():
    p = np.array([0.1, 0.4, 0.6, 0.9])
    y = np.array([0, 1, 1, 1])
    assert classification_metrics(p, y, threshold=0.5)["accuracy"] == pytest.approx(0.75)
    assert classification_metrics(p, y, threshold=0.3)["accuracy"] == pytest.approx(1.0)


def _hand_binned(score: np.ndarray, outcome: np.ndarray) -> tuple[float, float]:
    """(ECE, MCE): |mean score - mean outcome| per 15 equal-width bins [k/15, (k+1)/15)."""
    bins = np.clip(np.floor(score * 15).astype(int), 0, 14)
    gaps, weights = [], []
    for b in range(15):
        sel = bins == b
        if sel.any():
            gaps.append(abs(score[sel].mean() - outcome[sel].mean()))
            weights.append(sel.mean())
    return float(np.dot(gaps, weights)), max(gaps)


def test_ece_and_mce_are_top_label_confidence_against_correctness():
    p, y = _scores(600, seed=2, separation=0.7)
    m = classification_metrics(p, y)
    top_ece, top_mce = _hand_binned(np.maximum(p, 1.0 - p), (hard_label(p) == y).astype(float))
    p_ece, _ = _hand_binned(p, y.astype(float))  # p against the label: what the docs do NOT mean
    assert abs(top_ece - p_ece) > 0.01, f"test data must tell the two ECEs apart: {top_ece} vs {p_ece}"
    assert m["ece"] == pytest.approx(top_ece, abs=1e-4), f"ECE {m['ece']} != top-label reference {top_ece}"
    assert m["mce"] == pytest.approx(top_mce, abs=1e-4), "MCE differs from the largest top-label bin gap"
    assert expected_calibration_error(p, y) == pytest.approx(m["ece"], abs=1e-6), (
        "the calibrator's ECE and the report's ECE must be one number"
    )
    assert 0.0 <= m["ace"] <= 1.0, f"ACE {m['ace']} outside [0, 1]"


def test_reward_proxy_is_the_network_formula():
    assert reward_proxy(0.6, 0.8) == pytest.approx(0.7**3)
    assert reward_proxy(1.0, 1.0) == 1.0
    p, y = _scores(300, seed=3)
    m = classification_metrics(p, y)
    hard = hard_label(p).astype(int)
    expected = (0.5 * skm.matthews_corrcoef(y, hard) + 0.5 * skm.accuracy_score(y, hard)) ** 3
    assert m["reward_proxy"] == pytest.approx(expected, abs=1e-5)


def test_mcc_of_one_predicted_class_is_zero_as_sklearn_and_the_validator_say():
    """torchmetrics gives +0.28 to 'everything is roadwork' on 7 positives of 10 (and -0.28 at 3 of 10): a
    constant model then looked better than chance in the report and could win the best-epoch choice."""
    import torch

    from roadwork_core.training.supervised import select_mcc

    y = np.array([1] * 7 + [0] * 3)
    for p in (np.full(10, 0.9), np.full(10, 0.1)):
        hard = hard_label(p).astype(int)
        assert skm.matthews_corrcoef(y, hard) == 0.0
        assert classification_metrics(p, y)["mcc"] == 0.0, p
        assert classification_metrics(p, 1 - y)["mcc"] == 0.0, p
        assert select_mcc(torch.from_numpy(p).float(), torch.from_numpy(y)) == 0.0, p
    ci = bootstrap_ci(classification_metrics, np.full(40, 0.9), np.tile(y, 4), n_resamples=50)
    assert ci["mcc"]["low"] == ci["mcc"]["high"] == 0.0, ci["mcc"]
    ones = torch.ones(10, dtype=torch.long)  # one label class: undefined, never the best epoch
    assert select_mcc(torch.full((10,), 0.9), ones) == select_mcc(torch.full((10,), 0.1), 1 - ones) == -1.0
    p, y = _scores(200, seed=5)  # both classes predicted: the library's value, sklearn's number
    expected = skm.matthews_corrcoef(y, hard_label(p).astype(int))
    assert select_mcc(torch.from_numpy(p).float(), torch.from_numpy(y)) == pytest.approx(expected, abs=1e-5)


def test_reward_proxy_clips_mcc_at_zero_as_the_validator_does():
    assert reward_proxy(-0.4, 0.3) == pytest.approx((0.5 * 0.3) ** 3)
    p, y = _scores(300, seed=3)
    m = classification_metrics(1.0 - p, y)  # an anti-correlated model
    assert m["mcc"] < 0 and m["reward_proxy"] == pytest.approx((0.5 * m["accuracy"]) ** 3, abs=1e-6)


def test_degenerate_inputs_give_nan_not_errors():
    empty = classification_metrics(np.array([]), np.array([]))
    assert empty["n"] == 0
    assert all(math.isnan(empty[k]) for k in METRIC_NAMES if k != "n"), f"empty input: {empty}"

    only_pos = classification_metrics(np.array([0.2, 0.7, 0.9]), np.array([1, 1, 1]))
    assert (
        math.isnan(only_pos["auroc"]) and math.isnan(only_pos["mcc"]) and math.isnan(only_pos["reward_proxy"])
    )
    assert only_pos["accuracy"] == pytest.approx(2 / 3) and only_pos["auprc"] == pytest.approx(1.0)

    only_neg = classification_metrics(np.array([0.2, 0.3]), np.array([0, 0]))
    assert math.isnan(only_neg["auroc"]) and math.isnan(only_neg["auprc"]) and math.isnan(only_neg["f1"])
    assert only_neg["accuracy"] == 1.0

    assert math.isnan(augrc(np.array([]), np.array([], dtype=bool)))
    assert math.isnan(aurc(np.array([]), np.array([], dtype=bool)))
    s = selective_summary(np.array(["defer", "defer"]), np.array([0, 0]))
    assert s["coverage"] == 0.0 and math.isnan(s["fnr"]) and math.isnan(s["selective_accuracy"])


def test_bad_inputs_name_the_row():
    with pytest.raises(ValueError, match=r"p\[1\] = 1\.5"):
        classification_metrics(np.array([0.1, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels\[0\] = 2"):
        classification_metrics(np.array([0.1, 0.5]), np.array([2, 1]))
    with pytest.raises(ValueError, match=r"decisions\[1\] = 'maybe'"):
        selective_summary(np.array(["roadwork", "maybe"]), np.array([1, 0]))


# ---------------------------------------------------------------- selective


@pytest.mark.parametrize("round_to", [None, 1])
def test_augrc_matches_closed_form(round_to):
    rng = np.random.default_rng(7)
    n = 20_000
    correct = rng.random(n) > 0.15
    confidence = rng.normal(size=n) + 1.2 * correct
    if round_to is not None:  # heavy ties: AUROC and AUGRC both count ties as 1/2
        confidence = np.round(confidence, round_to)
    pi = 1.0 - correct.mean()
    auroc_f = skm.roc_auc_score(correct, confidence)
    closed = 0.5 * pi**2 + pi * (1 - pi) * (1 - auroc_f)
    assert augrc(confidence, correct) == pytest.approx(closed, abs=1e-6), f"AUROC_f={auroc_f:.4f}, π={pi:.4f}"


def test_augrc_perfect_and_worst_ranking():
    correct = np.r_[np.ones(850, bool), np.zeros(150, bool)]
    pi = 0.15
    perfect = np.r_[np.linspace(1, 2, 850), np.linspace(0, 0.5, 150)]
    assert augrc(perfect, correct) == pytest.approx(0.5 * pi**2, abs=1e-12)
    assert augrc_optimal(pi) == pytest.approx(0.5 * pi**2)
    assert augrc(-perfect, correct) == pytest.approx(0.5 * pi**2 + pi * (1 - pi), abs=1e-12)
    # a constant confidence is one tie group: expected value under random ranking, AUROC_f = 1/2
    assert augrc(np.zeros(1000), correct) == pytest.approx(0.5 * pi**2 + 0.5 * pi * (1 - pi), abs=1e-12)


def test_risk_coverage_curve_groups_ties():
    confidence = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.7])
    correct = np.array([True, False, True, True, False, False])
    cov, sel, gen = risk_coverage_curve(confidence, correct)
    np.testing.assert_allclose(cov, [2 / 6, 3 / 6, 1.0])
    np.testing.assert_allclose(sel, [1 / 2, 1 / 3, 3 / 6])
    np.testing.assert_allclose(gen, [1 / 6, 1 / 6, 3 / 6])


def test_aurc_without_ties_is_mean_selective_risk():
    rng = np.random.default_rng(3)
    confidence = rng.random(200)
    correct = rng.random(200) > 0.3
    order = np.argsort(-confidence)
    wrong = np.cumsum(~correct[order])
    brute = np.mean(wrong / np.arange(1, 201))
    assert aurc(confidence, correct) == pytest.approx(brute, abs=1e-12)


def test_selective_summary_counts():
    decisions = np.array(["roadwork", "no_roadwork", "defer", "roadwork", "no_roadwork", "defer"])
    labels = np.array([1, 1, 1, 0, 0, 0])
    s = selective_summary(decisions, labels)
    assert s["coverage"] == pytest.approx(4 / 6)
    assert s["fnr"] == pytest.approx(1 / 3), "FNR is over ALL roadwork images, deferred ones included"
    assert s["fnr_accepted"] == pytest.approx(1 / 2), "SCRC's FNR: missed / accepted roadwork images"
    assert s["fpr"] == pytest.approx(1 / 3)
    assert s["selective_accuracy"] == pytest.approx(2 / 4)
    assert s["n"] == 6


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_point_and_narrows_with_n():
    def acc(p, y):
        return float(np.mean(hard_label(p) == y))

    widths = []
    for n in (200, 5000):
        p, y = _scores(n, seed=n)
        ci = bootstrap_ci(acc, p, y, n_resamples=300, seed=0)
        assert ci["low"] <= ci["value"] <= ci["high"], f"n={n}: {ci}"
        assert ci["value"] == pytest.approx(acc(p, y))
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 3, f"CI did not narrow with n: widths {widths}"


def test_bootstrap_ci_dict_stats_seeded_and_nan_safe():
    p, y = _scores(60, seed=5)
    y[:] = 0
    y[:2] = 1  # positives are rare: some resamples draw none, where FNR is undefined

    def stats(p, y):
        pos = y == 1
        return {
            "acc": float(np.mean(hard_label(p) == y)),
            "fnr": float(np.mean(p[pos] < 0.5)) if pos.any() else math.nan,
        }

    a = bootstrap_ci(stats, p, y, n_resamples=200, seed=1)
    b = bootstrap_ci(stats, p, y, n_resamples=200, seed=1)
    assert a == b, "same seed must give the same intervals"
    assert set(a) == {"acc", "fnr"} and set(a["acc"]) == {"value", "low", "high", "n_valid"}
    assert a["acc"]["n_valid"] == 200 and 0 < a["fnr"]["n_valid"] < 200, a["fnr"]
    with pytest.raises(ValueError, match="paired"):
        bootstrap_ci(stats, p, y[:-1])


def test_bootstrap_by_group_resamples_whole_near_duplicate_groups():
    # 40 groups of 10 near-copies: one prediction and one label per group, repeated.
    p_group, y_group = _scores(40, seed=6)
    p, y, groups = np.repeat(p_group, 10), np.repeat(y_group, 10), np.repeat(np.arange(40) * 7, 10)
    seen_sizes = set()

    def acc(p, y):
        seen_sizes.add(p.size)
        return float(np.mean(hard_label(p) == y))

    by_group = bootstrap_ci(acc, p, y, n_resamples=400, seed=0, groups=groups)
    assert seen_sizes == {400}, f"40 groups of 10 rows: every resample has 400 rows, got {seen_sizes}"
    by_row = bootstrap_ci(acc, p, y, n_resamples=400, seed=0)
    independent = bootstrap_ci(acc, p_group, y_group, n_resamples=400, seed=0)
    w = {k: ci["high"] - ci["low"] for k, ci in (("group", by_group), ("row", by_row), ("40", independent))}
    # 40 independent outcomes: the group bootstrap must be as wide as 40 images, not as 400
    assert w["group"] > 2 * w["row"] and abs(w["group"] - w["40"]) < 0.35 * w["40"], w

    def members_whole(p, y):
        counts = np.unique(p, return_counts=True)[1]  # a group's rows share one p
        return float(np.all(counts % 10 == 0))

    whole = bootstrap_ci(members_whole, p, y, n_resamples=50, seed=3, groups=groups)
    assert whole["low"] == 1.0, "a resample split a near-duplicate group"
    with pytest.raises(ValueError, match="group id per row"):
        bootstrap_ci(acc, p, y, groups=groups[:-1])


# ---------------------------------------------------------------- slices


def _slice_table(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p, y = _scores(n, seed=seed)
    return pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "uri": [f"/x/{i}.jpg" for i in range(n)],
            "label": y,
            "p_roadwork": p,
            "decision": np.where(p >= 0.7, "roadwork", np.where(p < 0.3, "no_roadwork", "defer")),
            "time_of_day": rng.choice(["day", "night", "dawn"], n, p=[0.6, 0.37, 0.03]),
            "weather": rng.choice(["sun", "rain", None], n, p=[0.5, 0.4, 0.1]),
            "source": "synthetic",
            "view_probs": [[0.1, 0.2]] * n,
        }
    )


def test_slice_metrics_drop_small_groups_and_pick_metadata_columns():
    df = _slice_table()
    assert metadata_columns(df, exclude={"p_roadwork", "label", "decision"}) == ["time_of_day", "weather"]
    s = slice_metrics(df, "p_roadwork", "label", "decision", min_count=30)
    assert set(s["column"]) == {"time_of_day", "weather"}
    assert "dawn" not in set(s["value"]), "a slice under min_count must be dropped"
    assert "<missing>" in set(s["value"]), "missing metadata forms its own slice"
    night = s[(s["column"] == "time_of_day") & (s["value"] == "night")].iloc[0]
    part = df[df["time_of_day"] == "night"]
    assert night["n"] == len(part)
    assert night["accuracy"] == pytest.approx(
        np.mean(hard_label(part["p_roadwork"].to_numpy()) == part["label"]), abs=1e-6
    )
    assert night["fnr"] == pytest.approx(selective_summary(part["decision"], part["label"])["fnr"])
    assert slice_metrics(df, "p_roadwork", "label", "decision", min_count=10_000).empty


def test_slice_metrics_names_missing_columns():
    with pytest.raises(ValueError, match="weatherr"):
        slice_metrics(_slice_table(100), "p_roadwork", "label", "decision", columns=["weatherr"])


# ---------------------------------------------------------------- plots


def test_plots_return_png_bytes(tmp_path):
    df = _slice_table(300)
    p, y = df["p_roadwork"].to_numpy(), df["label"].to_numpy()
    correct = hard_label(p) == y
    slices = slice_metrics(df, "p_roadwork", "label", "decision")
    rob = pd.DataFrame(
        {"level": [0, 1, 2, 3], "accuracy": [0.9, 0.85, 0.8, 0.7], "mcc": [0.8, 0.7, 0.6, 0.4]}
    )
    pngs = {
        "reliability": reliability_diagram(p, y),
        "risk_coverage": risk_coverage_plot(np.maximum(p, 1 - p), correct),
        "slices": slice_bars(slices, "mcc"),
        "robustness": robustness_plot(rob),
    }
    for name, png in pngs.items():
        assert png.startswith(b"\x89PNG"), f"{name} is not a PNG"
        assert len(png) > 1000, f"{name} PNG suspiciously small ({len(png)} bytes)"
    path = save_png(pngs["reliability"], tmp_path / "r.png")
    assert path.read_bytes() == pngs["reliability"]
    with pytest.raises(ValueError, match="not a PNG"):
        save_png(b"GIF89a", tmp_path / "x.png")
