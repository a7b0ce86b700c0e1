"""Plots of the pipeline's other stages, as PNG bytes: split composition, ExPLoRA's SSL loss,
the classifier's training curves and each policy's risk-coverage curve with its chosen thresholds.

Same figure machinery as `plots` (Figure + Agg canvas, never pyplot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from roadwork_core.metrics.plots import _new_figure, _png

SPLIT_ORDER = ("train", "val_select", "val_calib", "val_test")


def split_composition(table: pd.DataFrame) -> bytes:
    """Stacked bars of images per split, by label (0 no_roadwork, 1 roadwork), counts on the bars."""
    for col in ("split", "label"):
        if col not in table.columns:
            raise ValueError(
                f"split_composition: the splits table needs a {col!r} column (have {list(table.columns)})"
            )
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    order = [s for s in SPLIT_ORDER if s in counts.index] + sorted(set(counts.index) - set(SPLIT_ORDER))
    counts = counts.reindex(order)
    fig = _new_figure(6.0, 3.5)
    ax = fig.subplots()
    bottom = np.zeros(len(order))
    for label, name, color in ((0, "no_roadwork", "C0"), (1, "roadwork", "C1")):
        values = counts[label].to_numpy() if label in counts.columns else np.zeros(len(order))
        bars = ax.bar(order, values, bottom=bottom, label=name, color=color)
        ax.bar_label(bars, labels=[str(int(v)) if v else "" for v in values], label_type="center", fontsize=8)
        bottom += values
    ax.set_ylabel("images")
    ax.set_title(f"Split composition ({int(bottom.sum())} images)")
    ax.legend(fontsize=8)
    return _png(fig)


def ssl_loss_curve(loss: Sequence[float]) -> bytes:
    """ExPLoRA's DINO self-distillation loss per step."""
    fig = _new_figure(5.5, 3.5)
    ax = fig.subplots()
    ax.plot(np.arange(1, len(loss) + 1), np.asarray(loss, dtype=np.float64), color="C2")
    ax.set_xlabel("step")
    ax.set_ylabel("DINO loss")
    ax.set_title(f"ExPLoRA self-supervised loss ({len(loss)} steps)")
    return _png(fig)


def training_curves(history: Sequence[Mapping], best_epoch: int | None = None) -> bytes:
    """Train loss and val_select MCC / accuracy per epoch, the selected epoch marked."""
    frame = pd.DataFrame(list(history))
    if frame.empty or "epoch" not in frame.columns:
        raise ValueError("training_curves: the history has no epochs (each row needs an 'epoch')")
    fig = _new_figure(9.0, 3.5)
    ax_loss, ax_sel = fig.subplots(1, 2)
    ax_loss.plot(frame["epoch"], frame["train_loss"], "o-", color="C0")
    ax_loss.set_title("train loss")
    for col, color in (("select_mcc", "C3"), ("select_acc", "C1")):
        if col in frame.columns:
            ax_sel.plot(
                frame["epoch"], frame[col], "o-", color=color, label=col.replace("select_", "val_select ")
            )
    ax_sel.set_title("val_select")
    ax_sel.set_ylim(min(0.0, float(frame.get("select_mcc", pd.Series([0.0])).min())), 1.0)
    for ax in (ax_loss, ax_sel):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch is not None:
            ax.axvline(best_epoch, ls="--", color="grey", label=f"selected epoch {best_epoch}")
    ax_sel.legend(fontsize=8)
    return _png(fig)


@dataclass(frozen=True)
class PolicyCurve:
    """FNR among accepted roadwork images vs coverage when the most confident images are accepted
    first (the policy's own confidence and roadwork rule), and the policy's operating point."""

    coverage: np.ndarray  # (N,) after accepting the top 1..N images
    fnr_accepted: np.ndarray  # (N,) NaN while no roadwork image is accepted
    point_coverage: float
    point_fnr_accepted: float
    thresholds: dict[str, float]
    title: str
    alpha: float | None


