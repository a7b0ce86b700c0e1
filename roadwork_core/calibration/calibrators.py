"""Probability calibration on val_calib: temperature (default), beta, isotonic, histogram binning.

`fit_calibrator` fits every requested method on one stratified fold of val_calib, picks the one with
the lowest NLL on the held-out fold, and refits it on all of val_calib. A `Calibrator` is a pydantic
model holding only the fitted parameters, so it round-trips through JSON exactly; `transform` maps
logits to probabilities in numpy and `transform_torch` does the same in torch (used by the bundle).

- temperature: p = sigmoid(z / T), T minimizing NLL (scipy; we fit it ourselves because netcal's
  `method='mle'` temperature scaling has been reported to return unchanged confidences).
- beta (Kull et al. 2017): p = sigmoid(a log p0 - b log(1 - p0) + c), p0 = sigmoid(z), a, b >= 0,
  fitted by bounded L-BFGS on the NLL.
- isotonic: sklearn IsotonicRegression on z, stored as its (X, Y) thresholds, linear in between.
- histogram: 15 equal-frequency bins of z with Laplace-smoothed frequencies, made non-decreasing by
  pooling adjacent violators (so the map keeps the classifier's ranking); stored as edges + values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import train_test_split

CalibrationMethod = Literal["temperature", "beta", "isotonic", "histogram"]
CALIBRATION_METHODS: tuple[str, ...] = ("temperature", "beta", "isotonic", "histogram")
ECE_BINS = 15
HISTOGRAM_BINS = 15
NLL_EPS = 1e-6  # isotonic / histogram maps can output exactly 0 or 1; NLL scores them clipped

_REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "beta": ("a", "b", "c"),
    "isotonic": ("x", "y"),
    "histogram": ("edges", "values"),
}


class Calibrator(BaseModel):
    """A fitted calibration map from logits to probabilities; parameters only, nothing pickled. NaN and
    infinity are refused (JSON cannot hold them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = 1
    method: CalibrationMethod
    params: dict[str, float | list[float]]

    @model_validator(mode="after")
    def _check_params(self) -> Calibrator:
        need = _REQUIRED_PARAMS[self.method]
        if sorted(self.params) != sorted(need):
            raise ValueError(
                f"calibrator method {self.method!r} needs params {need}, got {sorted(self.params)}"
            )
        if self.method == "temperature" and not self.params["temperature"] > 0:
            raise ValueError(f"temperature must be > 0, got {self.params['temperature']}")
        if self.method == "isotonic" and (
            len(self.params["x"]) != len(self.params["y"]) or not self.params["x"]
        ):
            raise ValueError("isotonic params x and y must be non-empty lists of equal length")
        if self.method == "histogram" and len(self.params["values"]) != len(self.params["edges"]) + 1:
            raise ValueError("histogram params need len(values) == len(edges) + 1")
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """(N,) logits -> (N,) calibrated probabilities in [0, 1] (float64)."""
        z = np.asarray(logits, dtype=np.float64)
        return _NUMPY_TRANSFORMS[self.method](z, self.params)

    def transform_torch(self, logits: torch.Tensor) -> torch.Tensor:
        """(N,) logits -> (N,) calibrated probabilities, same dtype and device as the input."""
        return _TORCH_TRANSFORMS[self.method](logits, self.params)


# --------------------------------------------------------------------------------------------------
# Transforms, numpy and torch, one pair per method.


def _temperature_np(z: np.ndarray, prm: dict[str, Any]) -> np.ndarray:
    return expit(z / prm["temperature"])


def _temperature_torch(z: torch.Tensor, prm: dict[str, Any]) -> torch.Tensor:
    return torch.sigmoid(z / prm["temperature"])


def _beta_np(z: np.ndarray, prm: dict[str, Any]) -> np.ndarray:
    return expit(prm["a"] * log_expit(z) - prm["b"] * log_expit(-z) + prm["c"])


def _beta_torch(z: torch.Tensor, prm: dict[str, Any]) -> torch.Tensor:
    logsig = torch.nn.functional.logsigmoid
    return torch.sigmoid(prm["a"] * logsig(z) - prm["b"] * logsig(-z) + prm["c"])


def _isotonic_np(z: np.ndarray, prm: dict[str, Any]) -> np.ndarray:
    return np.interp(z, prm["x"], prm["y"])  # constant beyond the ends, like sklearn's clip


def _isotonic_torch(z: torch.Tensor, prm: dict[str, Any]) -> torch.Tensor:
    x = torch.as_tensor(prm["x"], dtype=z.dtype, device=z.device)  # (M,) strictly increasing
    y = torch.as_tensor(prm["y"], dtype=z.dtype, device=z.device)  # (M,)
    if x.numel() == 1:
        return y.expand_as(z).clone()
    hi = torch.searchsorted(x, z.contiguous(), right=True).clamp(1, x.numel() - 1)  # (N,)
    x0, x1, y0, y1 = x[hi - 1], x[hi], y[hi - 1], y[hi]
    w = ((z - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return y0 + w * (y1 - y0)


def _histogram_np(z: np.ndarray, prm: dict[str, Any]) -> np.ndarray:
    return np.asarray(prm["values"])[np.searchsorted(prm["edges"], z, side="right")]


def _histogram_torch(z: torch.Tensor, prm: dict[str, Any]) -> torch.Tensor:
    edges = torch.as_tensor(prm["edges"], dtype=z.dtype, device=z.device)
    values = torch.as_tensor(prm["values"], dtype=z.dtype, device=z.device)
    return values[torch.bucketize(z, edges, right=True)]


_NUMPY_TRANSFORMS: dict[str, Callable[[np.ndarray, dict[str, Any]], np.ndarray]] = {
    "temperature": _temperature_np,
    "beta": _beta_np,
    "isotonic": _isotonic_np,
    "histogram": _histogram_np,
}
_TORCH_TRANSFORMS: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "temperature": _temperature_torch,
    "beta": _beta_torch,
    "isotonic": _isotonic_torch,
    "histogram": _histogram_torch,
}


# --------------------------------------------------------------------------------------------------
# Fitting, one function per method: (logits, 0/1 labels) -> Calibrator.


def _bce_with_logits(u: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, u) - y * u))


