"""Batch prediction: a frame of images -> the predictions table (roadwork_core.contracts.predictions).

`uncertainty_features` is the single definition of the per-image uncertainty features; the bundle
reuses it at serving time so that the gate / SCRC policies see the same numbers they were fit on.
"""

from __future__ import annotations

import contextlib

import pandas as pd
import torch
from torch.utils.data import DataLoader

from roadwork_core.contracts.labels import hard_label
from roadwork_core.contracts.predictions import PREDICTION_COLUMNS, UNCERTAINTY_FEATURES
from roadwork_core.data.loading import CanvasDataset
from roadwork_core.models.classifier import RoadworkClassifier
from roadwork_core.models.multiview import MultiViewConfig

__all__ = ["predict_frame", "uncertainty_features"]

_EPS = 1e-7
_REQUIRED_ROWS = ("image_id", "uri", "label", "split")


def uncertainty_features(
    prob: torch.Tensor, view_probs: torch.Tensor, mv: MultiViewConfig
) -> dict[str, torch.Tensor]:
    """prob (B,) aggregated, view_probs (B, V) in the view order of `mv` -> {feature: (B,)}.

    Without a global view `global_tile_disagreement` is 0 (there is nothing to disagree with).
    """
    prob = prob.float()
    view_probs = view_probs.float()
    p = prob.clamp(_EPS, 1.0 - _EPS)
    hard = hard_label(prob)  # (B,)
    view_hard = hard_label(view_probs)  # (B, V)
    if mv.include_global:
        # Views: [global, tiles...] and, with hflip TTA, the same again flipped.
        n = 1 + mv.grid * mv.grid
        copies = view_probs.reshape(view_probs.shape[0], -1, n)  # (B, 1 or 2, 1 + g*g)
        p_global = copies[:, :, 0].mean(dim=1)
        p_tiles = copies[:, :, 1:].mean(dim=(1, 2))
        global_tile = (p_global - p_tiles).abs()
    else:
        global_tile = torch.zeros_like(prob)
    features = {
        "max_prob": torch.maximum(prob, 1.0 - prob),
        "entropy": -(p * p.log() + (1.0 - p) * (1.0 - p).log()),
        "margin": (2.0 * prob - 1.0).abs(),
        "view_var": view_probs.var(dim=1, unbiased=False),
        "view_disagreement": (view_hard != hard[:, None]).float().mean(dim=1),
        "global_tile_disagreement": global_tile,
    }
    return {name: features[name] for name in UNCERTAINTY_FEATURES}


@torch.no_grad()
def predict_frame(
    model: RoadworkClassifier,
    rows: pd.DataFrame,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """rows (image_id, uri, label, split) -> DataFrame with PREDICTION_COLUMNS, one row per input row."""
    missing = [c for c in _REQUIRED_ROWS if c not in rows.columns]
    if missing:
        raise ValueError(f"predict_frame: rows lack column(s) {missing}; it needs {list(_REQUIRED_ROWS)}")
    device = torch.device(device)
    model = model.to(device).eval()
    dataset = CanvasDataset(
        rows["uri"].astype(str).tolist(),
        None,
        model.canvas_size,
        image_ids=rows["image_id"].astype(str).tolist(),
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    logits, view_probs, features = [], [], {name: [] for name in UNCERTAINTY_FEATURES}
    for canvas, _, _ in loader:
        with autocast:
            out = model(canvas.to(device, non_blocking=True).float() / 255.0)
        batch_view_probs = out["view_logits"].float().sigmoid()  # (B, V)
        batch_prob = out["prob"].float()  # (B,)
        for name, value in uncertainty_features(batch_prob, batch_view_probs, model.mv).items():
            features[name].append(value.cpu())
        logits.append(out["logit"].float().cpu())
        view_probs.append(batch_view_probs.cpu())
    n = len(rows)
    logit = torch.cat(logits) if n else torch.zeros(0)
    table = pd.DataFrame(
        {
            "image_id": rows["image_id"].to_numpy(),
            "split": rows["split"].astype(str).to_numpy(),
            "label": rows["label"].astype(int).to_numpy(),
            "logit": logit.numpy().astype("float64"),
            "p_raw": logit.sigmoid().numpy().astype("float64"),
            "view_probs": [v.tolist() for v in torch.cat(view_probs)] if n else [],
            **{
                name: (torch.cat(vals).numpy().astype("float64") if n else [])
                for name, vals in features.items()
            },
        }
    )
    return table[list(PREDICTION_COLUMNS)]
