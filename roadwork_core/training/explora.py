"""ExPLoRA extended self-supervised pretraining: DINO self-distillation on unlabelled target images.

Student = backbone (frozen, plus LoRA on Q/V, unfrozen last blocks, norms and tokens; see
``roadwork_core.models.explora``) + ``DINOHead``. Teacher = EMA copy of the student, built in
``make_teacher`` (requires_grad False, eval mode) and changed only by ``ema_update_``.
Multi-crop: 2 global + N local crops (torchvision.transforms.v2), sizes multiples of the patch.
Schedules (lr, weight decay 0.04 -> 0.4, teacher momentum, teacher temperature) are precomputed per
iteration like dinov2; the DINO head's last layer is frozen for the first steps; the student (not the
teacher, which runs in eval mode) uses drop-path.
The result is a merged, plain timm state dict with the input backbone's exact keys.

Of DINOv2's objective only the DINO image-level (CLS) loss with EMA centering is implemented: the iBOT
masked-patch loss, the KoLeo regularizer and Sinkhorn-Knopp centering are not.

With a ``checkpoint_dir`` every finished epoch is checkpointed (student and teacher trainable
tensors, DINO center, AdamW state; ``roadwork_core.training.checkpoint``) and a killed run resumes
from the last finished epoch. Every epoch reseeds its shuffle and augmentation streams
(``epoch_seed``), so a resumed run replays exactly the epochs it missed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import resolve_model_data_config
from timm.layers import DropPath
from torch import nn
from torchvision.transforms import v2

from roadwork_core.config import PRECISIONS, precision_dtype
from roadwork_core.models.backbone import state_dict_sha256
from roadwork_core.models.dino_head import DINOHead
from roadwork_core.models.explora import ExploraConfig, ExploraPlan, merge_explora, setup_explora
from roadwork_core.training.checkpoint import epoch_seed, load_checkpoint, save_checkpoint
from roadwork_core.training.dino_loss import DINOLoss
from roadwork_core.training.distributed import World, shard_bounds

log = logging.getLogger(__name__)

__all__ = [
    "DinoStudent",
    "ExploraConfig",
    "ExploraResult",
    "ExploraSchedules",
    "MultiCropAugmentation",
    "build_schedules",
    "ema_update_",
    "make_teacher",
    "resolve_crop_sizes",
    "run_explora",
    "set_drop_path",
]


@dataclass
class ExploraResult:
    state_dict: dict[str, torch.Tensor]  # merged, plain timm keys (== input backbone's keys)
    report: dict


@dataclass
class ExploraSchedules:
    lr: np.ndarray  # (steps,)
    weight_decay: np.ndarray  # (steps,)
    teacher_momentum: np.ndarray  # (steps,)
    teacher_temp: np.ndarray  # (steps,)


def _cosine(
    start: float, end: float, steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n = steps - warmup_steps
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * np.arange(n) / max(n, 1)))
    return np.concatenate([warmup, cosine])[:steps]


def build_schedules(cfg: ExploraConfig, steps: int) -> ExploraSchedules:
    """Per-iteration values: lr (linear warmup, cosine), weight decay (cosine up), momentum (cosine
    to 1), teacher temp (warmup)."""
    lr_warmup = int(round(cfg.lr_warmup_frac * steps))
    temp_warmup = min(int(round(cfg.teacher_temp_warmup_frac * steps)), steps)
    teacher_temp = np.concatenate(
        [
            np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, temp_warmup),
            np.full(steps - temp_warmup, cfg.teacher_temp),
        ]
    )
    return ExploraSchedules(
        lr=_cosine(cfg.lr, cfg.min_lr, steps, lr_warmup),
        weight_decay=_cosine(cfg.weight_decay, cfg.weight_decay_end, steps),
        teacher_momentum=_cosine(cfg.teacher_momentum, 1.0, steps),
        teacher_temp=teacher_temp,
    )


def _is_dynamic(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "dynamic_img_size", False))


def resolve_crop_sizes(backbone: nn.Module, cfg: ExploraConfig) -> tuple[int, int, int]:
    """(global_size, local_size, patch_size). None sizes derive from the model's input size.

    Local crops default to 96/224 of the global size (DINO's ratio), rounded to the patch size.
    A backbone without ``dynamic_img_size`` accepts one size only: both crop kinds are produced at
    its input size (local crops still cover a small area, then are resized up).
    """
    patch = int(backbone.patch_embed.patch_size[0])
    img_size = getattr(backbone.patch_embed, "img_size", None)
    model_size = int(img_size[0]) if img_size else int(resolve_model_data_config(backbone)["input_size"][-1])
    global_size = cfg.global_crop_size or (model_size // patch) * patch
    local_size = cfg.local_crop_size or max(patch, round(global_size * 96 / 224 / patch) * patch)
    for name, size in (("global_crop_size", global_size), ("local_crop_size", local_size)):
        if size % patch or size < patch:
            raise ValueError(
                f"ExploraConfig.{name}={size} is not a positive multiple of the patch size {patch}; "
                f"use {max(patch, round(size / patch) * patch)}."
            )
    if not _is_dynamic(backbone):
        if global_size != model_size:
            raise ValueError(
                f"ExploraConfig.global_crop_size={global_size} but the backbone takes only {model_size}px "
                "(built without dynamic_img_size=True); set global_crop_size=None or rebuild it dynamic."
            )
        local_size = model_size
    return global_size, local_size, patch


class MultiCropAugmentation:
    """PIL image -> (global crops: list of (3, G, G), local crops: list of (3, L, L)) tensors."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
    ) -> None:
        color = [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]

        def blur(p: float) -> v2.Transform:
            return v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=p)

        crop = v2.RandomResizedCrop
        self.global_1 = v2.Compose(
            [crop(global_size, scale=global_scale, antialias=True), *color, blur(1.0), *to_tensor]
        )
        self.global_2 = v2.Compose(
            [
                crop(global_size, scale=global_scale, antialias=True),
                *color,
                blur(0.1),
                v2.RandomSolarize(0.5, p=0.2),
                *to_tensor,
            ]
        )
        self.local = v2.Compose(
            [crop(local_size, scale=local_scale, antialias=True), *color, blur(0.5), *to_tensor]
        )
        self.n_local = n_local

    def __call__(self, image: Image.Image) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.global_1(image), self.global_2(image)], [self.local(image) for _ in range(self.n_local)]


