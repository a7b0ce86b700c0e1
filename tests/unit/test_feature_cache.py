"""FeatureCache: content-addressed hits / misses, invalidation by weights and view config."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

from roadwork_core.data.loading import load_canvas
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.multiview import MultiViewConfig
from roadwork_core.training.feature_cache import FeatureCache


def _rows(tmp_path: Path, n: int = 5) -> pd.DataFrame:
    tmp_path.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img = PIL.Image.new("RGB", (40, 40), (80 + 10 * i, 110, 140))
        PIL.ImageDraw.Draw(img).polygon([(5, 35), (5 + 3 * i, 8), (30, 35)], fill=(255, 140, 0))
        path = tmp_path / f"img{i}.jpg"
        img.save(path, quality=90)
        records.append({"image_id": f"id{i}", "uri": str(path), "label": i % 2})
    return pd.DataFrame(records)


def _model(grid: int = 2, overlap: float = 0.15):
    torch.manual_seed(0)
    return build_classifier(
        BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32, grid=grid, overlap=overlap)
    )


def test_cache_hits_after_first_compute_and_matches_model(tmp_path: Path) -> None:
    rows, model = _rows(tmp_path), _model()
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_compute(model, rows, "cpu", batch_size=2)
    assert first.shape == (5, model.num_views, model.backbone.num_features), f"bad shape {tuple(first.shape)}"
    assert (cache.hits, cache.misses, cache.backbone_batches) == (0, 5, 3), (
        "first call must compute all, batched"
    )

    again = FeatureCache(tmp_path / "cache").get_or_compute(model, rows, "cpu", batch_size=2)
    assert torch.equal(first, again), "cached features differ from the computed ones"

    partial = FeatureCache(tmp_path / "cache")
    more = pd.concat([rows.iloc[[3, 1]], _rows(tmp_path / "x", 1).assign(image_id="new")], ignore_index=True)
    out = partial.get_or_compute(model, more, "cpu", batch_size=2)
    assert (partial.hits, partial.misses, partial.backbone_batches) == (2, 1, 1), (
        "only the new image may miss"
    )
    assert torch.equal(out[0], first[3]) and torch.equal(out[1], first[1]), "row order not kept"

    model.eval()
    canvas = torch.stack([load_canvas(u, model.canvas_size) for u in rows["uri"]]).float() / 255.0
    with torch.no_grad():
        direct = model.forward_features(canvas)  # (N, V, D)
    assert torch.allclose(first, direct, atol=1e-5), "cached features are not model.forward_features"
    # decoded on DataLoader workers (the classifier's num_workers in head mode): the same features
    workers = FeatureCache(tmp_path / "cache_workers").get_or_compute(
        model, rows, "cpu", batch_size=2, num_workers=2
    )
    assert torch.equal(workers, first)


def test_changed_weights_or_view_config_never_hit(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    model = _model()
    cache.get_or_compute(model, rows, "cpu", batch_size=8)

    with torch.no_grad():
        next(model.backbone.parameters()).add_(1e-3)
    cache.get_or_compute(model, rows, "cpu", batch_size=8)
    assert cache.misses == 5 and cache.hits == 0, "changed backbone weights must miss every entry"

    other_views = _model(overlap=0.3)
    cache.get_or_compute(other_views, rows, "cpu", batch_size=8)
    assert cache.misses == 5 and cache.hits == 0, "changed view config must miss every entry"

    cache.get_or_compute(_model(), rows, "cpu", batch_size=8, precision="bf16-mixed")
    assert cache.misses == 5, "another precision must miss"
    cache.get_or_compute(_model(), rows, "cpu", batch_size=8)
    assert cache.hits == 5, "the original weights + views must still hit"


def test_corrupt_entry_is_recomputed_and_bad_rows_fail(tmp_path: Path) -> None:
    rows, model = _rows(tmp_path, 2), _model()
    cache = FeatureCache(tmp_path / "cache")
    good = cache.get_or_compute(model, rows, "cpu")
    key = cache.keys_for(model, ["id0"])[0]
    cache.path_for(key).write_bytes(b"not safetensors")
    fixed = cache.get_or_compute(model, rows, "cpu")
    assert cache.misses == 1 and torch.equal(fixed, good), "a corrupt entry must be recomputed"
    assert not list((tmp_path / "cache").rglob(".tmp-*")), "temporary files left behind"
    with pytest.raises(ValueError, match="uri"):
        cache.get_or_compute(model, rows.drop(columns=["uri"]), "cpu")
    # a bit flipped at rest: the file still parses, and its features (x2 on one value) were served as a hit
    path = cache.path_for(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last float's exponent bit
    path.write_bytes(bytes(data))
    again = cache.get_or_compute(model, rows, "cpu")
    assert cache.misses == 1 and torch.equal(again, good), "a damaged entry must be recomputed"


def test_a_file_replaced_after_hashing_is_refused_not_cached_under_the_old_id(tmp_path: Path) -> None:
    """Another image copied over a train image after image_table hashed it: training, prediction and the
    cache read it under the old image_id (its split, its cached features). Each read now checks."""
    import hashlib
    import shutil

    from roadwork_core.data.loading import CanvasDataset, ImageChanged
    from roadwork_core.models.predict import predict_frame

    rows = _rows(tmp_path)
    rows["image_id"] = [hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in rows["uri"]]
    rows["split"] = "val_test"
    dataset = CanvasDataset(rows["uri"].tolist(), None, 64, image_ids=rows["image_id"].tolist())
    assert dataset[2][0].shape == (3, 64, 64)  # unchanged files read as before
    shutil.copy(rows["uri"][4], rows["uri"][2])  # a val_test image's bytes under a train image's name
    with pytest.raises(ImageChanged, match=r"img2\.jpg: the file changed since image_table hashed it"):
        dataset[2]
    model, cache = _model(), FeatureCache(tmp_path / "cache")
    with pytest.raises(ImageChanged, match="img2.jpg"):
        cache.get_or_compute(model, rows, "cpu", batch_size=8)
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "nothing may be cached from that batch"
    with pytest.raises(ImageChanged, match="img2.jpg"):
        predict_frame(model, rows)


def test_a_decoder_change_misses_the_cache(tmp_path: Path, monkeypatch) -> None:
    """Features cached when the same bytes decoded to other pixels (before a colour-profile fix) must not
    be served to a training that now decodes them differently."""
    import roadwork_core.data.images as images

    rows, model = _rows(tmp_path), _model()
    FeatureCache(tmp_path / "cache").get_or_compute(model, rows, "cpu", batch_size=8)
    monkeypatch.setattr(images, "DECODE_VERSION", images.DECODE_VERSION + 1)
    again = FeatureCache(tmp_path / "cache")
    again.get_or_compute(model, rows, "cpu", batch_size=8)
    assert (again.hits, again.misses) == (0, len(rows)), "a new decoder must recompute every feature"
