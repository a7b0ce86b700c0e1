"""Classifier: one batched backbone forward, aggregator properties, config round trip, loading, predict."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from roadwork_core.contracts.predictions import PREDICTION_COLUMNS, UNCERTAINTY_FEATURES
from roadwork_core.data.loading import CanvasDataset, cache_canvases, load_canvas, pil_to_canvas
from roadwork_core.models.aggregators import AGGREGATORS, create_aggregator
from roadwork_core.models.backbone import BackboneConfig, backbone_data_config
from roadwork_core.models.classifier import build_classifier, classifier_config_dict
from roadwork_core.models.multiview import MultiViewConfig, extract_views, merge_flipped_views
from roadwork_core.models.predict import predict_frame, uncertainty_features

D = 16


def _aggregator(name: str, topk: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_aggregator(name, D, topk=topk).eval()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregator_outputs_are_probabilities(name: str) -> None:
    agg = _aggregator(name)
    view_logits = torch.cat([torch.randn(4, 10) * 5, torch.full((1, 10), 60.0), torch.full((1, 10), -60.0)])
    logit, prob = agg(view_logits, torch.randn(6, 10, D))
    assert logit.shape == prob.shape == (6,)
    assert torch.isfinite(logit).all(), f"{name}: non-finite logit {logit}"
    assert ((prob >= 0) & (prob <= 1)).all(), f"{name}: prob outside [0, 1]: {prob}"
    torch.testing.assert_close(logit.sigmoid(), prob, atol=1e-5, rtol=0)


def test_topk_mean_with_k_equal_to_views_is_mean() -> None:
    view_logits, feats = torch.randn(5, 10), torch.randn(5, 10, D)
    _, p_topk = _aggregator("topk_mean", topk=10)(view_logits, feats)
    _, p_mean = _aggregator("mean")(view_logits, feats)
    torch.testing.assert_close(p_topk, p_mean)
    torch.testing.assert_close(p_mean, view_logits.sigmoid().mean(1))
    _, p_top1 = _aggregator("topk_mean", topk=1)(view_logits, feats)
    torch.testing.assert_close(p_top1, view_logits.sigmoid().max(1).values)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregators_are_permutation_invariant(name: str) -> None:
    agg = _aggregator(name)
    view_logits, feats = torch.randn(4, 10), torch.randn(4, 10, D)
    perm = torch.randperm(10)
    logit, prob = agg(view_logits, feats)
    logit_p, prob_p = agg(view_logits[:, perm], feats[:, perm])
    torch.testing.assert_close(prob_p, prob, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logit_p, logit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregators_are_monotone_in_a_view_probability(name: str) -> None:
    agg = _aggregator(name)
    view_logits, feats = torch.randn(8, 10), torch.randn(8, 10, D)
    _, prob = agg(view_logits, feats)
    for view in range(10):
        raised = view_logits.clone()
        raised[:, view] += 2.0
        _, prob_raised = agg(raised, feats)
        assert (prob_raised >= prob - 1e-6).all(), f"{name}: raising view {view} lowered the probability"


def test_unknown_aggregator_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="topk_mean, mean, attention"):
        create_aggregator("max", D)


@pytest.mark.parametrize("name", ["vit_test_tiny", "vit_test_tiny_dinov3"])
def test_one_batched_forward_equals_per_view_forwards(name: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name=name), MultiViewConfig(view_size=32, hflip_tta=True)).eval()
    calls: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    canvas = torch.rand(2, 3, model.canvas_size, model.canvas_size)
    with torch.no_grad():
        out = model(canvas)
    assert calls == [(2 * 20, 3, 32, 32)], f"expected ONE backbone forward over all views, got {calls}"
    assert out["feats"].shape == (2, 20, 48) and out["view_logits"].shape == (2, 20)
    assert out["logit"].shape == out["prob"].shape == (2,)
    views = extract_views((canvas - model.mean) / model.std, model.mv)  # (2, 20, 3, 32, 32)
    with torch.no_grad():
        per_view = torch.stack([torch.stack([model.backbone(v[None])[0] for v in img]) for img in views])
    torch.testing.assert_close(out["feats"], per_view, atol=1e-4, rtol=1e-4)


def test_views_per_call_splits_inference_into_smaller_calls_with_the_same_features() -> None:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32)).eval()
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    canvas = torch.rand(4, 3, model.canvas_size, model.canvas_size)
    with torch.no_grad():
        whole = model.forward_features(canvas)  # default "auto": a tiny ViT's 40 crops fit one call
        model.views_per_call = 7
        parts = model.forward_features(canvas)
    assert calls == [40, 7, 7, 7, 7, 7, 5], calls
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    calls.clear()
    model.forward_features(canvas)  # autograd on (training): one call, the graph spans every view
    assert calls == [40], calls


def test_auto_views_per_call_bounds_one_cpu_calls_mlp_activation() -> None:
    """On CPU the default splits inference into calls whose MLP activation fits CPU_CALL_BYTES: ViT-S/14
    at 224 px (257 tokens x 1536 x 4 bytes = 1.6 MB a crop) gets 5 crops a call, the tiny test ViT all
    of a batch; a GPU gets one call."""
    from roadwork_core.models.classifier import CPU_CALL_BYTES, auto_views_per_call

    small = build_classifier(BackboneConfig(name="dinov2_small")).eval()
    crops = torch.empty(40, 3, 224, 224)
    assert auto_views_per_call(small.backbone, crops) == CPU_CALL_BYTES // (257 * 1536 * 4) == 5
    tiny = build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32)).eval()
    assert auto_views_per_call(tiny.backbone, torch.empty(40, 3, 32, 32)) >= 40
    assert auto_views_per_call(tiny.backbone, torch.empty(40, 3, 32, 32, device="meta")) is None

    calls: list[int] = []
    small.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    canvas = torch.rand(1, 3, small.canvas_size, small.canvas_size)
    with torch.no_grad():
        auto = small.forward_features(canvas)  # 10 views: calls of 5
        small.views_per_call = None
        whole = small.forward_features(canvas)
    assert calls == [5, 5, 10], calls
    torch.testing.assert_close(auto, whole, atol=1e-4, rtol=1e-4)


def test_build_classifier_reads_view_size_and_normalization_from_backbone() -> None:
    model = build_classifier(BackboneConfig(name="vit_test_tiny_dinov3"))
    data_cfg = backbone_data_config(model.backbone)
    assert model.mv.view_size == data_cfg["input_size"][-1] == 32
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(data_cfg["mean"]))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(data_cfg["std"]))
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]


def test_fixed_size_backbone_rejects_a_mismatched_view_size() -> None:
    with pytest.raises(ValueError, match="view_size=224.*Set view_size=32"):
        build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=224))


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_config_dict_round_trips_through_json(aggregator: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(
        BackboneConfig(name="vit_test_tiny"),
        MultiViewConfig(view_size=32, grid=2),
        aggregator=aggregator,
        topk=2,
    ).eval()
    cfg = json.loads(json.dumps(classifier_config_dict(model)))
    rebuilt = build_classifier(
        BackboneConfig(**cfg["backbone"]),
        MultiViewConfig(**cfg["multiview"]),
        aggregator=cfg["aggregator"],
        topk=cfg["topk"],
        dropout=cfg["dropout"],
        mean=cfg["mean"],
        std=cfg["std"],
    ).eval()
    rebuilt.load_state_dict(model.state_dict())
    canvas = torch.rand(2, 3, model.canvas_size, model.canvas_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(canvas)["prob"], model(canvas)["prob"])


def _jpeg(path, seed: int, size=(50, 40)) -> str:
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path, quality=95)
    return str(path)


def test_canvas_loading(tmp_path) -> None:
    img = PIL.Image.new("L", (50, 30), color=128)
    canvas = pil_to_canvas(img, 40)
    assert canvas.dtype == torch.uint8 and canvas.shape == (3, 40, 40)
    assert (canvas == 128).all(), "a flat grey image must stay flat grey after resize"
    uris = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(3)]
    assert load_canvas(uris[0], 40).shape == (3, 40, 40)
    dataset = CanvasDataset(uris, [0, 1, 1], 40)
    canvas, label, index = dataset[1]
    assert canvas.shape == (3, 40, 40) and label == 1.0 and index == 1
    assert math.isnan(CanvasDataset(uris, None, 40)[0][1]), "unlabelled items carry NaN labels"
    with pytest.raises(ValueError, match="3 uris but 2 labels"):
        CanvasDataset(uris, [0, 1], 40)


def test_cached_canvases_are_the_lazy_items_and_only_for_fixed_small_splits(tmp_path) -> None:
    uris = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(3)]
    lazy = CanvasDataset(uris, [0, 1, 1], 40)
    cached = cache_canvases(lazy)
    assert cached is not lazy and len(cached) == 3
    for i in range(3):
        (a, la, ia), (b, lb, ib) = lazy[i], cached[i]
        assert torch.equal(a, b) and la == lb and ia == ib == i
    assert math.isnan(cache_canvases(CanvasDataset(uris, None, 40))[0][1])
    threaded, single = cache_canvases(lazy, workers=3), cache_canvases(lazy, workers=1)
    assert torch.equal(threaded.canvases, single.canvases), "the decode threads keep the dataset's order"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(Exception) as err:
        cache_canvases(CanvasDataset([*uris, str(broken)], None, 40), workers=2)
    assert "broken.jpg" in "\n".join([str(err.value), *getattr(err.value, "__notes__", [])])
    assert cache_canvases(lazy, max_bytes=3 * 3 * 40 * 40 - 1) is lazy, "over the byte limit: stays lazy"
    augmented = CanvasDataset(uris, [0, 1, 1], 40, transform=lambda img: img)
    assert cache_canvases(augmented) is augmented, "an augmented split changes every epoch: never cached"


def test_canvas_dataset_names_the_bad_item(tmp_path) -> None:
    dataset = CanvasDataset([str(tmp_path / "missing.jpg")], [0], 40)
    with pytest.raises(Exception) as info:
        dataset[0]
    assert any("missing.jpg" in note and "item 0" in note for note in getattr(info.value, "__notes__", [])), (
        f"error should name the item and uri: {info.value!r} {getattr(info.value, '__notes__', None)}"
    )


def test_uncertainty_features_match_their_definitions() -> None:
    mv = MultiViewConfig(view_size=32, grid=2)  # 5 views: global + 4 tiles
    view_probs = torch.tensor([[0.9, 0.2, 0.4, 0.6, 0.8]])
    prob = torch.tensor([0.7])
    f = uncertainty_features(prob, view_probs, mv)
    assert tuple(f) == UNCERTAINTY_FEATURES
    assert f["max_prob"].item() == pytest.approx(0.7)
    assert f["entropy"].item() == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))
    assert f["margin"].item() == pytest.approx(0.4)
    assert f["view_var"].item() == pytest.approx(float(np.var([0.9, 0.2, 0.4, 0.6, 0.8])))
    assert f["view_disagreement"].item() == pytest.approx(2 / 5)
    assert f["global_tile_disagreement"].item() == pytest.approx(abs(0.9 - 0.5))
    flipped = uncertainty_features(
        prob, view_probs.repeat(1, 2), MultiViewConfig(view_size=32, grid=2, hflip_tta=True)
    )
    assert flipped["global_tile_disagreement"].item() == pytest.approx(0.4), (
        "flip copies share the definition"
    )
    no_global = uncertainty_features(prob, view_probs[:, 1:], MultiViewConfig(grid=2, include_global=False))
    assert no_global["global_tile_disagreement"].item() == 0.0


def test_predict_frame_writes_the_predictions_contract(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name="vit_test_tiny"), aggregator="topk_mean").eval()
    uris = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(5)]
    rows = pd.DataFrame(
        {
            "image_id": [f"id{i}" for i in range(5)],
            "uri": uris,
            "label": [0, 1, 0, 1, 1],
            "split": "val_calib",
        }
    )
    table = predict_frame(model, rows, batch_size=2)
    assert tuple(table.columns) == PREDICTION_COLUMNS
    assert table["image_id"].tolist() == rows["image_id"].tolist(), "rows must keep their order"
    assert table["label"].tolist() == [0, 1, 0, 1, 1] and set(table["split"]) == {"val_calib"}
    assert table["p_raw"].between(0, 1).all()
    assert all(len(v) == model.num_views for v in table["view_probs"])
    canvas = load_canvas(uris[3], model.canvas_size).float()[None] / 255
    with torch.no_grad():
        expected = model(canvas)
    assert table["p_raw"].iloc[3] == pytest.approx(expected["prob"].item(), abs=1e-4)
    assert table["view_probs"].iloc[3] == pytest.approx(
        expected["view_logits"].sigmoid()[0].tolist(), abs=1e-5
    )
    for name in UNCERTAINTY_FEATURES:
        assert table[name].notna().all(), f"feature {name} has missing values"
    # decoding in DataLoader workers (the prediction assets' num_workers) gives the same table
    pd.testing.assert_frame_equal(predict_frame(model, rows, batch_size=2, num_workers=2), table)


def test_predict_frame_requires_its_columns() -> None:
    model = build_classifier(BackboneConfig(name="vit_test_tiny"))
    with pytest.raises(ValueError, match=r"lack column\(s\) \['uri'\]"):
        predict_frame(model, pd.DataFrame({"image_id": [], "label": [], "split": []}))


def test_view_size_none_means_the_backbone_input_size() -> None:
    model = build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(grid=2, overlap=0.25))
    assert model.mv.view_size == 32 and model.mv.grid == 2 and model.mv.overlap == 0.25
    assert model(torch.rand(1, 3, model.canvas_size, model.canvas_size))["view_logits"].shape == (1, 5)
    with pytest.raises(ValueError, match="view_size is None"):
        extract_views(torch.rand(1, 3, 64, 64), MultiViewConfig())


def test_hflip_tta_fuses_each_view_with_its_flip_before_top_k() -> None:
    # 1 global + 4 tiles, then their flips. Tile 1 is the best view; its flip nearly as good.
    torch.manual_seed(0)
    model = build_classifier(
        BackboneConfig(name="vit_test_tiny"),
        MultiViewConfig(view_size=32, grid=2, hflip_tta=True),
        aggregator="topk_mean",
        topk=3,
    ).eval()
    probs = torch.tensor([[0.30, 0.95, 0.80, 0.70, 0.20, 0.30, 0.93, 0.78, 0.72, 0.20]])  # (1, 10)
    feats = torch.zeros(1, 10, model.head[1].in_features)
    feats[..., 0] = torch.logit(probs)
    with torch.no_grad():
        model.head[1].weight.zero_()
        model.head[1].weight[0, 0] = 1.0  # view_logit = feats[..., 0]
        model.head[1].bias.zero_()
        out = model.forward_head(feats)
    torch.testing.assert_close(out["view_logits"], torch.logit(probs), atol=1e-5, rtol=0)
    fused = (probs[0, :5] + probs[0, 5:]) / 2  # [0.30, 0.94, 0.79, 0.71, 0.20]
    expected = fused.topk(3).values.mean()  # three DISTINCT views: tiles 1, 2, 3
    flip_in_topk = probs[0].topk(3).values.mean()  # 0.95, 0.93 (its flip), 0.80
    assert abs(expected - flip_in_topk) > 0.01
    torch.testing.assert_close(out["prob"][0], expected, atol=1e-5, rtol=0)
    logits, fused_feats = merge_flipped_views(out["view_logits"], feats, model.mv)
    assert logits.shape == (1, 5) and fused_feats.shape == (1, 5, feats.shape[-1])