class DinoStudent(nn.Module):
    """Backbone + DINO head; forward maps each crop group to prototype logits."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        tokens = self.backbone.forward_features(x)  # (B, N, D), prefix tokens first
        if getattr(self.backbone, "cls_token", None) is not None:
            return tokens[:, 0]  # class token (after the final norm)
        return self.backbone.forward_head(tokens, pre_logits=True)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops: tensors (B, 3, S_i, S_i), same-size groups batched together -> (n_crops, B, K)."""
        logits: list[torch.Tensor] = []
        i = 0
        while i < len(crops):  # batch consecutive crops of equal size in one forward pass
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            group = torch.cat(crops[i:j])  # ((j - i) * B, 3, S, S)
            logits.extend(self.head(self.features(group)).chunk(j - i))
            i = j
        return torch.stack(logits)  # (n_crops, B, K)


def make_teacher(student: nn.Module) -> nn.Module:
    """The one place the teacher is made: a deep copy, never trained by gradients, in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for the student's trainable params."""
    teacher_params = dict(teacher.named_parameters())
    pairs = [(teacher_params[n], p) for n, p in student.named_parameters() if p.requires_grad]
    if not pairs:
        return
    t, s = zip(*pairs, strict=True)
    torch._foreach_mul_(list(t), momentum)
    torch._foreach_add_(list(t), [x.detach() for x in s], alpha=1.0 - momentum)


def set_drop_path(backbone: nn.Module, rate: float) -> list[float]:
    """Stochastic depth on every block's residual branches, linear from 0 to `rate` (timm's rule).

    Works on timm VisionTransformer and Eva blocks (`drop_path1` / `drop_path2`); returns the rates.
    DropPath acts only in train mode, so an eval-mode copy (the teacher) is unaffected.
    """
    blocks = list(getattr(backbone, "blocks", []))
    if not blocks or not all(hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in blocks):
        raise TypeError(
            f"{type(backbone).__name__} has no timm blocks with drop_path1 / drop_path2; set "
            "ExploraConfig.drop_path_rate=0 for this backbone"
        )
    rates = np.linspace(0.0, rate, len(blocks)).tolist()
    for block, r in zip(blocks, rates, strict=True):
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
    return rates


def _default_load_image(uri: str) -> Image.Image:
    from roadwork_core.data.images import load_image  # lazy: the data layer is optional here

    return load_image(uri)


