"""Supervised training: head-mode cache, resume after a kill, NaN guard, LoRA merge, early stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import RoadworkClassifier, build_classifier
from roadwork_core.models.multiview import MultiViewConfig
from roadwork_core.training.checkpoint import load_checkpoint
from roadwork_core.training.supervised import TrainConfig, lr_schedule, train_classifier


def _images(root: Path, n: int, seed: int) -> pd.DataFrame:
    """n JPEGs 48x48: orange triangles = roadwork (label 1), grey boxes only = 0."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        label = i % 2
        img = PIL.Image.new("RGB", (48, 48), tuple(int(c) for c in rng.integers(60, 160, 3)))
        draw = PIL.ImageDraw.Draw(img)
        x, y = (int(v) for v in rng.integers(4, 24, 2))
        draw.rectangle([x, y, x + 12, y + 8], fill=(90, 90, 90))
        if label:
            draw.polygon([(x, y + 20), (x + 8, y + 4), (x + 16, y + 20)], fill=(255, 130, 0))
        path = root / f"img{i:02d}.jpg"
        img.save(path, quality=90)
        records.append({"image_id": f"{root.name}-{i:02d}", "uri": str(path), "label": label})
    return pd.DataFrame(records)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    root = tmp_path_factory.mktemp("images")
    return _images(root / "train", 16, seed=0), _images(root / "select", 8, seed=1)


def _model() -> RoadworkClassifier:
    torch.manual_seed(0)
    return build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32, grid=2))


def _cfg(**kw) -> TrainConfig:
    base = dict(mode="head", epochs=3, batch_size=4, lr=1e-3, ema_decay=0.9, patience=5, augment_max_level=2)
    return TrainConfig(**{**base, **kw})


def test_head_mode_runs_backbone_only_in_first_epoch(rows, tmp_path: Path) -> None:
    train, select = rows
    model = _model()
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    seen: list[int] = []
    result = train_classifier(
        model,
        train,
        select,
        _cfg(),
        checkpoint_dir=tmp_path / "ckpt",
        on_epoch=lambda r: seen.append(len(calls)),
    )
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert seen[0] > 0, "epoch 1 must compute the features through the backbone"
    assert seen[1] == seen[0] and seen[2] == seen[0], f"backbone ran after epoch 1: cumulative calls {seen}"
    assert result.history[0]["backbone_forwards"] == seen[0], "history miscounts backbone forwards"
    assert [h["backbone_forwards"] for h in result.history[1:]] == [0, 0]
    assert result.trainable_params < result.total_params / 5, "head mode must freeze the backbone"
    assert any(result.history[0]["train_loss"] != h["train_loss"] for h in result.history[1:]), (
        "nothing trained"
    )
    fresh = _model()
    fresh.load_state_dict(result.state_dict)
    assert 1 <= result.best_epoch <= 3 and -1.0 <= result.best_select_mcc <= 1.0


def _killer(model: RoadworkClassifier, kill_epoch: int, after_calls: int):
    """A head forward hook that raises KeyboardInterrupt `after_calls` head calls into `kill_epoch`."""
    state = {"epoch": 1, "calls": 0}

    def hook(*_):
        if state["epoch"] == kill_epoch:
            state["calls"] += 1
            if state["calls"] > after_calls:
                raise KeyboardInterrupt(f"killed during epoch {kill_epoch}")

    model.head.register_forward_hook(hook)
    return lambda record: state.update(epoch=record["epoch"] + 1)


def test_head_mode_trains_the_same_whether_its_feature_cache_was_filled_or_not(rows, tmp_path: Path) -> None:
    """Filling the cache drew from the global torch RNG after the epoch's seed (a DataLoader's base seed),
    so epoch 1's dropout stream, and the weights, depended on whether the cache was already filled: a
    classifier materialized again (the state's shared cache) or resumed after a kill in epoch 1 came out
    different (losses 0.7234 vs 0.7436 in epoch 1)."""
    train, select = rows
    cfg = _cfg(epochs=2)
    cache = tmp_path / "features"
    empty = train_classifier(
        _model(), train, select, cfg, checkpoint_dir=tmp_path / "a", feature_cache_dir=cache
    )
    filled = train_classifier(
        _model(), train, select, cfg, checkpoint_dir=tmp_path / "b", feature_cache_dir=cache
    )
    assert filled.history[0]["backbone_forwards"] == 0, "the second run must read the filled cache"
    assert [h["train_loss"] for h in filled.history] == [h["train_loss"] for h in empty.history]
    a, b = load_checkpoint(tmp_path / "a").model_state, load_checkpoint(tmp_path / "b").model_state
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed and data must give the same weights"


