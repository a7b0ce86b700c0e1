"""RoadworkClassifier: backbone over all views in one forward, a linear head per view, an aggregator.

canvas (B, 3, C, C) float in [0, 1]
  -> normalize (mean / std from the backbone's pretrained_cfg)
  -> extract_views -> (B, V, 3, S, S) -> ONE backbone forward on (B*V, 3, S, S) -> feats (B, V, D)
  -> head (Dropout, Linear(D, 1)) -> view_logits (B, V)
  -> (hflip_tta) each view fused with its flip -> (B, V/2)
  -> aggregator -> logit (B,), prob (B,)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from roadwork_core.config import HeadConfig
from roadwork_core.models.aggregators import create_aggregator
from roadwork_core.models.backbone import BackboneConfig, backbone_data_config, create_backbone
from roadwork_core.models.multiview import (
    MultiViewConfig,
    extract_views,
    merge_flipped_views,
    num_views,
    resolve_canvas_size,
)

__all__ = ["HeadConfig", "RoadworkClassifier", "build_classifier", "classifier_config_dict"]


class RoadworkClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        mv: MultiViewConfig,
        *,
        aggregator: str = HeadConfig.aggregator,
        topk: int = HeadConfig.topk,
        dropout: float = HeadConfig.dropout,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        backbone_cfg: BackboneConfig | None = None,
    ) -> None:
        super().__init__()
        if mean is None or std is None:
            data_cfg = backbone_data_config(backbone)
            mean = data_cfg["mean"] if mean is None else mean
            std = data_cfg["std"] if std is None else std
        dim = int(backbone.num_features)
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, 1))
        self.aggregator = create_aggregator(aggregator, dim, topk=topk)
        self.mv = mv
        self.aggregator_name = aggregator
        self.topk = topk
        self.dropout = dropout
        self.backbone_cfg = backbone_cfg
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # inference: crops per backbone call; "auto" = auto_views_per_call (CPU), None = all in one call
        self.views_per_call: int | str | None = "auto"

    @property
    def num_views(self) -> int:
        return num_views(self.mv)

    @property
    def canvas_size(self) -> int:
        """Side of the square canvas `forward` expects (what load_canvas should produce)."""
        return resolve_canvas_size(self.mv)

    def forward_features(self, canvas: torch.Tensor) -> torch.Tensor:
        """(B, 3, C, C) float in [0, 1] -> per-view features (B, V, D)."""
        x = (canvas - self.mean) / self.std
        views = extract_views(x, self.mv)  # (B, V, 3, S, S)
        B, V = views.shape[:2]
        feats = self._backbone_views(views.flatten(0, 1))  # (B*V, D): every view of the batch
        return feats.reshape(B, V, -1)

    def _backbone_views(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D): one backbone call, or while autograd is off (inference) calls of at most
        `views_per_call` crops ("auto": `auto_views_per_call`). Same features either way: each crop's
        forward is independent. Training keeps one call (its graph spans every view)."""
        chunk = self.views_per_call
        if chunk == "auto":
            chunk = auto_views_per_call(self.backbone, crops)
        if chunk is None or torch.is_grad_enabled() or len(crops) <= chunk:
            return self.backbone(crops)
        return torch.cat([self.backbone(part) for part in crops.split(chunk)])

    def forward_head(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """feats (B, V, D) -> {"view_logits": (B, V), "logit": (B,), "prob": (B,)}.

        view_logits keeps every view (flips too); the aggregator sees each view fused with its flip.
        """
        view_logits = self.head(feats).squeeze(-1)  # (B, V)
        logit, prob = self.aggregator(*merge_flipped_views(view_logits, feats, self.mv))
        return {"view_logits": view_logits, "logit": logit, "prob": prob}

    def forward(self, canvas: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.forward_features(canvas)
        return {**self.forward_head(feats), "feats": feats}


# The MLP activation one CPU backbone call may hold (bytes). On an idle 2-core EPYC (512 KiB L2 a core,
# 32 MiB L3) one ViT-S/14 call on 40 crops of 224 px (~63 MB per MLP activation) ran 0.85x a loop over
# the 10 views of 4 images: matmuls and attention cost the same, but copy_ took 3.7x, gelu 2.4x, add 1.5x
# and layer_norm 1.3x as long (`python -m bench.bench_multiview --profile`), the elementwise work streaming
# from memory instead of cache. Calls of 4 crops (~6 MB) ran 1.10x the loop (1.29x the one call), while
# the tiny test ViT (~50 KB a crop) is fastest in one call (3.5x the loop). 8 MiB keeps both.
CPU_CALL_BYTES = 8 * 2**20


def auto_views_per_call(backbone: nn.Module, crops: torch.Tensor) -> int | None:
    """Crops per backbone call for inference on `crops` (N, 3, S, S): on CPU as many as keep one MLP
    activation (tokens x hidden width x element size) within CPU_CALL_BYTES; elsewhere None (one call:
    a GPU wants the largest batch)."""
    if crops.device.type != "cpu":
        return None
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", (16, 16))
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    tokens = (crops.shape[-2] // patch[0]) * (crops.shape[-1] // patch[1]) + int(
        getattr(backbone, "num_prefix_tokens", 1)
    )
    width = int(getattr(backbone, "embed_dim", getattr(backbone, "num_features", 384)))
    fc1 = next((m for name, m in backbone.named_modules() if name.endswith("mlp.fc1")), None)
    hidden = int(fc1.out_features) if isinstance(fc1, nn.Linear) else 4 * width
    return max(1, CPU_CALL_BYTES // (tokens * hidden * crops.element_size()))


def build_classifier(
    backbone_cfg: BackboneConfig, mv_cfg: MultiViewConfig | None = None, **kw: Any
) -> RoadworkClassifier:
    """Backbone from `backbone_cfg` + multi-view + head. kw: aggregator, topk, dropout, mean, std.

    The view size defaults to the backbone's input size (`mv_cfg=None` or `mv_cfg.view_size=None`);
    an explicit view size must match a fixed-size backbone.
    """
    backbone = create_backbone(backbone_cfg)
    input_size = backbone_data_config(backbone)["input_size"][-1]
    if mv_cfg is None:
        mv_cfg = MultiViewConfig(view_size=input_size)
    elif mv_cfg.view_size is None:
        mv_cfg = dataclasses.replace(mv_cfg, view_size=input_size)
    elif mv_cfg.view_size != input_size and not getattr(backbone, "dynamic_img_size", False):
        raise ValueError(
            f"MultiViewConfig.view_size={mv_cfg.view_size} but backbone {backbone_cfg.name!r} takes fixed "
            f"{input_size}x{input_size} inputs. Set view_size={input_size}, or BackboneConfig.img_size="
            f"{mv_cfg.view_size}."
        )
    return RoadworkClassifier(backbone, mv_cfg, backbone_cfg=backbone_cfg, **kw)


def classifier_config_dict(model: RoadworkClassifier) -> dict[str, Any]:
    """JSON-serialisable dict that rebuilds the architecture: build_classifier(BackboneConfig(**d["backbone"]),
    MultiViewConfig(**d["multiview"]), aggregator=..., topk=..., dropout=..., mean=..., std=...).
    """
    if model.backbone_cfg is None:
        raise ValueError(
            "classifier_config_dict needs the BackboneConfig the model was built from; build it with "
            "build_classifier(...) or pass RoadworkClassifier(..., backbone_cfg=cfg)."
        )
    return {
        "backbone": dataclasses.asdict(model.backbone_cfg),
        "multiview": dataclasses.asdict(model.mv),
        "aggregator": model.aggregator_name,
        "topk": model.topk,
        "dropout": model.dropout,
        "mean": [float(m) for m in model.mean.flatten().tolist()],
        "std": [float(s) for s in model.std.flatten().tolist()],
    }
