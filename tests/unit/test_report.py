"""The evaluation report: metrics with CIs, guarantee check, robustness, files and JSON round trip."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_core.contracts.labels import hard_label
from roadwork_core.metrics import (
    EvaluationReport,
    augrc,
    build_evaluation_report,
    check_guarantee,
    distorted_predictions,
    read_report,
    selective_summary,
    write_report,
)

N_BOOT = 60  # enough to exercise the CI machinery; the asset uses 1000


def _test_table(n: int = 800, seed: int = 0, noise: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = rng.normal(size=n) + 1.8 * (2 * y - 1) + rng.normal(scale=noise + 1e-9, size=n)
    p = 1.0 / (1.0 + np.exp(-logit))
    return pd.DataFrame(
        {
            "image_id": [f"img{i:05d}" for i in range(n)],
            "label": y,
            "p_roadwork": p,
            "decision": np.where(p >= 0.75, "roadwork", np.where(p < 0.15, "no_roadwork", "defer")),
            "confidence": np.abs(logit),
            "time_of_day": rng.choice(["day", "night"], n),
            "scene": rng.choice(["urban", "highway", "rural", "tunnel"], n, p=[0.5, 0.3, 0.18, 0.02]),
        }
    )


@pytest.fixture(scope="module")
def report() -> EvaluationReport:
    test = _test_table()
    robustness = {level: _test_table(seed=0, noise=0.8 * level) for level in range(4)}
    return build_evaluation_report(
        test,
        policy_guarantee={"alpha": 0.05, "delta": 0.1, "mode": "ltt"},
        robustness=robustness,
        n_bootstrap=N_BOOT,
    )


def test_report_metrics_have_cis_and_match_direct_computation(report):
    test = _test_table()
    m = report.metrics
    for name in ("accuracy", "mcc", "auroc", "ece", "ace", "reward_proxy", "augrc", "coverage", "fnr", "fpr"):
        ci = m[name]
        assert set(ci) == {"value", "low", "high", "n_valid"}, f"{name}: {ci}"
        assert ci["low"] <= ci["value"] <= ci["high"], f"{name}: point estimate outside its CI {ci}"
    sel = selective_summary(test["decision"], test["label"])
    for name in ("coverage", "fnr", "fpr", "selective_accuracy"):
        assert m[name]["value"] == pytest.approx(sel[name]), name
    correct = hard_label(test["p_roadwork"].to_numpy()) == test["label"]
    assert m["augrc"]["value"] == pytest.approx(augrc(test["confidence"], correct))
    pi = 1 - correct.mean()
    assert m["augrc_optimal"]["value"] == pytest.approx(0.5 * pi**2)
    assert m["augrc_excess"]["value"] == pytest.approx(m["augrc"]["value"] - 0.5 * pi**2)
    assert m["augrc_excess"]["value"] >= 0.0
    assert m["n"]["value"] == len(test)


def test_report_tables(report):
    rc = report.risk_coverage
    assert list(rc.columns) == [
        "confidence_threshold",
        "coverage",
        "selective_risk",
        "generalized_risk",
        "optimal_generalized_risk",
    ]
    assert rc["coverage"].iloc[-1] == pytest.approx(1.0) and rc["coverage"].is_monotonic_increasing
    assert (rc["generalized_risk"] >= rc["optimal_generalized_risk"] - 1e-12).all(), "below the optimal curve"
    assert set(report.slices["column"]) == {"time_of_day", "scene"}
    assert "tunnel" not in set(report.slices["value"]), "slices under 30 images must be dropped"
    rob = report.robustness
    assert list(rob["level"]) == [0, 1, 2, 3]
    assert rob["accuracy"].iloc[0] > rob["accuracy"].iloc[3], "heavier distortion should cost accuracy"
    assert set(report.plots) == {"reliability", "risk_coverage", "slices", "robustness"}
    assert all(png.startswith(b"\x89PNG") for png in report.plots.values())


def test_write_and_read_round_trip(report, tmp_path):
    paths = write_report(report, tmp_path / "eval")
    for name in (
        "report.json",
        "summary.md",
        "slices.parquet",
        "slices.csv",
        "robustness.parquet",
        "reliability.png",
    ):
        assert name in paths, f"{name} not written: {sorted(paths)}"
    assert not list((tmp_path / "eval").glob(".tmp-*")), "temporary files left behind"
    doc = json.loads((tmp_path / "eval" / "report.json").read_text())  # strict JSON: NaN written as null
    assert doc["guarantee_check"]["passed"] is True
    back = read_report(tmp_path / "eval")
    assert back.to_json() == report.to_json()
    assert back.plots == report.plots
    pd.testing.assert_frame_equal(
        pd.read_parquet(paths["slices.parquet"]), report.slices, check_dtype=False, obj="slices.parquet"
    )


def test_report_bootstrap_resamples_near_duplicate_groups():
    test = _test_table(n=300, seed=4)
    test = test.loc[test.index.repeat(4)].reset_index(drop=True)  # every image with 3 near-copies
    test["group_id"] = test["image_id"]
    grouped = build_evaluation_report(test, n_bootstrap=N_BOOT)
    by_image = build_evaluation_report(test.drop(columns="group_id"), n_bootstrap=N_BOOT)
    assert grouped.config["bootstrap_unit"] == "group_id" and grouped.config["bootstrap_n_units"] == 300
    assert by_image.config["bootstrap_unit"] == "image" and any("group_id" in n for n in by_image.notes)
    width = {
        k: r.metrics["accuracy"]["high"] - r.metrics["accuracy"]["low"]
        for k, r in (("g", grouped), ("i", by_image))
    }
    assert width["g"] > 1.25 * width["i"], f"groups of 4 copies must widen the CI (about 2x): {width}"


def test_summary_markdown(report):
    md = report.summary_markdown()
    assert "| metric | value | CI |" in md
    assert "| reward_proxy |" in md and "| fnr |" in md
    assert "Guarantee check: PASSED" in md
    assert "| level |" in md


def test_guarantee_check_uses_binomial_tolerance():
    labels = np.r_[np.ones(200, int), np.zeros(200, int)]

    def decisions(n_fn: int) -> np.ndarray:
        d = np.array(["roadwork"] * 200 + ["no_roadwork"] * 200, dtype=object)
        d[:n_fn] = "no_roadwork"
        return d

    # 14/200 = 7% > α = 5%, but within sampling noise of a true 5% rate (one-sided 95%)
    close = check_guarantee(decisions(14), labels, {"alpha": 0.05})
    assert close["passed"] is True and close["realized_fnr"] == pytest.approx(0.07)
    assert close["tolerance"] > 0.02, close
    far = check_guarantee(decisions(30), labels, {"alpha": 0.05})
    assert far["passed"] is False and "EXCEEDS" in far["message"]
    assert check_guarantee(decisions(0), labels, None)["passed"] is None
    # with deferrals the default scope is SCRC's: FN among ACCEPTED roadwork images
    d = decisions(10)
    d[10:110] = "defer"  # 100 of the 190 caught positives deferred: 10 FN / 100 accepted positives
    accepted_scope = check_guarantee(d, labels, {"alpha": 0.05})
    assert accepted_scope["fnr_scope"] == "accepted" and accepted_scope["realized_fnr"] == pytest.approx(0.10)
    all_scope = check_guarantee(d, labels, {"alpha": 0.05, "fnr_scope": "all"})
    assert all_scope["realized_fnr"] == pytest.approx(0.05) and all_scope["passed"] is True
    with_fpr = check_guarantee(decisions(0), labels, {"alpha": 0.05, "alpha_fpr": 0.0})
    assert with_fpr["passed"] is True and set(with_fpr["checks"]) == {"fnr", "fpr"}


def test_missing_confidence_falls_back_and_missing_columns_fail():
    test = _test_table(200).drop(columns=["confidence"])
    r = build_evaluation_report(test, n_bootstrap=10, slice_columns=[])
    assert r.config["confidence"] == "max(p_roadwork, 1-p_roadwork)" and r.notes
    assert r.guarantee_check["passed"] is None
    assert r.robustness.empty and "robustness" not in r.plots
    with pytest.raises(ValueError, match="decision"):
        build_evaluation_report(test.drop(columns=["decision"]), n_bootstrap=10)


def test_distorted_predictions_feeds_robustness():
    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(6)]
    labels = [0, 1, 0, 1, 0, 1]

    def darken(img: Image.Image, level: int, seed: int) -> Image.Image:
        return img.point(lambda v: max(0, v - 30 * level))

    def predict(batch: list[Image.Image]) -> pd.DataFrame:
        p = np.array([img.getpixel((0, 0))[0] / 255 for img in batch])
        return pd.DataFrame({"p_roadwork": p, "decision": np.where(p >= 0.5, "roadwork", "no_roadwork")})

    tables = distorted_predictions(images, labels, predict, darken, levels=(0, 2))
    assert sorted(tables) == [0, 2]
    assert (tables[2]["p_roadwork"] <= tables[0]["p_roadwork"]).all()
    assert list(tables[0]["label"]) == labels and (tables[2]["level"] == 2).all()
    r = build_evaluation_report(tables[0], robustness=tables, n_bootstrap=5, slice_columns=[])
    assert list(r.robustness["level"]) == [0, 2] and not math.isnan(r.robustness["coverage"].iloc[0])


def test_distorted_and_replica_predictions_hold_one_chunk_of_images_not_the_split():
    """The evaluation decodes val_test lazily; both sections used to hold every decoded image and every
    distorted copy at once (~90 MB per 12 MP photo). Now at most one chunk is alive, and the tables do not
    depend on the chunk size (each image's distortion is seeded by its index)."""
    import weakref

    from roadwork_core.metrics.subnet_eval import replica_predictions

    alive, peak = [0], [0]  # images not yet freed (PIL images are unhashable: counted by finalizers)

    def track(img: Image.Image) -> None:
        alive[0] += 1
        weakref.finalize(img, lambda: alive.__setitem__(0, alive[0] - 1))

    class Lazy(Sequence):  # what evaluate_bundle_on_test passes: decoded when indexed
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> Image.Image:
            rng = np.random.default_rng(i)
            img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
            track(img)
            return img

    def darken(img: Image.Image, level: int, seed: int) -> Image.Image:
        return img.point(lambda v: max(0, v - 30 * level + seed % 7))

    def predict(batch: list[Image.Image]) -> pd.DataFrame:
        for img in batch:  # the distorted / challenged copies, beside the decoded images still referenced
            track(img)
        peak[0] = max(peak[0], alive[0])
        p = [float(np.asarray(im)[..., 0].mean() / 255) for im in batch]
        return pd.DataFrame({"p_roadwork": p, "p_raw": p, "decision": ["roadwork"] * len(p)})

    labels = [i % 2 for i in range(10)]
    whole = distorted_predictions(Lazy(), labels, predict, darken, levels=(0, 2), chunk_size=10)
    peak[0] = 0
    chunked = distorted_predictions(Lazy(), labels, predict, darken, levels=(0, 2), chunk_size=3)
    assert peak[0] <= 2 * 3, f"{peak[0]} images alive at once with chunk_size 3 (decoded + distorted)"
    for level in (0, 2):
        pd.testing.assert_frame_equal(whole[level], chunked[level])
    a = replica_predictions(Lazy(), labels, predict, seed=1, chunk_size=10)
    peak[0] = 0
    b = replica_predictions(Lazy(), labels, predict, seed=1, chunk_size=4)
    assert peak[0] <= 2 * 4, f"{peak[0]} images alive at once with chunk_size 4 (decoded + challenged)"
    pd.testing.assert_frame_equal(a, b)
    assert list(b["image_index"][b["level"] == 0]) == list(range(10))