def test_the_worker_count_is_part_of_the_run_when_it_changes_the_augmentations() -> None:
    """Augmentations are drawn in the DataLoader workers, each seeded apart: 0 and 2 workers train
    different weights, so a run killed with one count is not resumed with another. Without augmentation
    (or in head mode) the result does not depend on it, and a resume may change it."""
    from roadwork_core.training.supervised import _fingerprint

    train = pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1]})

    def fp(**kw) -> str:
        return _fingerprint(_cfg(**kw), "fp32", train, train, "sha")

    assert fp(mode="full", augment="validator", num_workers=0) != fp(
        mode="full", augment="validator", num_workers=2
    )
    assert fp(mode="full", augment="none", num_workers=0) == fp(mode="full", augment="none", num_workers=2)
    assert fp(mode="head", num_workers=0) == fp(mode="head", num_workers=2)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_killed_run_resumes_from_last_finished_epoch_and_matches(rows, tmp_path: Path, mode: str) -> None:
    train, select = rows
    epochs = 3 if mode == "head" else 2  # full mode runs the backbone every step: keep it short on CPU
    if mode == "full":
        train, select = train.iloc[:8], select.iloc[:4]
    cfg = _cfg(mode=mode, epochs=epochs, balanced_sampling=mode == "head")
    cache = tmp_path / "features"
    straight = train_classifier(
        _model(), train, select, cfg, checkpoint_dir=tmp_path / "a", feature_cache_dir=cache
    )

    model = _model()
    on_epoch = _killer(model, kill_epoch=2, after_calls=1)  # dies in epoch 2, step 2
    with pytest.raises(KeyboardInterrupt):
        train_classifier(model, train, select, cfg, checkpoint_dir=tmp_path / "b", on_epoch=on_epoch)
    assert load_checkpoint(tmp_path / "b").state["epoch"] == 1, (
        "the checkpoint must hold the last finished epoch"
    )

    resumed = train_classifier(_model(), train, select, cfg, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from_epoch == 1, (
        f"expected a resume from epoch 1, got {resumed.resumed_from_epoch}"
    )
    assert [h["epoch"] for h in resumed.history] == list(range(1, epochs + 1)), "each epoch once in history"
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), f"epoch {a['epoch']} loss differs"
    assert straight.best_epoch == resumed.best_epoch
    for key, value in straight.state_dict.items():
        assert torch.allclose(value.float(), resumed.state_dict[key].float(), atol=1e-5), f"{key} differs"

    again = train_classifier(_model(), train, select, cfg, checkpoint_dir=tmp_path / "b")
    assert again.resumed_from_epoch == epochs and len(again.history) == epochs, (
        "a finished run must not rerun"
    )
    other = train_classifier(
        _model(), train, select, _cfg(mode=mode, epochs=1, seed=1), checkpoint_dir=tmp_path / "b"
    )
    assert other.resumed_from_epoch is None, "a checkpoint of another config must not be resumed"


def test_nan_loss_stops_with_clear_error_before_stepping(rows, tmp_path: Path) -> None:
    train, select = rows
    model = _model()
    with torch.no_grad():
        model.head[1].bias.fill_(float("nan"))
    weight_before = model.head[1].weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 1/4.*lr") as info:
        train_classifier(model, train, select, _cfg(), checkpoint_dir=tmp_path / "ckpt")
    assert "image_ids" in str(info.value), f"message should name the batch's images: {info.value}"
    assert torch.equal(model.head[1].weight, weight_before), "the optimizer stepped on a NaN loss"


def test_lora_trains_and_returns_merged_plain_timm_weights(rows, tmp_path: Path) -> None:
    train, select = rows
    train, select = train.iloc[:8], select.iloc[:4]
    initial = _model().state_dict()
    model = _model()
    result = train_classifier(
        model,
        train,
        select,
        _cfg(mode="lora", epochs=2, lora_rank=4, ema_decay=None),
        checkpoint_dir=tmp_path / "c",
    )
    assert not [k for k in result.state_dict if "lora" in k or "base_model" in k], "adapters not merged"
    assert set(result.state_dict) == set(initial), "merged keys must equal a fresh classifier's keys"
    assert result.trainable_params < result.total_params / 2, "lora must train only adapters + head"
    changed = [
        k for k in initial if k.startswith("backbone.") and not torch.equal(initial[k], result.state_dict[k])
    ]
    assert any("attn.qkv.weight" in k for k in changed), f"merged LoRA did not change qkv weights: {changed}"
    assert "backbone.patch_embed.proj.weight" not in changed, "non-target weights must stay frozen"

    fresh = _model()
    fresh.load_state_dict(result.state_dict, strict=True)
    fresh.eval()
    canvas = torch.rand(2, 3, fresh.canvas_size, fresh.canvas_size)
    with torch.no_grad():
        assert torch.allclose(fresh(canvas)["logit"], model(canvas)["logit"], atol=1e-5), (
            "merge changed outputs"
        )