class _MultiCrops(torch.utils.data.Dataset):
    """Image `i` of `uris` -> its (global crops, local crops). The augmentation draws from a stream seeded by
    (epoch seed, i), so an image gets the same crops whichever DataLoader worker, rank or position in the
    batch produces it: the run does not depend on `num_workers`, and a resumed epoch replays its crops."""

    def __init__(
        self,
        uris: list[str],
        load_image: Callable[[str], Image.Image],
        augment: MultiCropAugmentation,
        seed: int,
    ) -> None:
        self.uris, self.load_image, self.augment, self.seed = uris, load_image, augment, seed

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, idx: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        try:
            image = self.load_image(self.uris[idx]).convert("RGB")
        except Exception as exc:
            raise ValueError(
                f"ExPLoRA could not read image {self.uris[idx]!r} (position {idx}): {exc}. "
                "Fix the file or drop it from the drop (the image table lists what the drop holds)."
            ) from exc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, idx + 1))
            return self.augment(image)


def _stack_crops(items: list[tuple[list[torch.Tensor], list[torch.Tensor]]]):
    """A batch of _MultiCrops items -> ([(B, 3, G, G)] per global crop, [(B, 3, L, L)] per local crop)."""
    n_global, n_local = len(items[0][0]), len(items[0][1])
    return (
        [torch.stack([g[k] for g, _ in items]) for k in range(n_global)],
        [torch.stack([loc[k] for _, loc in items]) for k in range(n_local)],
    )


def _epoch_batches(
    uris: list[str],
    batch_size: int,
    generator: torch.Generator,
    load_image: Callable[[str], Image.Image],
    augment: MultiCropAugmentation,
    world: World = World(),
    *,
    crop_seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor], float]]:
    """One shuffled pass: (global crops [(B, 3, G, G)] * 2, local crops [(B, 3, L, L)] * N, loss weight)
    per batch. Distributed: this rank's contiguous part of each global batch (training/distributed.py).
    Images are decoded and cropped by a DataLoader (`num_workers` processes; 0: in this process)."""
    order = torch.randperm(len(uris), generator=generator).tolist()
    parts, weights = [], []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lo, hi = shard_bounds(len(batch), world.rank, world.world_size)
        weights.append((hi - lo) * world.world_size / len(batch))
        parts.append(batch[lo:hi] or batch[:1])  # empty part of a short batch: one image, weight 0
    loader = torch.utils.data.DataLoader(
        _MultiCrops(uris, load_image, augment, crop_seed),
        batch_sampler=parts,
        num_workers=num_workers,
        collate_fn=_stack_crops,
        pin_memory=pin_memory,
    )
    for (globals_, locals_), weight in zip(loader, weights, strict=True):
        yield globals_, locals_, weight


def _param_groups(module: nn.Module) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms, tokens and layer scales."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def _disabled_result(backbone: nn.Module) -> ExploraResult:
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    total = sum(p.numel() for p in backbone.parameters())
    report = {
        "enabled": False,
        "note": "ExPLoRA disabled: base backbone weights passed through unchanged",
        "loss_curve": [],
        "trainable_params": 0,
        "total_params": total,
        "trainable_pct": 0.0,
        "blocks_unfrozen": [],
        "lora_blocks": [],
        "rank": 0,
        "images_used": 0,
        "steps": 0,
        "seconds": 0.0,
    }
    return ExploraResult(state_dict=state, report=report)


