"""The miner's answer: threshold chosen for the validator's reward, the float it sends, and where it shows
(Bundle.predict, `roadwork predict --answer` on base64 stdin, old bundles without answer.json)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from roadwork_core.bundle import Bundle
from roadwork_core.bundle.schema import MANIFEST_FILE, manifest_digest
from roadwork_core.subnet.answer import (
    ANSWER_FILE,
    AnswerRule,
    default_answer_rule,
    expected_reward,
    fit_answer_rule,
)
from tests.unit.test_bundle import parts  # noqa: F401  (the module-scoped tiny bundle fixture)

REPO = Path(__file__).resolve().parents[2]


def _reward_by_hand(tpr: float, tnr: float) -> float:
    """The same expectation written out with math.comb: balanced stream, acc over 10 ~ Binomial."""
    tp, fn, tn, fp = tpr / 2, (1 - tpr) / 2, tnr / 2, (1 - tnr) / 2
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = max(0.0, (tp * tn - fp * fn) / denom) if denom > 0 else 0.0
    acc = (tpr + tnr) / 2
    return sum(
        math.comb(10, k) * acc**k * (1 - acc) ** (10 - k) * (0.5 * mcc + 0.5 * k / 10) ** 3 for k in range(11)
    )


def _simulated_reward(p: np.ndarray, y: np.ndarray, answers_for, n: int = 3000, seed: int = 0) -> float:
    """Mean per-query reward of a simulated validator stream (labels 50/50, images drawn from p/y),
    written from the rules: pred = np.round(answer), MCC over the last 100 (clipped at 0, 0 when one
    class), accuracy over the last 10, reward = (0.5 MCC + 0.5 acc) ** 3."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    idx = np.array([rng.choice(np.flatnonzero(y == lab)) for lab in labels])
    preds = np.round(answers_for(p[idx])).astype(int)
    rewards = []
    for i in range(n):
        lw, pw = labels[max(0, i - 99) : i + 1], preds[max(0, i - 99) : i + 1]
        tp = np.sum((lw == 1) & (pw == 1))
        tn = np.sum((lw == 0) & (pw == 0))
        fp = np.sum((lw == 0) & (pw == 1))
        fn = np.sum((lw == 1) & (pw == 0))
        denom = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        mcc = max(0.0, (tp * tn - fp * fn) / denom) if denom > 0 else 0.0
        acc = float(np.mean(labels[max(0, i - 9) : i + 1] == preds[max(0, i - 9) : i + 1]))
        rewards.append((0.5 * mcc + 0.5 * acc) ** 3)
    return float(np.mean(rewards))


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.77, 1.0])
def test_answer_rounds_to_the_threshold_decision_and_stays_in_range(t: float) -> None:
    rule = AnswerRule(threshold=t, source="test")
    rng = np.random.default_rng(1)
    p = np.concatenate(
        [rng.uniform(0, 1, 500), [0.0, 1.0, 0.5, t, np.nextafter(t, 0.0), np.nextafter(t, 1.0)]]
    )
    a = rule.answer(p)
    assert ((a >= 0.0) & (a <= 1.0)).all(), f"answers outside [0, 1] at threshold {t}"
    assert not np.any(a == 0.5), "an answer of exactly 0.5 reads as no_roadwork by np.round: never sent"
    np.testing.assert_array_equal(np.round(a) == 1.0, p >= t, err_msg=f"np.round(answer) != (p >= {t})")
    order = np.argsort(p, kind="stable")
    assert (np.diff(a[order]) >= 0).all(), "the answer must be monotone in p_roadwork"


def test_default_rule_is_p_itself_except_at_one_half() -> None:
    rule = default_answer_rule("test")
    p = np.array([0.0, 0.1, 0.49, 0.51, 0.9, 1.0])
    np.testing.assert_allclose(rule.answer(p), p, atol=1e-12)
    assert rule.answer(np.array([0.5]))[0] > 0.5, "p = 0.5 meets the threshold: roadwork, sent above 0.5"


@pytest.mark.parametrize(("tpr", "tnr"), [(1.0, 1.0), (0.5, 0.5), (0.0, 1.0), (0.9, 0.6), (0.3, 0.2)])
def test_expected_reward_matches_the_hand_computation(tpr: float, tnr: float) -> None:
    n = 20
    labels = np.array([1] * n + [0] * n)
    decisions = np.array(
        [1] * round(tpr * n) + [0] * (n - round(tpr * n)) + [0] * round(tnr * n) + [1] * (n - round(tnr * n))
    )
    got = expected_reward(labels, decisions)
    assert got == pytest.approx(_reward_by_hand(tpr, tnr), abs=1e-12), (tpr, tnr)
    if (tpr, tnr) == (1.0, 1.0):
        assert got == pytest.approx(1.0)
    if tpr + tnr <= 1.0:  # MCC clipped to 0: only the 10-answer accuracy counts
        assert got < 0.5**3 + 0.02