def test_early_stopping_after_patience_epochs_without_improvement(rows, tmp_path: Path) -> None:
    train, select = rows
    result = train_classifier(
        _model(),
        train,
        select,
        _cfg(epochs=10, lr=1e-12, patience=2, ema_decay=None),
        checkpoint_dir=tmp_path / "e",
    )
    assert result.best_epoch == 1, "with lr 1e-12 nothing improves after epoch 1"
    assert [h["epoch"] for h in result.history] == [1, 2, 3], (
        f"should stop after 2 flat epochs: {result.history}"
    )


def test_lr_schedule_warmup_then_cosine_and_input_errors(rows, tmp_path: Path) -> None:
    lrs = lr_schedule(TrainConfig(lr=1.0, epochs=4, warmup_epochs=1.0), steps_per_epoch=5)
    assert len(lrs) == 20 and lrs[4] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])), "cosine part must not increase"
    train, select = rows
    with pytest.raises(ValueError, match="mode"):
        train_classifier(_model(), train, select, TrainConfig(mode="adapter"), checkpoint_dir=tmp_path)
    for bad, match in (({"lr": 0.0}, "must be > 0"), ({"label_smoothing": 2.0}, "invert the labels")):
        with pytest.raises(ValueError, match=match):
            train_classifier(_model(), train, select, _cfg(**bad), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="fp16-mixed"):
        train_classifier(_model(), train, select, _cfg(), precision="fp16-mixed", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="label"):
        train_classifier(_model(), train.drop(columns="label"), select, _cfg(), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="augment='distortions'.*validator, none"):
        train_classifier(_model(), train, select, _cfg(augment="distortions"), checkpoint_dir=tmp_path)


def test_validator_augmentation_feeds_the_replica_with_mask_points(rows) -> None:
    from roadwork_core.data.loading import CanvasDataset
    from roadwork_core.subnet.challenge import ChallengeAugmentation
    from roadwork_core.training.supervised import _train_augmentation

    train, _ = rows
    train = train.assign(
        mask_x=["20" if y else "" for y in train["label"]],
        mask_y=["" if not y else "12" for y in train["label"]],
    )
    aug, points = _train_augmentation(_cfg(mode="full", augment="validator"), train)
    assert isinstance(aug, ChallengeAugmentation) and aug.max_level == 2
    assert points == [(20.0, 12.0) if y else None for y in train["label"]]
    assert _train_augmentation(_cfg(augment="none"), train) == (None, None)
    with pytest.raises(ValueError, match="row 0 .*mask_x='x'"):
        _train_augmentation(_cfg(augment="validator"), train.assign(mask_x="x"))

    seen: list = []

    def spy(img, mask_point=None):  # the real replica, recording what the dataset hands it
        seen.append(mask_point)
        return aug(img, mask_point=mask_point)

    data = CanvasDataset(train["uri"].tolist(), train["label"].tolist(), 64, spy, mask_points=points)
    torch.manual_seed(0)
    a = data[1][0]
    torch.manual_seed(0)
    assert torch.equal(a, data[1][0]), "the same torch seed must replay the same challenge"
    assert seen == [points[1], points[1]] and a.shape == (3, 64, 64)


def test_unaugmented_full_training_decodes_each_image_once(rows, tmp_path: Path, monkeypatch) -> None:
    """augment='none' reads the same pixels every epoch: train and val_select are decoded once, and the
    result equals training on lazily decoded canvases (the cache is an optimisation, not a change)."""
    import roadwork_core.data.images as images
    import roadwork_core.data.loading as loading

    train, select = rows
    real_load, loads = images.load_image, []

    def counting_load(uri):
        loads.append(uri)
        return real_load(uri)

    monkeypatch.setattr(images, "load_image", counting_load)
    cfg = _cfg(mode="full", epochs=3, augment="none")
    cached = train_classifier(_model(), train, select, cfg, checkpoint_dir=tmp_path / "cached")
    assert sorted(loads) == sorted([*train["uri"], *select["uri"]]), "each image decoded exactly once"

    monkeypatch.setattr(
        loading.cache_canvases, "__defaults__", (0, None)
    )  # max_bytes 0: every epoch decodes again
    loads.clear()
    lazy = train_classifier(_model(), train, select, cfg, checkpoint_dir=tmp_path / "lazy")
    assert len(loads) == 3 * (len(train) + len(select)), "the lazy path decodes every epoch"
    assert [h["train_loss"] for h in lazy.history] == [h["train_loss"] for h in cached.history]
    for key, value in cached.state_dict.items():
        assert torch.equal(value, lazy.state_dict[key]), key