LOG_TEMPERATURE_BOUNDS = (-5.0, 5.0)  # temperature searched in [e^-5, e^5] = [0.0067, 148]


def _fit_temperature(z: np.ndarray, y: np.ndarray) -> Calibrator:
    res = minimize_scalar(
        lambda log_t: _bce_with_logits(z / np.exp(log_t), y), bounds=LOG_TEMPERATURE_BOUNDS, method="bounded"
    )
    return Calibrator(method="temperature", params={"temperature": float(np.exp(res.x))})


def _warnings(calibrator: Calibrator, z: np.ndarray, y: np.ndarray) -> list[str]:
    """What the fit cannot vouch for: val_calib separable by the logit (every method then maps it to hard
    0 / 1), a temperature stopped at its search limit, logits that rank roadwork below no_roadwork."""
    found = []
    pos, neg = z[y == 1], z[y == 0]
    if pos.min() > neg.max():
        found.append(
            f"val_calib is separable: every roadwork logit ({pos.min():.3g} or more) is above every "
            f"no_roadwork logit ({neg.max():.3g} or less), so calibration learns near-hard 0/1 "
            f"probabilities from {z.size} images; add images to val_calib for probabilities worth reading"
        )
    if calibrator.method == "temperature":
        log_t = float(np.log(calibrator.params["temperature"]))
        if min(abs(log_t - bound) for bound in LOG_TEMPERATURE_BOUNDS) < 1e-3:
            found.append(
                f"the temperature stopped at its search limit ({np.exp(log_t):.4g}; searched "
                f"[{np.exp(LOG_TEMPERATURE_BOUNDS[0]):.4g}, {np.exp(LOG_TEMPERATURE_BOUNDS[1]):.4g}]): the "
                f"best temperature lies beyond it"
            )
    if pos.mean() < neg.mean():
        found.append(
            "roadwork images have lower logits than no_roadwork images on average in val_calib: the "
            "classifier ranks them the wrong way round; no calibration map repairs that"
        )
    return found


