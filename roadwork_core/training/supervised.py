"""Supervised training of a RoadworkClassifier: modes head / lora / dora / full, selected on val_select MCC.

One readable loop (nanoGPT style): schedule -> forward/loss -> NaN guard -> backward/clip/step ->
EMA -> evaluate on val_select with the EMA weights -> checkpoint -> early stop. Resume is exact:
every epoch seeds its RNG from (seed, epoch), so a redone epoch draws the same shuffles, dropout and
augmentations as the first attempt.

- head: backbone frozen; per-view features computed once through the content-addressed
  FeatureCache (clean views, no augmentation); head + aggregator train on them. Epochs after the
  first run no backbone forward (counted per epoch in `history[i]["backbone_forwards"]`).
- lora / dora: peft adapters on the backbone (apply_adapters) + head + aggregator trained;
  the returned weights have the adapters merged (plain timm keys).
- full: every parameter trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset, WeightedRandomSampler
from torchmetrics.classification import BinaryAccuracy, BinaryMatthewsCorrCoef

from roadwork_core.config import PRECISIONS, TrainConfig, precision_dtype
from roadwork_core.data.loading import CanvasDataset, cache_canvases
from roadwork_core.models.backbone import state_dict_sha256
from roadwork_core.models.classifier import RoadworkClassifier
from roadwork_core.subnet.challenge import ChallengeAugmentation, mask_points
from roadwork_core.training.checkpoint import (
    epoch_seed,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from roadwork_core.training.distributed import RankBatchSampler, World
from roadwork_core.training.feature_cache import FeatureCache

__all__ = ["MODES", "TrainConfig", "TrainResult", "lr_schedule", "train_classifier"]

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("head", "lora", "dora", "full")


@dataclass
class TrainResult:
    state_dict: dict[str, Tensor]  # best weights of the whole classifier, adapters merged (plain timm keys)
    best_epoch: int
    best_select_mcc: float
    history: list[dict] = field(default_factory=list)  # per epoch, see _epoch_record
    resumed_from_epoch: int | None = None
    trainable_params: int = 0
    total_params: int = 0


# ---------------------------------------------------------------- helpers


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """Per-step learning rate: linear warmup over warmup_epochs, then cosine to 0."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    lrs = []
    for step in range(total):
        if step < warmup:
            lrs.append(cfg.lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / max(1, total - warmup)
            lrs.append(cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return lrs


# The older validator-style family (roadwork_core/data/distortions.py) was measured against the replica
# and did not help (tools/augment_compare.py; README "The network's validator"), so it is not offered.
AUGMENTATIONS = ("validator", "none")


def _train_augmentation(cfg: TrainConfig, train_rows: pd.DataFrame):
    """(transform, mask points) for the training images; see TrainConfig.augment."""
    if cfg.augment == "none" or cfg.augment_max_level == 0:
        return None, None
    return ChallengeAugmentation(cfg.augment_max_level), mask_points(train_rows)


def _check_inputs(
    cfg: TrainConfig, precision: str, device: torch.device, frames: dict[str, pd.DataFrame]
) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"TrainConfig.mode={cfg.mode!r} is not valid; use one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16-mixed" and device.type != "cuda":
        raise ValueError(
            f"precision='fp16-mixed' needs a CUDA device (got {device}); use 'bf16-mixed' or 'fp32'"
        )
    if cfg.augment not in AUGMENTATIONS:
        raise ValueError(
            f"TrainConfig.augment={cfg.augment!r} is not valid; use one of {', '.join(AUGMENTATIONS)}"
        )
    if not 0 <= cfg.augment_max_level <= 3:
        raise ValueError(f"TrainConfig.augment_max_level={cfg.augment_max_level} is not valid; use 0..3")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.patience < 1:
        raise ValueError(f"epochs, batch_size and patience must be >= 1; got {cfg}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"TrainConfig.lr={cfg.lr}: the learning rate must be > 0 (at lr 0 nothing trains)")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(
            f"TrainConfig.label_smoothing={cfg.label_smoothing}: use 0 <= label_smoothing < 1 (targets become "
            "label * (1 - s) + s / 2; at s > 1 they invert the labels)"
        )
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0) or not (
        math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0
    ):
        raise ValueError(
            f"TrainConfig.weight_decay={cfg.weight_decay}, warmup_epochs={cfg.warmup_epochs}: both must be finite and >= 0"
        )
    for name, rows in frames.items():
        missing = {"image_id", "uri", "label"} - set(rows.columns)
        if missing:
            raise ValueError(f"{name} lacks columns {sorted(missing)}; it needs image_id, uri, label")
        if len(rows) == 0:
            raise ValueError(f"{name} is empty; training needs labelled images in train and val_select")
        bad = rows.loc[~rows["label"].isin([0, 1]), ["image_id", "label"]]
        if len(bad):
            raise ValueError(f"{name} has labels outside {{0, 1}}, e.g. {bad.head(3).to_dict('records')}")


def _architecture(model: nn.Module) -> dict:
    """The classifier's build settings (views, aggregator, top-k, dropout, backbone), which change what
    training computes even when no weight changes shape (3x3 tiles vs 2x2 share every parameter)."""
    from roadwork_core.models.classifier import classifier_config_dict

    try:
        return classifier_config_dict(model)
    except (ValueError, AttributeError):  # built without its BackboneConfig (tests): what it still says
        mv = getattr(model, "mv", None)
        return {
            "multiview": dataclasses.asdict(mv) if dataclasses.is_dataclass(mv) else repr(mv),
            **{k: getattr(model, k, None) for k in ("aggregator_name", "topk", "dropout")},
        }


def _fingerprint(
    cfg: TrainConfig,
    precision: str,
    train: pd.DataFrame,
    select: pd.DataFrame,
    init_sha: str,
    architecture: dict | None = None,
) -> str:
    """What makes two runs the same run; a checkpoint with another fingerprint is not resumed."""
    # the worker count changes the result only where workers draw augmentations (each seeded apart)
    independent = cfg.mode == "head" or cfg.augment == "none"
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if not (k == "num_workers" and independent)}
    payload = {
        "config": config,
        "architecture": architecture or {},
        "precision": precision,
        "train": [train["image_id"].astype(str).tolist(), train["label"].astype(int).tolist()],
        "select": [select["image_id"].astype(str).tolist(), select["label"].astype(int).tolist()],
        "initial_weights_sha256": init_sha,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare(model: RoadworkClassifier, cfg: TrainConfig) -> nn.Module:
    """Set what trains for `cfg.mode`; returns the module whose parameters / EMA / checkpoint we keep."""
    if cfg.mode in ("lora", "dora"):
        from roadwork_core.models.adapters import apply_adapters  # peft (+ transformers): only for adapters

        model.backbone = apply_adapters(
            model.backbone, cfg.mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_regex
        )  # base weights frozen by peft; adapters trainable
        return model
    model.backbone.requires_grad_(cfg.mode == "full")
    if cfg.mode == "head":
        return nn.ModuleDict({"head": model.head, "aggregator": model.aggregator})
    return model


class _ForwardCounter:
    """Counts backbone forward calls (one per batch of views) with a forward hook.

    The count is a tensor, not a Python int: torch.compile traces the hook into the training forward, and
    an int attribute made dynamo guard on its value, so the compiled forward was compiled again at its
    second call (a DINOv3 ViT-B's first compiled epoch on an H200 took 249 s against 3.6 s for the next).
    A tensor's in-place add is part of the graph, and its value is not guarded. It lives on the backbone's
    device, so a compiled CUDA graph holds no CPU kernel; reading it (once an epoch) synchronizes."""

    def __init__(self, backbone: nn.Module) -> None:
        device = next(backbone.parameters()).device
        self._calls = torch.zeros((), dtype=torch.int64, device=device)
        self.handle = backbone.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self._calls.add_(1)

    @property
    def count(self) -> int:
        return int(self._calls)

    @count.setter
    def count(self, value: int) -> None:
        self._calls.fill_(value)


@contextlib.contextmanager
def _ema_weights(target: nn.Module, ema: ModelEmaV3 | None) -> Iterator[None]:
    """Temporarily load the EMA weights into `target` (evaluation and best-checkpoint use them)."""
    if ema is None:
        yield
        return
    backup = {k: v.detach().clone() for k, v in target.state_dict().items()}
    target.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        target.load_state_dict(backup)


def _smoothed_bce(logit: Tensor, label: Tensor, smoothing: float) -> Tensor:
    target = label * (1.0 - smoothing) + 0.5 * smoothing  # (B,)
    return F.binary_cross_entropy_with_logits(logit.float(), target.float())


@dataclass
class _Data:
    """Training / selection inputs: cached features (head mode) or image datasets."""

    head_mode: bool
    train_labels: Tensor  # (N,) float
    train_set: Dataset | None = None  # a CanvasDataset, or its decoded canvases when not augmented
    select_set: Dataset | None = None
    train_feats: Tensor | None = None  # (N, V, D)
    select_feats: Tensor | None = None  # (M, V, D)
    select_labels: Tensor | None = None  # (M,)


def _loader(data: _Data, cfg: TrainConfig, epoch: int, train: bool, world: World = World()) -> DataLoader:
    if data.head_mode:
        feats, labels = (
            (data.train_feats, data.train_labels) if train else (data.select_feats, data.select_labels)
        )
        dataset = TensorDataset(feats, labels, torch.arange(len(labels)))
    else:
        dataset = data.train_set if train else data.select_set
    # workers decode and augment images; features and cached canvases are already in memory
    workers = cfg.num_workers if isinstance(dataset, CanvasDataset) else 0
    if not train:
        if world.distributed:  # each rank scores its stride of the split; _evaluate gathers
            dataset = torch.utils.data.Subset(dataset, world.eval_indices(len(dataset)))
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers)
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    if cfg.balanced_sampling:
        labels = data.train_labels.long()
        class_weight = 1.0 / torch.bincount(labels, minlength=2).clamp(min=1).double()
        sampler = WeightedRandomSampler(
            class_weight[labels], len(labels), replacement=True, generator=generator
        )
    else:
        sampler = RandomSampler(dataset, generator=generator)
    if world.distributed:  # this rank's part of every global batch the same sampler draws
        batches = RankBatchSampler(sampler, cfg.batch_size, world.rank, world.world_size)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=generator,  # worker seeds derive from it: augmentations replay on resume
    )