def test_a_finished_checkpoint_of_another_architecture_is_not_resumed(rows, tmp_path: Path) -> None:
    """2x2 and 3x3 tiles (or top-k 1 vs 3) share every parameter shape: only the fingerprint tells them
    apart, so a run with other view settings must train, not 'resume' the finished run's weights."""
    train, select = rows
    first = train_classifier(_model(), train, select, _cfg(epochs=2), checkpoint_dir=tmp_path / "c")
    assert first.resumed_from_epoch is None
    torch.manual_seed(0)
    other = build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32, grid=3))
    again = train_classifier(other, train, select, _cfg(epochs=2), checkpoint_dir=tmp_path / "c")
    assert again.resumed_from_epoch is None and len(again.history) == 2, again.resumed_from_epoch
    same = train_classifier(_model(), train, select, _cfg(epochs=2), checkpoint_dir=tmp_path / "d")
    resumed = train_classifier(_model(), train, select, _cfg(epochs=2), checkpoint_dir=tmp_path / "d")
    assert same.resumed_from_epoch is None and resumed.resumed_from_epoch == 2, "the same run still resumes"


def test_compile_runs_the_training_forward_through_dynamo_and_trains_the_same(rows, tmp_path: Path) -> None:
    """`gpu.compile` compiles the training forward (the prediction assets and bundles stay eager). Backend
    aot_eager here: the same graph capture as inductor without its minute of C++ compilation on a CPU."""
    import torch._dynamo

    train, select = rows
    train = train.iloc[:14]  # batches of 4, 4, 4 and 2
    cfg = _cfg(mode="full", epochs=1, augment_max_level=0)
    eager = train_classifier(_model(), train, select, cfg, checkpoint_dir=tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    suppress_before = torch._dynamo.config.suppress_errors
    try:
        compiled = train_classifier(
            _model(), train, select, cfg, checkpoint_dir=tmp_path / "compiled", compile_backend="aot_eager"
        )
        captured = torch._dynamo.utils.counters["aot_autograd"]["ok"]  # frames compiled, not fallen back
        frames = dict(torch._dynamo.utils.counters["frames"])
        # the eager fallback was scoped to the training forward, not left on for the whole process
        assert torch._dynamo.config.suppress_errors is suppress_before, "suppress_errors left changed"
    finally:
        torch._dynamo.reset()
    assert captured > 0, "the training forward did not go through torch.compile"
    # compiled once: a guard on a Python value that changes per step (the backbone-forward counter's int
    # was one) or a static batch size (the last, smaller batch) compiles the forward and backward again
    assert frames.get("ok") == 1, f"the training forward was compiled more than once: {frames}"
    assert [h["backbone_forwards"] for h in compiled.history] == [
        h["backbone_forwards"] for h in eager.history
    ]
    for key, value in eager.state_dict.items():
        torch.testing.assert_close(compiled.state_dict[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_checkpoint_changed_at_rest_is_refused_not_resumed(tmp_path: Path) -> None:
    """A bit flipped in best.safetensors was resumed and shipped (the classifier's head bias off by 0.39;
    every later check passed on the damaged model): both checkpoint files carry a digest of their tensors."""
    import safetensors.torch

    from roadwork_core.training.checkpoint import LAST, load_best, save_best, save_checkpoint, tensors_sha256

    model = {"head.weight": torch.randn(2, 8), "head.bias": torch.zeros(2), "step": torch.tensor(3)}
    save_checkpoint(tmp_path, model_state=model, ema_state=None, optimizer_state={"state": {}, "param_groups": []},
                    state={"epoch": 1})  # fmt: skip
    save_best(tmp_path, model, epoch=1)
    assert load_checkpoint(tmp_path).state["epoch"] == 1 and set(load_best(tmp_path, 1)) == set(model)
    assert tensors_sha256(model) != tensors_sha256({**model, "head.bias": torch.tensor([0.0, 2.0**-20])})

    for name, load in (
        (LAST, lambda: load_checkpoint(tmp_path)),
        ("best.safetensors", lambda: load_best(tmp_path, 1)),
    ):
        path = tmp_path / name
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10  # inside the last tensor's bytes: the file still parses
        path.write_bytes(bytes(data))
        safetensors.torch.load_file(str(path))
        with pytest.raises(ValueError, match=r"does not match the sha256 written with it.*delete"):
            load()