def _fingerprint(
    cfg: ExploraConfig,
    uris: list[str],
    backbone: nn.Module,
    steps: int,
    by_content: bool = True,
    precision: str = "fp32",
) -> str:
    """What makes two runs the same run; a checkpoint with another fingerprint is not resumed. The images
    count by content (sha256 of their bytes) and place: a pool image replaced under the same name is
    another run (a finished checkpoint of the old images was resumed, so nothing retrained). Without
    `by_content` (no checkpoint to resume) the bytes are not read."""
    contents = [_content_id(uri) for uri in uris] if by_content else None
    payload = {
        "config": {k: v for k, v in cfg.to_dict().items() if k != "num_workers"},  # the same run either way
        "uris": uris,
        "contents": contents,
        "steps": steps,
        "initial": state_dict_sha256(backbone),
        **({"precision": precision} if precision != "fp32" else {}),  # fp32: the fingerprints of before
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _content_id(uri: str) -> str:
    """sha256 of the image's bytes; for a uri that is no readable file (a caller's own `load_image`
    scheme), the marker `unreadable` (the uri itself is in the fingerprint)."""
    from roadwork_core.data.images import read_uri_bytes

    try:
        return hashlib.sha256(read_uri_bytes(uri)).hexdigest()
    except (OSError, ValueError):
        return "unreadable"


def _trainable(module: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {n: params[n] for n in names}


def _save_epoch(
    ckpt_dir: Path, student: nn.Module, teacher: nn.Module, dino_loss: DINOLoss,
    optimizer: torch.optim.Optimizer, names: list[str], state: dict,
) -> None:  # fmt: skip
    """Checkpoint a finished epoch: only what training changes (trainable tensors, center, AdamW)."""
    save_checkpoint(
        ckpt_dir,
        model_state={**_trainable(student, names), "dino_loss.center": dino_loss.center},
        ema_state=_trainable(teacher, names),  # the teacher is the student's EMA
        optimizer_state=optimizer.state_dict(),
        state=state,
    )


@torch.no_grad()
def _resume(
    ckpt_dir: Path, fingerprint: str, student: nn.Module, teacher: nn.Module, dino_loss: DINOLoss,
    optimizer: torch.optim.Optimizer, names: list[str],
) -> dict | None:  # fmt: skip
    """Load the last finished epoch of the same run into the modules; its state, or None (fresh start)."""
    ckpt = load_checkpoint(ckpt_dir)
    if ckpt is None:
        return None
    if ckpt.state.get("fingerprint") != fingerprint or ckpt.ema_state is None:
        log.warning(
            "%s holds a checkpoint of a different run (fingerprint differs); starting fresh", ckpt_dir
        )
        return None
    dino_loss.center.copy_(ckpt.model_state.pop("dino_loss.center"))
    for module, tensors in ((student, ckpt.model_state), (teacher, ckpt.ema_state)):
        params = _trainable(module, names)
        if set(tensors) != set(params):
            raise ValueError(
                f"checkpoint {ckpt_dir} does not hold this run's trainable tensors; delete {ckpt_dir} "
                "to start ExPLoRA from scratch"
            )
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer_state)
    state = {k: v for k, v in ckpt.state.items() if k not in ("optimizer", "has_ema")}
    log.info("resuming ExPLoRA from %s at finished epoch %d", ckpt_dir, state["epoch"])
    return state


@dataclass
class _Setup:
    """The student (backbone copy + LoRA plan + DINO head), its EMA teacher, the loss and AdamW."""

    plan: ExploraPlan
    head: DINOHead
    student: DinoStudent
    teacher: nn.Module
    student_step: nn.Module  # the student, DDP-wrapped when distributed
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    drop_path_rates: list[float]
    names: list[str]  # the trainable parameters (what a checkpoint holds)


def _build(backbone: nn.Module, cfg: ExploraConfig, device, world: World) -> _Setup:
    """Student = wrapped copy + head; teacher = EMA copy (call under the run's seed)."""
    student_backbone = copy.deepcopy(backbone)
    plan: ExploraPlan = setup_explora(student_backbone, cfg)
    drop_path_rates = set_drop_path(student_backbone, cfg.drop_path_rate) if cfg.drop_path_rate else []
    head = DINOHead(
        student_backbone.num_features,
        cfg.out_dim,
        cfg.head_hidden_dim,
        cfg.head_bottleneck_dim,
        cfg.head_nlayers,
    )
    student = DinoStudent(student_backbone, head).to(device).train()
    teacher = make_teacher(student)
    student_step = world.wrap(student, torch.device(device))  # DDP when distributed
    dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device)
    optimizer = torch.optim.AdamW(_param_groups(student), lr=cfg.lr, weight_decay=cfg.weight_decay)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    return _Setup(plan, head, student, teacher, student_step, dino_loss, optimizer, drop_path_rates, names)


@dataclass
class _StepPlan:
    steps_per_epoch: int
    steps: int  # max_steps, or epochs * steps_per_epoch
    epochs: int
    schedules: ExploraSchedules  # per step
    freeze_last_layer_steps: int


def _plan_steps(cfg: ExploraConfig, n_images: int) -> _StepPlan:
    steps_per_epoch = math.ceil(n_images / cfg.batch_size)
    steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    return _StepPlan(
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        epochs=math.ceil(steps / steps_per_epoch),
        schedules=build_schedules(cfg, steps),
        freeze_last_layer_steps=math.ceil(cfg.freeze_last_layer_frac * steps),
    )


