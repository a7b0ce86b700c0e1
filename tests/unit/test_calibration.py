"""Calibrators: each method calibrates, is monotone where it should be, is chosen by held-out NLL,
round-trips through JSON exactly and agrees between numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from roadwork_core.calibration.calibrators import (
    CALIBRATION_METHODS,
    Calibrator,
    binary_nll,
    fit_calibrator,
)


def _draw(n: int, scale: float, shift: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probability is sigmoid(true_logit); observed = scale * true_logit + shift."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < expit(true_logit)).astype(np.int64)
    return scale * true_logit + shift, labels


@pytest.fixture(scope="module")
def overconfident() -> tuple[np.ndarray, np.ndarray]:
    return _draw(1500, scale=4.0)


@pytest.fixture(scope="module")
def fitted(overconfident) -> dict[str, Calibrator]:
    logits, labels = overconfident
    return {m: fit_calibrator(logits, labels, methods=(m,))[0] for m in CALIBRATION_METHODS}


def test_temperature_really_moves_overconfident_confidences(overconfident, fitted):
    logits, labels = overconfident
    cal = fitted["temperature"]
    t = cal.params["temperature"]
    assert 3.0 < t < 5.5, f"logits are 4x overconfident, fitted temperature {t} should be near 4"
    p_raw, p_cal = expit(logits), cal.transform(logits)
    moved = np.abs(p_cal - p_raw).mean()
    assert moved > 0.05, f"temperature scaling left confidences (almost) unchanged: mean |dp| = {moved}"
    assert binary_nll(p_cal, labels) < binary_nll(p_raw, labels) - 0.1, "temperature should cut the NLL"


def test_fit_report_picks_lowest_holdout_nll_and_lowers_ece(overconfident):
    logits, labels = overconfident
    cal, report = fit_calibrator(logits, labels)
    assert set(report["nll"]) == set(CALIBRATION_METHODS), f"NLL per method expected, got {report['nll']}"
    assert report["chosen"] == min(report["nll"], key=report["nll"].get), f"not the argmin NLL: {report}"
    assert cal.method == report["chosen"] and report["params"] == cal.params
    assert report["ece_after"] < report["ece_before"] / 2, f"ECE should drop: {report}"
    assert report["n"] == logits.size and report["n_fit"] + report["n_holdout"] == logits.size


def test_shifted_logits_choose_a_method_that_can_fix_the_bias():
    # A constant shift cannot be fixed by a temperature alone; beta (with its c) and the
    # nonparametric maps can, so temperature must lose on held-out NLL.
    logits, labels = _draw(1500, scale=1.0, shift=2.5, seed=1)
    _, report = fit_calibrator(logits, labels)
    assert report["chosen"] != "temperature", f"temperature cannot remove a shift of 2.5: {report['nll']}"
    assert report["nll"]["beta"] < report["nll"]["temperature"], (
        f"beta should beat temperature: {report['nll']}"
    )


@pytest.mark.parametrize("method", ["isotonic", "histogram", "beta", "temperature"])
def test_calibration_maps_are_monotone_probabilities(fitted, method):
    grid = np.linspace(-30.0, 30.0, 2001)
    p = fitted[method].transform(grid)
    assert np.all((p >= 0.0) & (p <= 1.0)), f"{method}: outputs leave [0, 1]"
    assert np.all(np.diff(p) >= -1e-12), f"{method}: calibration map is not non-decreasing"
    assert p[-1] > p[0], f"{method}: map is constant"


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_json_round_trip_and_torch_agree(fitted, overconfident, method):
    logits = np.concatenate([overconfident[0], [-50.0, 50.0, 0.0]])
    cal = fitted[method]
    again = Calibrator.model_validate_json(cal.model_dump_json())
    assert again == cal, f"{method}: JSON round trip changed the calibrator"
    np.testing.assert_array_equal(again.transform(logits), cal.transform(logits), err_msg=method)
    p_torch = cal.transform_torch(torch.as_tensor(logits, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(p_torch, cal.transform(logits), atol=1e-9, err_msg=f"{method}: torch != numpy")
    p32 = cal.transform_torch(torch.as_tensor(logits, dtype=torch.float32))
    assert p32.dtype == torch.float32, f"{method}: transform_torch should keep the input dtype"


def test_bad_inputs_name_the_problem():
    logits, labels = _draw(50, scale=1.0)
    with pytest.raises(ValueError, match=r"logits\[3\]"):
        fit_calibrator(np.where(np.arange(50) == 3, np.nan, logits), labels)
    with pytest.raises(ValueError, match=r"labels\[0\] = 2"):
        fit_calibrator(logits, np.where(np.arange(50) == 0, 2, labels))
    with pytest.raises(ValueError, match="unknown calibration methods"):
        fit_calibrator(logits, labels, methods=("platt",))
    with pytest.raises(ValueError, match="at least 2 of each"):
        fit_calibrator(logits, np.ones(50, dtype=int))
    with pytest.raises(ValueError, match="needs params"):
        Calibrator(method="beta", params={"a": 1.0})


def test_a_holdout_fraction_that_leaves_a_fold_too_small_names_the_setting():
    z = np.linspace(-1, 1, 10)
    y = np.r_[np.zeros(5), np.ones(5)].astype(int)
    for fraction in (0.1, 0.85):  # a held-out fold of 1 image, a fit fold of 1 image
        with pytest.raises(
            ValueError, match=r"calibrator.holdout_fraction = .* set holdout_fraction between"
        ):
            fit_calibrator(z, y, holdout_fraction=fraction)
    cal, report = fit_calibrator(z, y, holdout_fraction=0.3)
    assert report["n_holdout"] == 3 and cal.method in CALIBRATION_METHODS


def test_a_separable_val_calib_and_a_temperature_at_its_limit_are_reported():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(20)].astype(int)
    z = np.where(y == 1, rng.uniform(0.5, 4, 40), rng.uniform(-4, -0.5, 40))
    cal, report = fit_calibrator(z, y, methods=("temperature",))
    text = " ".join(report["warnings"])
    assert "separable" in text and "search limit" in text, report["warnings"]
    logits, labels = _draw(400, scale=1.0)  # overlapping classes: nothing to warn about
    assert fit_calibrator(logits, labels)[1]["warnings"] == []
    assert "wrong way round" in " ".join(fit_calibrator(-logits, labels)[1]["warnings"])


def test_nan_and_infinite_parameters_are_refused_before_they_reach_a_bundle():
    import pydantic

    from roadwork_core.calibration.gate import fit_gate_policy

    with pytest.raises(pydantic.ValidationError, match="finite"):
        Calibrator(method="temperature", params={"temperature": float("inf")})
    rng = np.random.default_rng(0)
    y = (rng.random(100) < 0.5).astype(int)
    p = np.where(y == 1, rng.beta(4, 2, 100), rng.beta(2, 4, 100))
    zero = np.zeros(100)
    features = {"max_prob": np.maximum(p, 1 - p), "entropy": zero, "margin": abs(2 * p - 1), "view_var": zero,
                "view_disagreement": zero, "global_tile_disagreement": zero}  # fmt: skip
    with pytest.raises(ValueError, match="decision_threshold"):
        fit_gate_policy(p, features, y, p, features, y, decision_threshold=float("nan"))
