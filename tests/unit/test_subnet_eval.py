"""The report's subnet section: per-level figures and the simulated query stream on known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import binom

from roadwork_core.metrics.report import EvaluationReport
from roadwork_core.metrics.subnet_eval import replica_predictions, subnet_section, summary_markdown


def _table(labels: np.ndarray, model: np.ndarray, p_raw: np.ndarray) -> pd.DataFrame:
    """A replica_predictions-shaped table: the same answers at every level."""
    rows = []
    for level in range(4):
        for i, (y, m, r) in enumerate(zip(labels, model, p_raw, strict=True)):
            rows.append({"image_index": i, "label": int(y), "level": level, "p_roadwork": m, "p_raw": r})
    return pd.DataFrame(rows)


def test_perfect_answers_earn_one_and_always_half_earns_the_accuracy_window_only() -> None:
    labels = np.array([0, 1] * 20)
    table = _table(labels, np.where(labels == 1, 0.8, 0.3), np.where(labels == 1, 0.4, 0.2))
    section = subnet_section(table, n_streams=60, stream_length=400, n_bootstrap=30, seed=1)
    rows = {(r["answer"], r["level"]): r for r in section["per_level"]}
    for level in ("0", "1", "2", "3", "mix"):
        assert rows[("model", level)]["reward_proxy"] == pytest.approx(1.0)
        assert rows[("always_0.5", level)]["mcc"] == 0.0
        assert rows[("always_0.5", level)]["accuracy"] == pytest.approx(0.5)
        assert rows[("argmax", level)]["mcc"] == 0.0  # p_raw < 0.5 everywhere: always "no roadwork"
    assert rows[("model", "mix")]["n"] == 4 * len(labels)

    stream = {r["answer"]: r for r in section["stream"]}
    assert stream["model"]["expected_reward"] == pytest.approx(1.0)
    assert stream["model"]["low"] == pytest.approx(1.0) and stream["model"]["high"] == pytest.approx(1.0)
    # always 0.5 is right exactly on the negatives: reward = (accuracy over 10 / 2)^3, accuracy ~ Bin(10, 1/2) / 10
    k = np.arange(11)
    expected = float((binom.pmf(k, 10, 0.5) * (k / 20) ** 3).sum())  # = 162.5 / 8000
    assert stream["always_0.5"]["expected_reward"] == pytest.approx(expected, abs=0.004)
    assert stream["always_0.5"]["low"] <= expected <= stream["always_0.5"]["high"]
    assert section["model_answer"] == "p_roadwork"


def test_answer_column_is_preferred_and_one_label_sets_skip_the_stream() -> None:
    labels = np.array([0, 1, 0, 1])
    table = _table(labels, labels * 0.9, labels * 0.9)
    table["answer"] = np.where(table["label"] == 1, 0.2, 0.8)  # a deliberately wrong answer column
    section = subnet_section(table, n_streams=5, stream_length=150, n_bootstrap=5)
    assert section["model_answer"] == "answer"
    assert {r["answer"]: r for r in section["per_level"] if r["level"] == "mix"}["model"]["accuracy"] == 0.0
    one = subnet_section(_table(np.array([1, 1]), np.array([0.9, 0.9]), np.array([0.9, 0.9])), n_streams=5)
    assert one["stream"] == [] and "one label" in one["note"]


def test_section_survives_the_report_json_and_prints() -> None:
    labels = np.array([0, 1] * 5)
    section = subnet_section(
        _table(labels, labels * 0.7 + 0.1, labels * 0.7 + 0.1), n_streams=5, stream_length=150, n_bootstrap=5
    )
    report = EvaluationReport(
        metrics={}, risk_coverage=pd.DataFrame(), slices=pd.DataFrame(), robustness=pd.DataFrame(),
        plots={}, guarantee_check={}, subnet=section,
    )  # fmt: skip
    again = EvaluationReport.from_json(report.to_json())
    assert again.subnet["per_level"] == section["per_level"]
    text = again.summary_markdown()
    assert "Subnet: val_test through the validator replica" in text
    assert "| always_0.5 | mix |" in text and "expected reward" in text
    assert summary_markdown({}) == ""


def test_replica_predictions_runs_every_image_at_every_level_reproducibly() -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(3)]
    seen: list[tuple[int, int]] = []

    def predict_fn(imgs: list[Image.Image]) -> pd.DataFrame:
        seen.extend(im.size for im in imgs)
        p = [float(np.asarray(im)[..., 0].mean() / 255) for im in imgs]  # a real (if silly) score
        return pd.DataFrame({"p_roadwork": p, "p_raw": p})

    a = replica_predictions(images, [0, 1, 0], predict_fn, seed=3, transform_threads=1)
    b = replica_predictions(images, [0, 1, 0], predict_fn, seed=3)
    assert len(a) == 12 and sorted(a["level"].unique()) == [0, 1, 2, 3]
    assert set(seen) == {(224, 224)}
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="one label per image"):
        replica_predictions(images, [0, 1], predict_fn)