def _explora_epoch(
    epoch: int,
    s: _Setup,
    batches: Iterator[tuple[list[torch.Tensor], list[torch.Tensor], float]],
    steps: range,
    schedules: ExploraSchedules,
    freeze_last_layer_steps: int,
    cfg: ExploraConfig,
    device,
    world: World,
    loss_curve: list[float],
    on_step: Callable[[dict], None] | None,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """The steps of one epoch: schedule -> forward/loss -> backward/clip -> student step, teacher EMA -> log.
    `dtype`: the forwards run under autocast to it (bf16 / fp16 mixed precision); the loss, the optimizer
    and the EMA stay fp32. `scaler`: fp16's gradient scaler."""
    device_type = torch.device(device).type
    for step, (globals_, locals_, weight) in zip(steps, batches):
        # schedule
        for group in s.optimizer.param_groups:
            group["lr"] = float(schedules.lr[step])
            if group["decay"]:
                group["weight_decay"] = float(schedules.weight_decay[step])
        teacher_temp = float(schedules.teacher_temp[step])
        globals_ = [x.to(device, non_blocking=True) for x in globals_]
        locals_ = [x.to(device, non_blocking=True) for x in locals_]

        # forward / backward: teacher sees global crops only, student sees all of them
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                teacher_logits = s.teacher(globals_)  # (2, B, K)
            student_logits = s.student_step(globals_ + locals_)  # (2 + N, B, K)
        loss = s.dino_loss(student_logits.float(), teacher_logits.float(), teacher_temp)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"ExPLoRA loss is {loss.item()} at step {step}; lower ExploraConfig.lr (now {cfg.lr})."
            )
        s.optimizer.zero_grad(set_to_none=True)
        scaled = loss * weight if world.distributed else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if step < freeze_last_layer_steps:
            s.head.cancel_last_layer_grads()
        if cfg.grad_clip:
            if scaler is not None:
                scaler.unscale_(s.optimizer)
            nn.utils.clip_grad_norm_([p for p in s.student.parameters() if p.requires_grad], cfg.grad_clip)

        # step: student by AdamW, teacher by EMA only
        if scaler is not None:
            scaler.step(s.optimizer)  # skipped when fp16 overflowed
            scaler.update()
        else:
            s.optimizer.step()
        momentum = float(schedules.teacher_momentum[step])
        ema_update_(s.teacher, s.student, momentum)

        # log (loss.item() is a device sync point, once per step)
        if world.distributed:  # the global batch's mean loss
            loss_curve.append(world.sum(float(loss.item()) * weight)[0] / world.world_size)
        else:
            loss_curve.append(float(loss.item()))
        if on_step is not None:
            on_step(
                {"step": step, "loss": loss_curve[-1], "lr": float(schedules.lr[step]),
                 "weight_decay": float(schedules.weight_decay[step]),
                 "teacher_momentum": momentum, "teacher_temp": teacher_temp,
                 "last_layer_frozen": step < freeze_last_layer_steps}
            )  # fmt: skip


def _merged_weights(exported: DinoStudent, input_keys: list[str]) -> dict[str, torch.Tensor]:
    """The exported backbone with LoRA merged: a plain state dict with exactly the input backbone's keys."""
    merged = {k: v.cpu() for k, v in merge_explora(exported.backbone).items()}
    if set(merged) != set(input_keys):
        missing = sorted(set(input_keys) - set(merged))
        extra = sorted(set(merged) - set(input_keys))
        raise RuntimeError(
            f"merged ExPLoRA state dict keys differ from the backbone's: missing {missing}, extra {extra}"
        )
    return {k: merged[k] for k in input_keys}


def _report(
    cfg: ExploraConfig, s: _Setup, plan: _StepPlan, loss_curve: list[float], n_images: int,
    resumed_from: int | None, seconds: float, crop_sizes: tuple[int, int],
) -> dict:  # fmt: skip
    """What run_explora reports (ExploraResult.report)."""
    return {
        "enabled": True,
        "loss_curve": loss_curve,
        **s.plan.summary(),
        "images_used": n_images,
        "steps": plan.steps,
        "epochs": plan.epochs,
        "resumed_from_epoch": resumed_from,
        "seconds": seconds,
        "global_crop_size": crop_sizes[0],
        "local_crop_size": crop_sizes[1],
        "n_local_crops": cfg.n_local_crops,
        "drop_path_rates": s.drop_path_rates,
        "freeze_last_layer_steps": plan.freeze_last_layer_steps,
        "objective": "DINO CLS loss with EMA centering; iBOT, KoLeo and Sinkhorn-Knopp not implemented",
        "exported": cfg.export_weights,
        "config": cfg.to_dict(),
    }