def _fit_beta(z: np.ndarray, y: np.ndarray) -> Calibrator:
    log_p, log_1mp = log_expit(z), log_expit(-z)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, c = theta
        u = a * log_p - b * log_1mp + c
        r = expit(u) - y  # dNLL/du per sample
        return _bce_with_logits(u, y), np.array([np.mean(r * log_p), -np.mean(r * log_1mp), np.mean(r)])

    # Start at the identity map (a = b = 1, c = 0); a, b >= 0 keeps the map monotone.
    bounds = [(0.0, None), (0.0, None), (None, None)]
    res = minimize(loss_and_grad, x0=np.array([1.0, 1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=bounds)
    a, b, c = (float(v) for v in res.x)
    return Calibrator(method="beta", params={"a": a, "b": b, "c": c})


def _fit_isotonic(z: np.ndarray, y: np.ndarray) -> Calibrator:
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(z, y)
    return Calibrator(
        method="isotonic", params={"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    )


def _fit_histogram(z: np.ndarray, y: np.ndarray, n_bins: int = HISTOGRAM_BINS) -> Calibrator:
    edges = np.unique(np.quantile(z, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))  # (B-1,) interior edges
    idx = np.searchsorted(edges, z, side="right")  # (N,) bin per logit
    counts = np.bincount(idx, minlength=edges.size + 1)
    positives = np.bincount(idx, weights=y, minlength=edges.size + 1)
    freq = (positives + 1.0) / (counts + 2.0)  # Laplace smoothing: no exact 0 / 1, empty bin -> 0.5
    bins = np.arange(freq.size, dtype=np.float64)
    values = (
        IsotonicRegression(y_min=0.0, y_max=1.0).fit(bins, freq, sample_weight=counts + 2.0).predict(bins)
    )
    return Calibrator(method="histogram", params={"edges": edges.tolist(), "values": values.tolist()})


_FITTERS: dict[str, Callable[[np.ndarray, np.ndarray], Calibrator]] = {
    "temperature": _fit_temperature,
    "beta": _fit_beta,
    "isotonic": _fit_isotonic,
    "histogram": _fit_histogram,
}


# --------------------------------------------------------------------------------------------------
# Metrics and the selection procedure.


def binary_nll(p: np.ndarray, labels: np.ndarray, eps: float = NLL_EPS) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (L1, equal-width bins on the confidence max(p, 1-p) against correctness).

    The same number as the evaluation report's `ece` (roadwork_core.metrics.classification).
    """
    from roadwork_core.metrics.classification import top_label_calibration_error  # heavy import, only here

    return top_label_calibration_error(
        np.asarray(p, dtype=np.float64), np.asarray(labels, dtype=np.int64), n_bins=n_bins
    )


def _check_inputs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(
            f"logits must be a 1-D array (the predictions table's `logit` column), got shape {z.shape}"
        )
    if not np.isfinite(z).all():
        i = int(np.flatnonzero(~np.isfinite(z))[0])
        raise ValueError(f"logits[{i}] = {z[i].item()!r} is not finite; fix or drop that prediction row")
    y = np.asarray(labels)
    if y.shape != z.shape:
        raise ValueError(f"labels has shape {y.shape}, expected {z.shape} to match logits")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"labels[{i}] = {y[i].item()!r}; labels must be 0 (no_roadwork) or 1 (roadwork)")
    y = y.astype(np.float64)
    n_pos = int(y.sum())
    if min(n_pos, y.size - n_pos) < 2:
        raise ValueError(
            f"val_calib has {n_pos} roadwork and {y.size - n_pos} no_roadwork images; calibration needs at "
            f"least 2 of each (for the stratified held-out fold): add images to val_calib"
        )
    return z, y


def fit_calibrator(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    methods: Sequence[str] = CALIBRATION_METHODS,
    holdout_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[Calibrator, dict[str, Any]]:
    """Choose a calibration method by held-out NLL on val_calib, then refit it on all of val_calib.

    Returns the calibrator and a report: nll (per method, on the held-out fold), chosen, ece_before /
    ece_after (15 bins, all of val_calib, the latter in-sample), ece_holdout_before / _after (the
    chosen method fitted on the fit fold, scored on the held-out fold), n, n_fit, n_holdout, params.
    Ties in NLL go to the method listed first (temperature by default).
    """
    unknown = [m for m in methods if m not in _FITTERS]
    if unknown or not methods:
        raise ValueError(
            f"unknown calibration methods {unknown or list(methods)}; valid: {CALIBRATION_METHODS}"
        )
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction={holdout_fraction!r} must be in (0, 1)")
    z, y = _check_inputs(logits, labels)
    n_hold = math.ceil(holdout_fraction * z.size)  # how train_test_split sizes the folds
    if min(n_hold, z.size - n_hold) < 2:
        raise ValueError(
            f"calibrator.holdout_fraction = {holdout_fraction} splits the {z.size} val_calib images into folds "
            f"of {z.size - n_hold} (fit) and {n_hold} (held out); each needs at least one roadwork and one "
            f"no_roadwork image: set holdout_fraction between {2 / z.size:.2g} and {1 - 2 / z.size:.2g}, "
            f"or add images to val_calib"
        )

    fit_idx, hold_idx = train_test_split(
        np.arange(z.size), test_size=holdout_fraction, stratify=y, random_state=seed, shuffle=True
    )
    fold_fits = {m: _FITTERS[m](z[fit_idx], y[fit_idx]) for m in methods}
    nll = {m: binary_nll(cal.transform(z[hold_idx]), y[hold_idx]) for m, cal in fold_fits.items()}
    chosen = min(methods, key=lambda m: nll[m])
    calibrator = _FITTERS[chosen](z, y)

    report: dict[str, Any] = {
        "nll": nll,
        "chosen": chosen,
        "ece_before": expected_calibration_error(expit(z), y),
        "ece_after": expected_calibration_error(calibrator.transform(z), y),
        "ece_holdout_before": expected_calibration_error(expit(z[hold_idx]), y[hold_idx]),
        "ece_holdout_after": expected_calibration_error(
            fold_fits[chosen].transform(z[hold_idx]), y[hold_idx]
        ),
        "n": int(z.size),
        "n_fit": int(fit_idx.size),
        "n_holdout": int(hold_idx.size),
        "params": calibrator.params,
        "warnings": _warnings(calibrator, z, y),
    }
    return calibrator, report