def _forward(model: RoadworkClassifier, x: Tensor, head_mode: bool) -> dict[str, Tensor]:
    return model.forward_head(x) if head_mode else model(x.float() / 255.0)  # x: feats (B,V,D) | canvas uint8


@torch.no_grad()
def _evaluate(
    model: RoadworkClassifier,
    data: _Data,
    cfg: TrainConfig,
    device: torch.device,
    dtype,
    world: World = World(),
) -> tuple[float, float]:
    """val_select MCC and accuracy at threshold 0.5 of the aggregated probability."""
    model.eval()
    probs, labels = [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    for x, label, _ in _loader(data, cfg, 0, train=False, world=world):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            probs.append(_forward(model, x.to(device), data.head_mode)["prob"].float().cpu())  # (B,)
        labels.append(label.long())
    prob, label = world.gather_cat(torch.cat(probs)), world.gather_cat(torch.cat(labels))  # whole split
    acc = BinaryAccuracy()
    acc.update(prob, label)
    return select_mcc(prob, label), float(acc.compute())


def select_mcc(prob: Tensor, label: Tensor) -> float:
    """The val_select MCC that picks the best epoch, at p > 0.5. 0 when the predictions hold one class
    (sklearn's and the validator's convention: torchmetrics gives +0.28 to a constant 'roadwork' model on
    7 positives of 10, so such an epoch could win); -1 where undefined (one label class), never "best"."""
    positives = int(label.sum())
    if positives in (0, len(label)):
        return -1.0  # torchmetrics gives +1 to a constant model that matches the one class
    mcc = BinaryMatthewsCorrCoef()
    mcc.update(prob, label)
    value = float(mcc.compute())
    predicted = int((prob > 0.5).sum())
    if predicted in (0, len(prob)):
        value = 0.0
    return -1.0 if math.isnan(value) else value


class _Step(nn.Module):
    """The training forward as one module, so that DDP can wrap it (head mode: features -> head)."""

    def __init__(self, model: RoadworkClassifier, head_mode: bool) -> None:
        super().__init__()
        self.model, self.head_mode = model, head_mode

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return _forward(self.model, x, self.head_mode)


def _set_train_mode(model: RoadworkClassifier, head_mode: bool) -> None:
    model.train()
    if head_mode:
        model.backbone.eval()  # frozen: features are fixed; target (head + aggregator) trains


# ---------------------------------------------------------------- the phases of the loop


@dataclass
class _Optim:
    """What one optimizer step needs: the (DDP-wrapped) forward, AdamW, its parameters, scaler, EMA."""

    step_fn: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None


def _compiled(step_fn: nn.Module, backend: str) -> nn.Module:
    """`torch.compile` of the training forward (after DDP's wrap, so its buckets split the graph). A part
    dynamo cannot compile (a peft or timm construct it does not trace) runs eagerly with a warning instead of
    failing the run: `compile` is a speed setting, the loss and gradients are the same either way. That
    fallback holds only while the compiled forward runs: the process's other torch.compile users keep
    dynamo's own setting (errors raised)."""
    return _SuppressingDynamoErrors(torch.compile(step_fn, backend=backend))


class _SuppressingDynamoErrors(nn.Module):
    """Calls the compiled module with `torch._dynamo.config.suppress_errors` on for the call only (dynamo
    reads it when it compiles a frame, which happens inside the call)."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: Tensor):
        import torch._dynamo

        # The batch dimension is dynamic from the first compilation. An epoch's last, smaller batch would
        # otherwise compile the forward and backward again as dynamic, and from then on that dynamic graph
        # serves every batch (dynamo tries its newest entry first): the static one only ever ran the first
        # epoch. `maybe`: a model that needs a fixed batch size gets it, at the cost of that second compile.
        torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch._dynamo.config.patch(suppress_errors=True):
            return self.compiled(x)


def _build_optim(
    model: RoadworkClassifier,
    target: nn.Module,
    cfg: TrainConfig,
    precision: str,
    device,
    world: World,
    compile_backend: str | None = None,
) -> _Optim:
    step_fn = world.wrap(_Step(model, cfg.mode == "head"), device)  # DDP when distributed
    if compile_backend:
        step_fn = _compiled(step_fn, compile_backend)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(target, cfg.weight_decay), lr=cfg.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")
    ema = ModelEmaV3(target, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay else None
    return _Optim(step_fn, optimizer, params, scaler, ema)


def _ids(rows: pd.DataFrame) -> list[str] | None:
    """The rows' image_ids, so that every read checks the file still has those bytes (None without them)."""
    return rows["image_id"].astype(str).tolist() if "image_id" in rows.columns else None


def _build_data(
    model: RoadworkClassifier, cfg: TrainConfig, train_rows: pd.DataFrame, select_rows: pd.DataFrame
) -> _Data:
    """Image datasets (lora / dora / full); head mode fills its features in the first epoch (_fill_features)."""
    train_labels = torch.tensor(train_rows["label"].astype(float).to_numpy(), dtype=torch.float32)
    data = _Data(head_mode=cfg.mode == "head", train_labels=train_labels)
    if not data.head_mode:
        aug, points = _train_augmentation(cfg, train_rows)
        uris, labels = train_rows["uri"].tolist(), train_rows["label"].astype(int).tolist()
        # without augmentation every epoch reads the same pixels: decoded once (when they fit, see cache_canvases)
        data.train_set = cache_canvases(
            CanvasDataset(
                uris, labels, model.canvas_size, aug, mask_points=points, image_ids=_ids(train_rows)
            )
        )
        data.select_set = cache_canvases(  # read every epoch, never augmented: decoded once
            CanvasDataset(
                select_rows["uri"].tolist(),
                select_rows["label"].astype(int).tolist(),
                model.canvas_size,
                None,
                image_ids=_ids(select_rows),
            )
        )
    return data


def _fresh_state(cfg: TrainConfig, precision: str, fingerprint: str) -> dict[str, Any]:
    """The run state before its first epoch (it rides in every checkpoint)."""
    return {
        "fingerprint": fingerprint,
        "epoch": 0,
        "best_epoch": 0,
        "best_select_mcc": -math.inf,
        "stopped_early": False,
        "history": [],
        "config": dataclasses.asdict(cfg),
        "precision": precision,
        "rng": {"seed": cfg.seed, "epoch_seed": "int(sha256(f'{seed}:{epoch}')[:8], 16)"},
    }


def _resume(
    checkpoint_dir: Path, state: dict[str, Any], target: nn.Module, opt: _Optim
) -> tuple[dict[str, Any], int | None]:
    """Load the last finished epoch of the same run (same fingerprint) into target / optimizer / EMA /
    scaler; returns (state, the epoch resumed from) or (the fresh `state`, None)."""
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt is not None and ckpt.state.get("fingerprint") == state["fingerprint"]:
        target.load_state_dict(ckpt.model_state)
        opt.optimizer.load_state_dict(ckpt.optimizer_state)
        if opt.ema is not None and ckpt.ema_state is not None:
            opt.ema.module.load_state_dict(ckpt.ema_state)
        opt.scaler.load_state_dict(ckpt.state.get("scaler", {}))
        state = {k: v for k, v in ckpt.state.items() if k not in ("optimizer", "has_ema", "scaler")}
        log.info("resuming %s from finished epoch %d", checkpoint_dir, state["epoch"])
        return state, state["epoch"]
    if ckpt is not None:
        log.warning(
            "%s holds a checkpoint of a different run (fingerprint differs); starting fresh", checkpoint_dir
        )
    return state, None


def _fill_features(
    data: _Data,
    model: RoadworkClassifier,
    train_rows: pd.DataFrame,
    select_rows: pd.DataFrame,
    cache: FeatureCache,
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
    world: World,
) -> None:
    """Head mode, first epoch of this process: per-view features from the cache (computed when missing)."""
    if world.distributed:  # each rank fills its stride of the cache; then all read it whole
        for rows in (train_rows, select_rows):
            cache.get_or_compute(
                model, rows.iloc[world.rank :: world.world_size], device, cfg.batch_size, precision=precision,
                num_workers=cfg.num_workers,
            )  # fmt: skip
        world.barrier()
    # the images are decoded on cfg.num_workers DataLoader processes (the backbone, on a GPU, waits on them)
    fill = {"precision": precision, "num_workers": cfg.num_workers}
    data.train_feats = cache.get_or_compute(model, train_rows, device, cfg.batch_size, **fill)
    data.select_feats = cache.get_or_compute(model, select_rows, device, cfg.batch_size, **fill)
    data.select_labels = torch.tensor(select_rows["label"].astype(float).to_numpy(), dtype=torch.float32)


def _train_epoch(
    epoch: int,
    model: RoadworkClassifier,
    target: nn.Module,
    data: _Data,
    opt: _Optim,
    cfg: TrainConfig,
    schedule: list[float],
    steps_per_epoch: int,
    device: torch.device,
    precision: str,
    world: World,
    train_rows: pd.DataFrame,
) -> tuple[float, float]:
    """One pass over train: schedule -> forward/loss -> NaN guard -> backward/clip/step -> EMA.
    Returns (mean training loss over the global batch, last lr)."""
    dtype = precision_dtype(precision)
    _set_train_mode(model, data.head_mode)
    loss_sum, n_seen, lr = 0.0, 0, cfg.lr
    loader = _loader(data, cfg, epoch, train=True, world=world)
    weights = getattr(loader.batch_sampler, "loss_weights", None)  # distributed: this rank's share
    counts = getattr(loader.batch_sampler, "real_counts", None)
    for i, (x, label, index) in enumerate(loader):
        step = (epoch - 1) * steps_per_epoch + i
        lr = schedule[step]
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        x, label = x.to(device), label.to(device).float()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = opt.step_fn(x)
        loss = _smoothed_bce(out["logit"], label, cfg.label_smoothing)
        if not torch.isfinite(loss):  # CPU-GPU sync point, once per step: cheap next to the forward
            ids = train_rows["image_id"].iloc[index.tolist()].tolist()
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {epoch}, step {i + 1}/{steps_per_epoch} (lr {lr:.3g}, "
                f"precision {precision}); no optimizer step was taken. Likely fixes: lower TrainConfig.lr, "
                f"keep grad_clip on, use precision 'bf16-mixed' or 'fp32' instead of 'fp16-mixed', and "
                f"check this batch's images for corrupt pixels: image_ids {ids[:8]}"
            )
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss if weights is None else loss * weights[i]).backward()
        if cfg.grad_clip is not None:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(opt.params, cfg.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        if opt.ema is not None:
            opt.ema.update(target, step=step + 1)
        n_real = len(label) if counts is None else counts[i]
        loss_sum += float(loss.detach()) * n_real
        n_seen += n_real
    loss_sum, n_seen = world.sum(loss_sum, n_seen)
    return loss_sum / max(1, n_seen), lr


def _select(
    epoch: int,
    model: RoadworkClassifier,
    target: nn.Module,
    data: _Data,
    opt: _Optim,
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
    world: World,
    state: dict[str, Any],
    checkpoint_dir: Path,
) -> tuple[float, float]:
    """Score val_select with the EMA weights; a better MCC becomes the best checkpoint. (MCC, accuracy)."""
    with _ema_weights(target, opt.ema):
        mcc, acc = _evaluate(model, data, cfg, device, precision_dtype(precision), world)
        if mcc > state["best_select_mcc"]:
            state["best_epoch"], state["best_select_mcc"] = epoch, mcc
            if world.is_main:  # rank 0 alone writes files
                save_best(checkpoint_dir, target.state_dict(), epoch)
    return mcc, acc


def _save_last(
    checkpoint_dir: Path, target: nn.Module, opt: _Optim, state: dict[str, Any], world: World
) -> None:
    """Checkpoint the finished epoch (atomic; the state JSON rides inside last.safetensors); rank 0 writes."""
    if world.is_main:
        save_checkpoint(
            checkpoint_dir,
            model_state=target.state_dict(),
            ema_state=None if opt.ema is None else opt.ema.module.state_dict(),
            optimizer_state=opt.optimizer.state_dict(),
            state={**state, "scaler": opt.scaler.state_dict()},
        )
    world.barrier()  # best / last are on disk before any rank reads them


def _best_weights(
    model: RoadworkClassifier, target: nn.Module, cfg: TrainConfig, checkpoint_dir: Path, best_epoch: int
) -> dict[str, Tensor]:
    """Load the best checkpoint into `model`, adapters merged into the backbone; its state dict (CPU)."""
    target.load_state_dict(load_best(checkpoint_dir, best_epoch))
    if cfg.mode in ("lora", "dora"):
        from roadwork_core.models.adapters import merge_adapters

        model.backbone = merge_adapters(model.backbone)
    model.requires_grad_(True)
    model.eval()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the loop


def train_classifier(
    model: RoadworkClassifier,
    train_rows: pd.DataFrame,
    select_rows: pd.DataFrame,
    cfg: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    checkpoint_dir: Path,
    feature_cache_dir: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    compile_backend: str | None = None,
) -> TrainResult:
    """Train `model` on train_rows (image_id, uri, label), select on select_rows by MCC.

    Resumes from `checkpoint_dir` when it holds a checkpoint of the same run (fingerprint of config,
    image ids, labels and initial weights). On return `model` holds the best weights with adapters
    merged, i.e. exactly `TrainResult.state_dict`. Raises FloatingPointError on a NaN / inf loss.
    Under torchrun (an initialized process group) it trains data-parallel: see training/distributed.py.
    `compile_backend` ("inductor": the gpu resource's `compile`): the training forward runs through
    `torch.compile` with that backend; evaluation and the saved weights are the eager model's.
    """
    device = torch.device(device)
    world = World.from_env()
    checkpoint_dir = Path(checkpoint_dir)
    _check_inputs(cfg, precision, device, {"train_rows": train_rows, "select_rows": select_rows})
    fingerprint = _fingerprint(
        cfg, precision, train_rows, select_rows, state_dict_sha256(model), _architecture(model)
    )

    # model, optimizer, EMA, data
    torch.manual_seed(cfg.seed)  # adapter init is random: same seed, same adapters
    target = _prepare(model, cfg)
    model.to(device)
    counter = _ForwardCounter(model.backbone)
    opt = _build_optim(model, target, cfg, precision, device, world, compile_backend)
    data = _build_data(model, cfg, train_rows, select_rows)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    schedule = lr_schedule(cfg, steps_per_epoch)

    # resume: the last finished epoch of the same run, else a fresh state
    state, resumed_from = _resume(checkpoint_dir, _fresh_state(cfg, precision, fingerprint), target, opt)

    trainable = sum(p.numel() for p in opt.params)
    total = sum(p.numel() for p in model.parameters())
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if state["stopped_early"]:
                break
            t0, counter.count = time.perf_counter(), 0
            if data.head_mode and data.train_feats is None:  # first epoch of this process: fill / read cache
                cache = FeatureCache(feature_cache_dir or checkpoint_dir / "feature_cache")
                _fill_features(data, model, train_rows, select_rows, cache, cfg, device, precision, world)
            # dropout / augmentation stream of this epoch, seeded after the cache fill, which draws from the
            # global RNG only when entries are missing
            torch.manual_seed(epoch_seed(cfg.seed, epoch))
            train_loss, lr = _train_epoch(
                epoch, model, target, data, opt, cfg, schedule, steps_per_epoch, device, precision, world,
                train_rows,
            )  # fmt: skip
            mcc, acc = _select(
                epoch, model, target, data, opt, cfg, device, precision, world, state, checkpoint_dir
            )  # evaluates with the EMA weights; a better MCC is saved as the best checkpoint
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "select_mcc": mcc,
                "select_acc": acc,
                "lr": lr,
                "seconds": time.perf_counter() - t0,
                "backbone_forwards": counter.count,
            }
            state["history"].append(record)
            state["epoch"] = epoch
            state["stopped_early"] = epoch - state["best_epoch"] >= cfg.patience
            _save_last(checkpoint_dir, target, opt, state, world)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        counter.handle.remove()

    return TrainResult(
        state_dict=_best_weights(model, target, cfg, checkpoint_dir, state["best_epoch"]),
        best_epoch=state["best_epoch"],
        best_select_mcc=float(state["best_select_mcc"]),
        history=list(state["history"]),
        resumed_from_epoch=resumed_from,
        trainable_params=trainable,
        total_params=total,
    )