def run_explora(
    backbone: nn.Module,
    image_uris: list[str],
    cfg: ExploraConfig,
    *,
    device: str | torch.device = "cpu",
    load_image: Callable[[str], Image.Image] | None = None,
    on_step: Callable[[dict], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    precision: str = "fp32",
) -> ExploraResult:
    """Continue DINO self-distillation on ``image_uris`` with the ExPLoRA plan; return merged weights.

    ``backbone`` is not modified (a copy is trained). ``on_step`` receives
    ``{"step", "loss", "lr", "weight_decay", "teacher_momentum", "teacher_temp", "last_layer_frozen"}``
    after every iteration.
    With ``checkpoint_dir``, every finished epoch is checkpointed there and a run with the same
    config, images and initial weights resumes from it (``report["resumed_from_epoch"]``).
    ``precision``: the gpu resource's (``fp32``, ``bf16-mixed``, ``fp16-mixed`` with a gradient scaler, CUDA
    only): the student and teacher forwards run under autocast, the loss, AdamW and the EMA in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16-mixed" and torch.device(device).type != "cuda":
        raise ValueError(
            f"precision='fp16-mixed' needs a CUDA device (got {device}); use 'bf16-mixed' or 'fp32'"
        )
    if not cfg.enabled:
        return _disabled_result(backbone)
    if not image_uris:
        raise ValueError("run_explora got no images: pass the train split (+ unlabelled pool) URIs.")
    input_keys = list(backbone.state_dict().keys())
    world = World.from_env()  # torchrun: data-parallel over the global batch
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        s = _build(backbone, cfg, device, world)

        # data and schedules
        global_size, local_size, _ = resolve_crop_sizes(backbone, cfg)
        data_cfg = resolve_model_data_config(backbone)
        augment = MultiCropAugmentation(
            global_size, local_size, cfg.n_local_crops, data_cfg["mean"], data_cfg["std"],
            cfg.global_crop_scale, cfg.local_crop_scale,
        )  # fmt: skip
        plan = _plan_steps(cfg, len(image_uris))
        steps_per_epoch, steps = plan.steps_per_epoch, plan.steps
        load = load_image or _default_load_image

        # resume: the last finished epoch of the same run
        fingerprint = _fingerprint(
            cfg, image_uris, backbone, steps, by_content=checkpoint_dir is not None, precision=precision
        )
        state = {"fingerprint": fingerprint, "epoch": 0, "loss_curve": []}
        dtype = precision_dtype(precision)
        scaler = torch.amp.GradScaler(torch.device(device).type) if precision == "fp16-mixed" else None
        resumed = None
        if checkpoint_dir is not None:
            checkpoint_dir = Path(checkpoint_dir)
            resumed = _resume(
                checkpoint_dir, state["fingerprint"], s.student, s.teacher, s.dino_loss, s.optimizer, s.names
            )
            state = resumed or state
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        resumed_from = None if resumed is None else int(state["epoch"])
        loss_curve: list[float] = state["loss_curve"]

        for epoch in range(state["epoch"] + 1, plan.epochs + 1):
            torch.manual_seed(epoch_seed(cfg.seed, epoch))  # drop-path stream of this epoch
            generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))  # shuffle
            first = (epoch - 1) * steps_per_epoch
            batches = _epoch_batches(
                image_uris, cfg.batch_size, generator, load, augment, world,
                crop_seed=epoch_seed(cfg.seed, epoch), num_workers=cfg.num_workers,
                pin_memory=torch.device(device).type == "cuda",
            )  # fmt: skip
            epoch_steps = range(first, min(first + steps_per_epoch, steps))
            _explora_epoch(
                epoch, s, batches, epoch_steps, plan.schedules, plan.freeze_last_layer_steps, cfg, device, world,
                loss_curve, on_step, dtype=dtype, scaler=scaler,
            )  # fmt: skip

            # checkpoint (atomic; the state JSON rides inside last.safetensors); rank 0 writes
            state["epoch"] = epoch
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if checkpoint_dir is not None and world.rank == 0:
                _save_epoch(checkpoint_dir, s.student, s.teacher, s.dino_loss, s.optimizer, s.names, state)

        merged = _merged_weights(s.teacher if cfg.export_weights == "teacher" else s.student, input_keys)
    seconds = time.perf_counter() - t0
    report = _report(
        cfg, s, plan, loss_curve, len(image_uris), resumed_from, seconds, (global_size, local_size)
    )
    return ExploraResult(state_dict=merged, report={**report, "precision": precision})