def _confidence_rule(policy, p: np.ndarray, features: Mapping[str, np.ndarray]):
    """(confidence, larger = more confident; roadwork threshold on p; named thresholds; title; alpha)."""
    kind = getattr(policy, "policy", None)
    if kind == "scrc":
        sign = 1.0 if policy.higher_is_confident else -1.0
        confidence = sign * np.asarray(features[policy.confidence_feature], dtype=np.float64)
        title = f"scrc ({policy.mode}), confidence {policy.confidence_feature}"
        return confidence, policy.lambda2, {"λ1": policy.lambda1, "λ2": policy.lambda2}, title, policy.alpha
    if kind == "gate":
        confidence = -policy.failure_score(p, features)
        thresholds = {"gate": policy.gate_threshold, "p": policy.decision_threshold}
        return confidence, policy.decision_threshold, thresholds, "gate, confidence 1 - failure score", None
    if kind == "threshold":
        confidence = np.maximum(p - policy.t_pos, policy.t_neg - p)  # >= 0 exactly outside the defer band
        thresholds = {"t_neg": policy.t_neg, "t_pos": policy.t_pos}
        return (
            confidence,
            policy.t_pos,
            thresholds,
            "threshold, confidence = distance from the defer band",
            None,
        )
    raise ValueError(f"policy_curve: unknown policy {kind!r}; expected threshold, gate or scrc")


def policy_curve(
    policy, p: np.ndarray, features: Mapping[str, np.ndarray], labels: np.ndarray
) -> PolicyCurve:
    """The risk-coverage curve of a fitted policy (threshold, gate or scrc) on its calibration images."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    confidence, roadwork_threshold, thresholds, title, alpha = _confidence_rule(policy, p, features)
    order = np.argsort(-confidence, kind="stable")
    pos = y[order] == 1
    n_pos_acc, n_missed = np.cumsum(pos), np.cumsum(pos & (p[order] < roadwork_threshold))
    with np.errstate(invalid="ignore", divide="ignore"):
        fnr = np.where(n_pos_acc > 0, n_missed / np.maximum(n_pos_acc, 1), np.nan)

    decisions = np.asarray(policy.decide(p, features)).astype(str)
    accepted = decisions != "defer"
    acc_pos = accepted & (y == 1)
    return PolicyCurve(
        coverage=np.arange(1, len(y) + 1) / max(1, len(y)),
        fnr_accepted=fnr,
        point_coverage=float(accepted.mean()) if len(y) else float("nan"),
        point_fnr_accepted=float((decisions[acc_pos] == "no_roadwork").mean())
        if acc_pos.any()
        else float("nan"),
        thresholds={k: float(v) for k, v in thresholds.items()},
        title=title,
        alpha=alpha,
    )


def policy_plot(policy, p: np.ndarray, features: Mapping[str, np.ndarray], labels: np.ndarray) -> bytes:
    """`policy_curve` drawn: the curve, the chosen thresholds' operating point and the risk target α."""
    curve = policy_curve(policy, p, features, labels)
    fig = _new_figure(5.5, 4.0)
    ax = fig.subplots()
    ax.plot(curve.coverage, curve.fnr_accepted, color="C0", label="accept most confident first")
    if curve.alpha is not None:
        ax.axhline(curve.alpha, ls="--", color="C3", label=f"α = {curve.alpha:g}")
    chosen = ", ".join(f"{k} = {v:.3g}" for k, v in curve.thresholds.items())
    ax.plot(
        [curve.point_coverage], [curve.point_fnr_accepted], "o", color="k", ms=8, label=f"chosen: {chosen}"
    )
    ax.axvline(curve.point_coverage, ls=":", color="k")
    ax.set_xlabel("coverage (fraction not deferred)")
    ax.set_ylabel("FNR among accepted roadwork images")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(curve.title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)
