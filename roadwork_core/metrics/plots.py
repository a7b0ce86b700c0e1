"""Evaluation plots as PNG bytes: reliability diagram, risk-coverage, per-slice bars, robustness.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never pyplot, so no global
figure state leaks between assets running in one process and no display is needed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from roadwork_core.io import atomic_write_bytes
from roadwork_core.metrics.selective import optimal_generalized_risk, risk_coverage_curve

_DPI = 100


def _new_figure(width: float = 5.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(png: bytes, path: str | os.PathLike) -> Path:
    """Write PNG bytes atomically; refuses bytes that are not a PNG."""
    if not png.startswith(b"\x89PNG"):
        raise ValueError(f"refusing to write {path}: the bytes are not a PNG image (no PNG signature)")
    return atomic_write_bytes(path, png)


def reliability_diagram(p: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> bytes:
    """Observed roadwork frequency vs mean predicted P(roadwork) per equal-width bin, with counts."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)  # (N,) in [0, n_bins)
    counts = np.bincount(bin_idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bin_idx, weights=p, minlength=n_bins) / counts
        freq = np.bincount(bin_idx, weights=y, minlength=n_bins) / counts
    filled = counts > 0
    centers = (edges[:-1] + edges[1:]) / 2

    fig = _new_figure(5.0, 5.5)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.bar(centers[filled], freq[filled], width=1.0 / n_bins, alpha=0.35, edgecolor="k", label="observed")
    ax.plot(mean_p[filled], freq[filled], "o-", color="C3", label="mean p vs frequency")
    ax.set_ylabel("fraction roadwork")
    ax.set_ylim(0, 1)
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.bar(centers, counts, width=1.0 / n_bins, color="C0", edgecolor="k")
    ax_hist.set_xlabel("predicted P(roadwork)")
    ax_hist.set_ylabel("images")
    ax_hist.set_xlim(0, 1)
    return _png(fig)


def risk_coverage_plot(confidence: np.ndarray, correct: np.ndarray) -> bytes:
    """Selective and generalized risk vs coverage, with the perfect-ranking curves for reference."""
    coverage, selective, generalized = risk_coverage_curve(confidence, correct)
    error_rate = 1.0 - float(np.mean(correct)) if len(correct) else 0.0
    grid = np.linspace(0.0, 1.0, 201)
    optimal_gen = optimal_generalized_risk(grid, error_rate)
    with np.errstate(invalid="ignore", divide="ignore"):
        optimal_sel = np.where(grid > 0, optimal_gen / grid, 0.0)

    fig = _new_figure(9.0, 4.0)
    ax_sel, ax_gen = fig.subplots(1, 2)
    ax_sel.step(coverage, selective, where="post", label="model")
    ax_sel.plot(grid, optimal_sel, ls="--", color="grey", label="optimal")
    ax_sel.set_title("Selective risk (error among accepted)")
    ax_gen.plot(np.r_[0.0, coverage], np.r_[0.0, generalized], label="model")
    ax_gen.plot(grid, optimal_gen, ls="--", color="grey", label="optimal (AUGRC = ½π²)")
    ax_gen.set_title("Generalized risk (accepted and wrong / all)")
    for ax in (ax_sel, ax_gen):
        ax.set_xlabel("coverage")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return _png(fig)


def slice_bars(slices: pd.DataFrame, metric: str = "accuracy") -> bytes:
    """Horizontal bars of `metric` per slice (column=value), labelled with each slice's n."""
    if metric not in slices.columns:
        raise ValueError(f"slice_bars: metric {metric!r} is not a slice column (have {list(slices.columns)})")
    labels = [f"{c}={v} (n={n})" for c, v, n in zip(slices["column"], slices["value"], slices["n"])]
    values = slices[metric].to_numpy(dtype=np.float64)
    color_of = {
        c: f"C{i % 10}" for i, c in enumerate(dict.fromkeys(slices["column"]))
    }  # one colour per column
    fig = _new_figure(6.0, max(2.0, 0.3 * len(labels) + 1.0))
    ax = fig.subplots()
    ax.barh(np.arange(len(labels)), np.nan_to_num(values), color=[color_of[c] for c in slices["column"]])
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} per slice" if labels else f"{metric} per slice (no slice had enough images)")
    return _png(fig)


def robustness_plot(
    robustness: pd.DataFrame, metrics: Sequence[str] = ("accuracy", "mcc", "reward_proxy", "coverage", "fnr")
) -> bytes:
    """Metrics vs distortion level (one line per metric present in the table)."""
    if "level" not in robustness.columns:
        raise ValueError(
            f"robustness_plot: the table needs a 'level' column (have {list(robustness.columns)})"
        )
    fig = _new_figure(5.5, 4.0)
    ax = fig.subplots()
    levels = robustness["level"].to_numpy()
    for metric in metrics:
        if metric in robustness.columns:
            ax.plot(levels, robustness[metric].to_numpy(dtype=np.float64), "o-", label=metric)
    ax.set_xticks(levels)
    ax.set_xlabel("distortion level")
    ax.set_ylim(0, 1.05)
    ax.set_title("Robustness by distortion level")
    ax.legend(fontsize=8)
    return _png(fig)
