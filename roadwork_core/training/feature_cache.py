"""Content-addressed cache of frozen-backbone per-view features.

key = sha256(backbone weights sha256 | image_id | view config JSON) -> one safetensors file per image
at `<root>/<key[:2]>/<key>.safetensors` holding `feats` (V, D) float32. Changing the backbone's
weights, its pooling / architecture config, the multi-view config, the compute precision or the image
decoder (`roadwork_core.data.images.DECODE_VERSION`) changes every key, so a stale cache can never hit. Files are written atomically (temp + rename) and there is
no shared index file, so concurrent runs can fill the same cache: the worst case is two runs
computing the same entry and one rename winning with identical content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import safetensors.torch
import torch
from torch.utils.data import DataLoader, Subset

from roadwork_core.config import precision_dtype
from roadwork_core.io import atomic_write_bytes

__all__ = ["FeatureCache", "feature_cache_key", "view_config_json"]


def view_config_json(model: torch.nn.Module, precision: str = "fp32") -> str:
    """Everything besides the weights that changes a feature: views, normalization, pooling, precision,
    and how image bytes are decoded (`DECODE_VERSION`)."""
    from roadwork_core.data.images import DECODE_VERSION

    backbone = model.backbone
    payload = {
        "decode_version": DECODE_VERSION,
        "views": dataclasses.asdict(model.mv),
        "canvas_size": int(model.canvas_size),
        "mean": [round(float(m), 6) for m in model.mean.flatten().tolist()],
        "std": [round(float(s), 6) for s in model.std.flatten().tolist()],
        "backbone_class": type(backbone).__name__,
        "global_pool": str(getattr(backbone, "global_pool", "")),
        "num_features": int(getattr(backbone, "num_features", 0)),
        "precision": precision,
    }
    return json.dumps(payload, sort_keys=True)


def feature_cache_key(weights_sha256: str, image_id: str, view_json: str) -> str:
    return hashlib.sha256(f"{weights_sha256}|{image_id}|{view_json}".encode()).hexdigest()


class FeatureCache:
    """`FeatureCache(root).get_or_compute(model, rows, device, batch_size) -> (N, V, D)` float32 on CPU.

    `hits` / `misses` count the entries found / computed by the last call; `backbone_batches` counts
    backbone forward passes it ran (0 when everything hit).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.backbone_batches = 0

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def keys_for(
        self, model: torch.nn.Module, image_ids: Sequence[str], precision: str = "fp32"
    ) -> list[str]:
        from roadwork_core.models.backbone import state_dict_sha256

        weights = state_dict_sha256(model.backbone)
        view_json = view_config_json(model, precision)
        return [feature_cache_key(weights, str(i), view_json) for i in image_ids]

    def _read(self, path: Path) -> torch.Tensor | None:
        """The entry's features, or None (a miss) when it is absent, foreign, unreadable or its bytes no longer
        match the digest written with it (a flipped bit at rest parsed fine and was served as a hit, so the
        head trained on damaged features); the recompute overwrites it."""
        from roadwork_core.training.checkpoint import tensors_sha256

        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get("sha256")
                feats = f.get_tensor("feats")
        except FileNotFoundError:
            return None
        except Exception:  # a foreign / corrupt file: treat as a miss; the recompute overwrites it
            return None
        if expected is None or tensors_sha256({"feats": feats}) != expected:
            return None  # entries written before the digest are recomputed once
        return feats

    @torch.no_grad()
    def get_or_compute(
        self,
        model: torch.nn.Module,
        rows: pd.DataFrame,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        *,
        precision: str = "fp32",
        num_workers: int = 0,
    ) -> torch.Tensor:
        """Features for `rows` (image_id, uri[, label]) in row order: (N, V, D) float32, CPU.

        Only missing entries go through the backbone (in eval mode, batches of `batch_size`).
        """
        from roadwork_core.data.loading import CanvasDataset
        from roadwork_core.training.checkpoint import tensors_sha256

        precision_dtype(precision)  # raises on an unknown name
        for col in ("image_id", "uri"):
            if col not in rows.columns:
                raise ValueError(
                    f"rows need an {col!r} column for the feature cache; got {list(rows.columns)}"
                )
        keys = self.keys_for(model, rows["image_id"].tolist(), precision)
        feats: list[torch.Tensor | None] = [self._read(self.path_for(k)) for k in keys]
        missing = [i for i, f in enumerate(feats) if f is None]
        self.hits, self.misses, self.backbone_batches = len(keys) - len(missing), len(missing), 0
        if missing:
            labels = rows["label"].tolist() if "label" in rows.columns else [0] * len(rows)
            # each read checks the bytes against the image_id the features are cached under
            dataset = CanvasDataset(
                rows["uri"].tolist(), labels, model.canvas_size, None, image_ids=rows["image_id"].tolist()
            )
            loader = DataLoader(
                Subset(dataset, missing), batch_size=batch_size, shuffle=False, num_workers=num_workers
            )
            was_training = model.training
            model.eval()
            dtype = precision_dtype(precision)
            device = torch.device(device)
            try:
                for canvas, _, index in loader:
                    x = canvas.to(device).float() / 255.0  # (B, 3, C, C)
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        batch_feats = model.forward_features(x)  # (B, V, D)
                    self.backbone_batches += 1
                    for i, f in zip(index.tolist(), batch_feats.float().cpu()):
                        f = f.contiguous()
                        digest = {"sha256": tensors_sha256({"feats": f})}
                        atomic_write_bytes(
                            self.path_for(keys[i]), safetensors.torch.save({"feats": f}, metadata=digest)
                        )
                        feats[i] = f
            finally:
                model.train(was_training)
        return torch.stack(feats)  # type: ignore[arg-type]  # (N, V, D)