def test_fitted_threshold_beats_every_other_threshold_and_the_simulated_validator_agrees() -> None:
    rng = np.random.default_rng(0)
    # negatives spread up to 0.7, positives from 0.6: the best cut is well above 0.5
    y = np.array([0] * 300 + [1] * 150)
    p = np.concatenate([rng.uniform(0.0, 0.7, 300), rng.uniform(0.6, 1.0, 150)])
    rule = fit_answer_rule(p, y)
    assert 0.6 <= rule.threshold <= 0.7, rule
    assert rule.n == 450 and rule.n_positive == 150 and "val_calib" in rule.source
    grid = np.linspace(0, 1, 201)
    best_on_grid = max(expected_reward(y, (p >= t).astype(int)) for t in grid)
    assert rule.expected_reward >= best_on_grid - 1e-12, (rule.expected_reward, best_on_grid)
    assert rule.expected_reward == pytest.approx(expected_reward(y, np.round(rule.answer(p)).astype(int)))
    assert rule.expected_reward > rule.expected_reward_at_half + 0.05, rule

    fitted = _simulated_reward(p, y, rule.answer)
    at_half = _simulated_reward(p, y, default_answer_rule("baseline").answer)
    assert fitted > at_half + 0.05, f"simulated validator: fitted {fitted:.3f} vs threshold 0.5 {at_half:.3f}"


def test_fit_answer_rule_refuses_one_class_and_nan() -> None:
    with pytest.raises(ValueError, match="both 0 and 1"):
        fit_answer_rule(np.array([0.2, 0.8]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        fit_answer_rule(np.array([0.2, np.nan]), np.array([0, 1]))


# ---------------------------------------------------------------------------------------------------
# in the bundle


def test_bundle_predict_returns_the_answer(parts: dict) -> None:  # noqa: F811
    bundle = Bundle.load(parts["bundle_dir"])
    assert bundle.answer_rule.threshold == 0.5 and "no answer_rule" in bundle.answer_rule.source
    preds = bundle.predict(parts["paths"][:3])
    for pred in preds:
        assert pred.answer == pytest.approx(bundle.answer_rule.answer(pred.p_roadwork).item())
        assert (np.round(pred.answer) == 1.0) == (pred.p_roadwork >= bundle.answer_rule.threshold)
        assert "answer" in pred.to_dict()


def _as_schema_1(bundle_dir: Path) -> None:
    """Rewrite a bundle as roadwork wrote it before answer.json (schema 1)."""
    (bundle_dir / ANSWER_FILE).unlink()
    doc = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    doc["schema_version"] = 1
    del doc["files"][ANSWER_FILE]
    doc["content_sha256"] = manifest_digest(doc)
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(doc))


def test_old_bundle_without_answer_loads_with_threshold_half_and_says_so(parts: dict, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    old = Path(shutil.copytree(parts["bundle_dir"], tmp_path / "old"))
    _as_schema_1(old)
    bundle = Bundle.load(old)
    assert bundle.answer_rule.threshold == 0.5
    assert "schema 1 has no answer.json" in bundle.answer_rule.source, bundle.answer_rule.source
    [pred] = bundle.predict(parts["paths"][:1])
    assert pred.answer == pytest.approx(bundle.answer_rule.answer(pred.p_roadwork).item())


def test_fitted_rule_travels_in_the_bundle(parts: dict, tmp_path: Path) -> None:  # noqa: F811
    from roadwork_core.bundle import export_bundle

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    rule = fit_answer_rule(np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1), y)
    out = export_bundle(
        tmp_path / "b", classifier_dir=parts["classifier_dir"], calibrator=parts["calibrator"],
        policy=parts["policy"], dataset_version="v1", upstream_versions={}, metrics_summary={},
        answer_rule=rule,
    )  # fmt: skip
    assert Bundle.load(out).answer_rule == rule
    (out / ANSWER_FILE).write_text((out / ANSWER_FILE).read_text().replace(str(rule.threshold), "0.01"))
    with pytest.raises(Exception, match="answer.json was modified"):
        Bundle.load(out)


def test_roadwork_predict_answer_from_a_fresh_process(parts: dict, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    old = Path(shutil.copytree(parts["bundle_dir"], tmp_path / "old"))
    _as_schema_1(old)
    raw = [p.read_bytes() for p in parts["paths"][:2]]
    stdin = f"{base64.b64encode(raw[0]).decode()}\nnot-base64!\n{base64.b64encode(raw[1]).decode()}\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("roadwork")), "predict", "--answer", "--bundle", str(old)],
        input=stdin, capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 1, f"a bad line must give exit 1: {done.returncode} {done.stderr[-2000:]}"
    assert len(lines) == 3 and lines[1] == "nan", lines
    assert "stdin:1" in done.stderr and "base64" in done.stderr, done.stderr
    assert "schema 1 has no answer.json" in done.stderr, "an old bundle's default answer must be stated"
    expected = [p.answer for p in Bundle.load(old).predict(raw)]
    assert [float(lines[0]), float(lines[2])] == pytest.approx(expected, abs=1e-6)
    assert all(0.0 <= float(x) <= 1.0 and float(x) != 0.5 for x in (lines[0], lines[2]))


def test_predict_answer_lines_in_process(parts: dict) -> None:  # noqa: F811
    from roadwork_core.bundle.predict_cli import predict_command

    raw = parts["paths"][0].read_bytes()
    lines = list(
        predict_command(
            str(parts["bundle_dir"]), [], io.StringIO(base64.b64encode(raw).decode() + "\n"), answer_only=True
        )
    )
    assert len(lines) == 1 and 0.0 <= float(lines[0]) <= 1.0, lines
