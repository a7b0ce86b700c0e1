"""Compare monitored (incoming, unlabelled) images with a bundle's training images.

Both sides go through the released bundle: the embedding of an image is its per-view backbone
features averaged over views (`model.forward_features`), its score the bundle's calibrated
P(roadwork). `drift_report` then tests embeddings with MMD (permutation test) and scores with PSI
and KS (roadwork_core.metrics.drift).

The training reference is a deterministic sample of the `train` split. Its embeddings and scores
are cached in `cache_dir` as one safetensors file keyed by the bundle's manifest content hash and
the sampled image ids, so a drift check re-embeds only the monitored images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from roadwork_core.bundle.bundle import Bundle
from roadwork_core.data.loading import load_canvas
from roadwork_core.io import atomic_write_bytes
from roadwork_core.metrics.drift import DriftResult, drift_report

__all__ = ["compare_with_training", "embed_images", "sample_rows"]

CACHE_FORMAT = "roadwork-drift-reference-v1"


def sample_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic sample of min(sample, n) rows out of n."""
    if sample < 2:
        raise ValueError(f"sample={sample}: the drift tests need at least 2 images per side")
    if n <= sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


@torch.inference_mode()
def embed_images(bundle: Bundle, uris: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uris -> (embeddings (N, D) float32: view-mean backbone features, scores (N,) float64: p_roadwork).

    A file that cannot be decoded raises, naming the file: a drift figure over a silently smaller
    sample would not say what it measured.
    """
    model = bundle.model
    C = model.canvas_size
    embeddings, scores = [], []
    for start in range(0, len(uris), batch_size):
        canvases = []
        for uri in uris[start : start + batch_size]:
            try:
                canvases.append(load_canvas(uri, C))
            except (ValueError, OSError) as err:
                raise ValueError(
                    f"drift check: cannot read image {uri!r} ({err}); remove or replace it and re-run"
                ) from err
        canvas = torch.stack(canvases)  # (B, 3, C, C) uint8
        x = canvas.to(bundle.device).float().div_(255.0)
        with torch.no_grad():
            out = model(x)  # ONE backbone forward gives both the features and the logit
        embeddings.append(out["feats"].float().mean(dim=1).cpu().numpy())  # (B, V, D) -> (B, D)
        logit = out["logit"].double().cpu().numpy()  # (B,); calibrated exactly as Bundle.predict_canvas does
        scores.append(np.clip(np.asarray(bundle.calibrator.transform(logit), dtype=np.float64), 0.0, 1.0))
    if not embeddings:
        raise ValueError("drift check: no images to embed")
    return np.concatenate(embeddings).astype(np.float32), np.concatenate(scores).astype(np.float64)


def _reference_key(bundle: Bundle, image_ids: Sequence[str]) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{bundle.manifest.content_sha256}|".encode())
    h.update("\n".join(image_ids).encode())
    return h.hexdigest()


def _reference(bundle: Bundle, train: pd.DataFrame, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and scores of the sampled train rows, read from or written to the cache."""
    key = _reference_key(bundle, list(train["image_id"].astype(str)))
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            cached = load_safetensors(path.read_bytes())
            emb, scores = cached["embeddings"].numpy(), cached["scores"].numpy()
            if len(emb) == len(scores) == len(train):
                return emb, scores
        except (OSError, KeyError, safetensors.SafetensorError):
            pass  # unreadable or foreign cache entry: recompute and overwrite it
    emb, scores = embed_images(bundle, list(train["uri"].astype(str)))
    data = save_safetensors(
        {"embeddings": torch.from_numpy(emb), "scores": torch.from_numpy(scores)},
        metadata={"format": CACHE_FORMAT, "bundle_content_sha256": bundle.manifest.content_sha256},
    )
    atomic_write_bytes(path, data)
    return emb, scores


def compare_with_training(
    bundle_dir: Path,
    splits: pd.DataFrame,
    monitor_uris: list[str],
    *,
    sample: int = 64,
    alpha: float = 0.01,
    psi_threshold: float = 0.25,
    n_permutations: int = 500,
    cache_dir: Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DriftResult:
    """Drift of `monitor_uris` against the bundle's training images (`splits` rows with split == "train").

    The bundle runs on `device` (drift_job: the gpu resource's). Each side is a deterministic sample of at
    most `sample` images (seeded by `seed`; the train side
    sorted by image_id first, so row order does not matter).
    """
    missing = [c for c in ("image_id", "split", "uri") if c not in splits.columns]
    if missing:
        raise ValueError(
            f"drift check: the splits table lacks columns {missing}; pass the `splits` asset's table"
        )
    train = splits.loc[splits["split"].astype(str) == "train"].sort_values("image_id", kind="stable")
    if len(train) < 2:
        raise ValueError(
            f"drift check: the splits table has {len(train)} train rows; at least 2 are needed "
            "(materialize `splits` for a dataset version with training images)"
        )
    if len(monitor_uris) < 2:
        raise ValueError(f"drift check: {len(monitor_uris)} monitored images; at least 2 are needed")
    train = train.iloc[sample_rows(len(train), sample, seed)]
    monitored = sorted(monitor_uris)
    monitored = [monitored[i] for i in sample_rows(len(monitored), sample, seed + 1)]

    bundle = Bundle.load(bundle_dir, device=device)
    ref_emb, ref_scores = _reference(bundle, train, cache_dir)
    cur_emb, cur_scores = embed_images(bundle, monitored)
    return drift_report(
        ref_emb,
        cur_emb,
        ref_scores,
        cur_scores,
        alpha=alpha,
        psi_threshold=psi_threshold,
        n_permutations=n_permutations,
        seed=seed,
    )
