"""Binary classification and calibration metrics for P(roadwork).

One function, `classification_metrics`, returns every point metric the evaluation report shows.
Threshold metrics (accuracy, MCC, F1) and ranking metrics (AUROC, AUPRC) come from torchmetrics'
functional API. ECE / MCE are top-label (Guo et al. 2017): the confidence max(p, 1-p) against
correctness (the hard label equals the label), in 15 equal-width bins, via torchmetrics'
`multiclass_calibration_error` on the two-column [1 - p, p]. torchmetrics' `binary_calibration_error`
bins p against the label instead, a different number (0.130 vs 0.061 on one val_test), and is not
reported. ACE (adaptive, equal-mass bins; also top-label for a 1-D p) from netcal. Undefined metrics are NaN, never an exception: AUROC needs
both classes, AUPRC needs a positive, MCC needs both classes in the labels, everything needs n > 0.

`reward_proxy` is the NATIX StreetVision subnet's per-miner score, (0.5·MCC + 0.5·accuracy)^3.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torchmetrics.functional.classification as tmf
from netcal.metrics import ACE

from roadwork_core.contracts.labels import HARD_LABEL_THRESHOLD, hard_label

N_CALIBRATION_BINS = 15
# log loss clips probabilities the way sklearn does for float64 (machine epsilon)
_NLL_EPS = float(np.finfo(np.float64).eps)

METRIC_NAMES: tuple[str, ...] = (
    "n",
    "positive_rate",
    "accuracy",
    "mcc",
    "f1",
    "auroc",
    "auprc",
    "brier",
    "nll",
    "ece",
    "mce",
    "ace",
    "reward_proxy",
)


def validate_probabilities(
    p: np.ndarray, labels: np.ndarray, *, what: str = "p"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (p float64, labels int64) after checking shape, range and label values.

    Raises ValueError naming the first bad row and value.
    """
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    labels_arr = np.asarray(labels).reshape(-1)
    if p.shape != labels_arr.shape:
        raise ValueError(
            f"{what} has {p.shape[0]} values but labels has {labels_arr.shape[0]}; pass one probability per label"
        )
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what}[{i}] = {p[i].item()!r} is not a probability in [0, 1] ({int(bad.sum())} bad rows); "
            "pass calibrated probabilities, not logits"
        )
    if labels_arr.size and not np.isin(labels_arr, (0, 1)).all():
        i = int(np.flatnonzero(~np.isin(labels_arr, (0, 1)))[0])
        raise ValueError(
            f"labels[{i}] = {labels_arr[i].item()!r}; labels must be 0 (no_roadwork) or 1 (roadwork)"
        )
    return p, labels_arr.astype(np.int64)


def reward_proxy(mcc: float, accuracy: float) -> float:
    """NATIX StreetVision reward: (0.5·max(MCC, 0) + 0.5·accuracy)^3, MCC clipped at 0 as the validator does
    (NaN if either is NaN)."""
    if math.isnan(mcc) or math.isnan(accuracy):
        return math.nan
    return float((0.5 * max(mcc, 0.0) + 0.5 * accuracy) ** 3)


@contextlib.contextmanager
def _torch_single_thread() -> Iterator[None]:
    # Metric tensors hold a few thousand elements: intra-op threads only add sync cost, and on a
    # loaded 2-core machine torch.bucketize (the calibration binning) went from ~10 µs to ~15 ms per
    # call with 2 threads. Setting and restoring the thread count costs microseconds.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def top_label_calibration_error(
    p: np.ndarray, labels: np.ndarray, n_bins: int = N_CALIBRATION_BINS, norm: str = "l1"
) -> float:
    """ECE (norm "l1") or MCE ("max") of max(p, 1-p) against hard_label(p) == label, equal-width bins.

    argmax of [1 - p, p] picks column 0 on a tie (torch returns the first maximum), so p = 0.5 is
    no_roadwork here too, as in `hard_label`.
    """
    probs = torch.stack([1.0 - torch.as_tensor(p), torch.as_tensor(p)], dim=1)  # (N, 2)
    target = torch.as_tensor(labels, dtype=torch.int64)
    with _torch_single_thread():
        return float(
            tmf.multiclass_calibration_error(
                probs, target, num_classes=2, n_bins=n_bins, norm=norm, validate_args=False
            )
        )


def _ace(p: np.ndarray, labels: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # netcal warns about empty bins on small samples
        return float(ACE(bins=N_CALIBRATION_BINS).measure(p, labels))


def classification_metrics(
    p: np.ndarray, labels: np.ndarray, threshold: float = HARD_LABEL_THRESHOLD
) -> dict[str, float]:
    """Point metrics of calibrated probabilities `p` (N,) against 0/1 `labels` (N,).

    Keys: METRIC_NAMES. Hard prediction is `hard_label(p, threshold)`, p > threshold (0.5 counts as
    no_roadwork, as in torchmetrics and the validator's np.round). NaN where a metric is undefined.
    """
    p, y = validate_probabilities(p, labels)
    n = int(p.shape[0])
    out = dict.fromkeys(METRIC_NAMES, math.nan)
    out["n"] = n
    if n == 0:
        return out
    n_pos = int(y.sum())
    both_classes = 0 < n_pos < n
    preds, target = torch.from_numpy(p), torch.from_numpy(y)
    pred_pos = int(hard_label(p, threshold).sum())

    out["positive_rate"] = n_pos / n
    with _torch_single_thread():
        out["accuracy"] = float(tmf.binary_accuracy(preds, target, threshold=threshold, validate_args=False))
        # MCC's denominator is zero when the labels hold one class: undefined, not 0. When only the
        # predictions hold one class it is 0 (sklearn's and the validator's convention; torchmetrics returns
        # +-0.28 for 7 positives of 10 all predicted roadwork, which a constant model would win on).
        if both_classes:
            out["mcc"] = (
                float(tmf.binary_matthews_corrcoef(preds, target, threshold=threshold, validate_args=False))
                if 0 < pred_pos < n
                else 0.0
            )
        # F1 is undefined when there is neither a positive label nor a positive prediction
        if n_pos + pred_pos > 0:
            out["f1"] = float(tmf.binary_f1_score(preds, target, threshold=threshold, validate_args=False))
        if both_classes:
            out["auroc"] = float(tmf.binary_auroc(preds, target, validate_args=False))
        if n_pos > 0:
            out["auprc"] = float(tmf.binary_average_precision(preds, target, validate_args=False))
    out["ece"] = top_label_calibration_error(p, y, norm="l1")
    out["mce"] = top_label_calibration_error(p, y, norm="max")
    out["brier"] = float(np.mean((p - y) ** 2))
    pc = np.clip(p, _NLL_EPS, 1.0 - _NLL_EPS)
    out["nll"] = float(-np.mean(y * np.log(pc) + (1 - y) * np.log1p(-pc)))
    out["ace"] = _ace(p, y)
    out["reward_proxy"] = reward_proxy(out["mcc"], out["accuracy"])
    return out
