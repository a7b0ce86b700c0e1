"""One source of defaults: every config dataclass of the core, each knob declared once.

A knob is ``name: type = knob(default, "what it does")``: ``dataclasses.field`` with the description
in its metadata. The Dagster config classes (``roadwork_assets._config.config_from``) are generated
from these fields, so the launchpad shows exactly these names, types, defaults and descriptions;
``from_mapping`` builds a dataclass back from such a config's values. This module imports no torch,
timm or peft, so the asset modules can build their config classes without loading them.

The dataclasses are re-exported where they are used: ``models.backbone.BackboneConfig``,
``models.multiview.MultiViewConfig``, ``models.classifier.HeadConfig``, ``models.explora.ExploraConfig``,
``training.supervised.TrainConfig``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

__all__ = [
    "PRECISIONS",
    "BackboneConfig",
    "ExploraConfig",
    "HeadConfig",
    "MultiViewConfig",
    "TrainConfig",
    "describe",
    "from_mapping",
    "knob",
    "exact_fp32",
    "precision_dtype",
]

T = TypeVar("T")

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed"]  # fp16-mixed uses a gradient scaler and needs CUDA
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def precision_dtype(precision: str) -> Any:
    """The torch autocast dtype of a precision name; None for fp32 (no autocast)."""
    import torch  # lazy: this module stays importable without torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    return {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}[precision]


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Plain fp32 matmuls and convolutions inside (TF32 off on CUDA; nothing changes on CPU), restored
    after. The prediction assets run in it: calibration and policies are fitted on their logits, and a
    bundle serves in fp32, so the two must compute alike (bf16 autocast moved the tiny demo model's logits
    by up to 6e-3 and its calibrated p by 0.2, and failed the bundle's reproduction check)."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def serve_exact_fp32(device) -> None:
    """Turn TF32 off for this process when `device` is CUDA: a bundle's logits must be the ones its
    calibration and policies were fitted on, which the prediction assets computed under `exact_fp32`.
    PyTorch's default keeps TF32 on for cuDNN convolutions (the ViT patch embedding), and a per-call
    toggle would race between concurrent requests, so a bundle loaded on CUDA sets it once, for the
    process. Nothing changes on CPU or MPS."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def apply_torch_flags(*, threads: int = 0, deterministic: bool = False) -> None:
    """This process's torch settings of the `gpu` resource (an asset's process and every torchrun rank).

    threads > 0: intra-op threads. deterministic: `torch.use_deterministic_algorithms(True)`, strict (an op
    with no deterministic kernel raises, naming itself, instead of warning while results drift between runs;
    SDPA's fused CUDA backward switches to its deterministic path only in this mode), cuBLAS's fixed workspace
    (set before the process's first CUDA call) and cuDNN without autotuning. Otherwise TF32 on CUDA, as the
    resource always allowed for training; the prediction assets and bundles turn it off (`exact_fp32`)."""
    import os

    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def knob(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line description (shown in the Dagster launchpad)."""
    if isinstance(default, list | dict | set):
        raise TypeError(f"knob default {default!r} is mutable; use a tuple or a default_factory field")
    return dataclasses.field(default=default, metadata={"doc": doc})


def describe(f: dataclasses.Field) -> str | None:
    """The description given to `knob`, or None."""
    return f.metadata.get("doc")


def from_mapping(cls: type[T], values: Mapping[str, Any], **overrides: Any) -> T:
    """``cls(**values)`` keeping only cls's fields (other keys are ignored); lists become tuples where the
    field is a tuple. ``overrides`` win over ``values``."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values and f.name not in overrides:
            continue
        value = overrides[f.name] if f.name in overrides else values[f.name]
        if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------- the config dataclasses


POOLINGS: tuple[str, ...] = ("token", "avg", "max", "avgmax", "map")  # timm's global_pool values


@dataclass
class BackboneConfig:
    name: str = knob(
        "vit_test_tiny", "preset (dinov2_small, dinov3_base, vit_test_tiny, ...) or any timm ViT name"
    )
    pretrained: bool = knob(False, "load timm's pretrained weights from the hub (needs access)")
    weights_file: str | None = knob(None, "local weight file (safetensors / .pth); overrides the hub")
    pooling: str | None = knob(None, "token (CLS) | avg | max; null: the preset's default")
    img_size: int | None = knob(None, "backbone input size; null: the preset's default")
    grad_checkpointing: bool = knob(False, "recompute activations in backward (less memory, slower)")
    attn_backend: str = knob("sdpa", "sdpa (timm fused attention) | flash_attn | eager")
    model_kwargs: dict = field(default_factory=dict)

    def check_new(self) -> None:
        """Checks of a new run config (`roadwork_assets._config.check_config`), not of a saved classifier."""
        if self.pooling and self.pooling not in POOLINGS:
            raise ValueError(
                f"BackboneConfig.pooling={self.pooling!r} is not valid; use one of {', '.join(POOLINGS)} or null"
            )
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(
                f"BackboneConfig.img_size={self.img_size} must be >= 1 (or null for the preset's)"
            )


@dataclass
class MultiViewConfig:
    view_size: int | None = knob(None, "side of each square view; null: the backbone's input size")
    grid: int = knob(3, "grid x grid tiles")
    overlap: float = knob(0.15, "fraction of a tile shared with its neighbour")
    include_global: bool = knob(True, "prepend the whole image resized to view_size")
    hflip_tta: bool = knob(False, "append the horizontally flipped copy of every view")
    canvas_size: int | None = knob(None, "square canvas side before tiling; null: resolve_canvas_size")

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"MultiViewConfig.grid must be >= 1, got {self.grid}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"MultiViewConfig.overlap must be in [0, 1), got {self.overlap}")
        if self.view_size is not None and self.view_size < 1:
            raise ValueError(f"MultiViewConfig.view_size must be >= 1, got {self.view_size}")

    def check_new(self) -> None:
        """Checks of a new run config (a saved classifier with such a canvas still loads)."""
        if self.canvas_size is not None and (
            self.canvas_size < 1 or (self.view_size is not None and self.canvas_size < self.view_size)
        ):
            raise ValueError(
                f"MultiViewConfig.canvas_size={self.canvas_size} must be at least view_size ({self.view_size}): "
                "the tiles are cut from the canvas, a smaller one would only be upsampled; null picks it"
            )


@dataclass
class HeadConfig:
    """The per-view head and the aggregator (build_classifier's keywords; RoadworkClassifier's defaults)."""

    aggregator: Literal["topk_mean", "mean", "attention"] = knob("topk_mean", "topk_mean | mean | attention")
    topk: int = knob(3, "views averaged by topk_mean")
    dropout: float = knob(0.3, "dropout before the per-view linear head")

    def check_new(self) -> None:
        """Checks of a new run config (a saved classifier still loads)."""
        if self.topk < 1:
            raise ValueError(f"HeadConfig.topk={self.topk} must be >= 1 (the views topk_mean averages)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"HeadConfig.dropout={self.dropout}: use 0 <= dropout < 1 (at 1 every feature is zeroed)"
            )


@dataclass
class ExploraConfig:
    """Everything ExPLoRA needs: parameter plan, SSL loop, DINO head and schedules.

    Crop sizes ``None`` are derived from the backbone's input size (multiples of its patch size).
    ``max_steps`` (when set) overrides ``epochs``.
    """

    enabled: bool = knob(True, "false: pass the base weights through unchanged")
    # parameter plan
    unfrozen_blocks: int = knob(1, "the last N blocks are fully trainable")
    lora_rank: int = knob(8, "LoRA rank on Q and V of every frozen block")
    lora_alpha: float = knob(16.0, "LoRA scale numerator (scale = lora_alpha / lora_rank)")
    lora_every_other: bool = knob(
        False, "false (the paper): LoRA on every frozen block; true: on every other one"
    )
    train_norms: bool = knob(True, "norm layers trainable")
    train_cls_token: bool = knob(True, "class token trainable")
    train_reg_tokens: bool = knob(True, "register tokens trainable")
    # loop
    epochs: int = knob(1, "passes over the images (max_steps overrides)")
    max_steps: int | None = knob(None, "stop after this many steps; null: epochs decide")
    batch_size: int = knob(32, "images per step")
    lr: float = knob(1e-4, "peak AdamW lr, cosine decay to min_lr")
    min_lr: float = knob(1e-6, "final lr of the cosine schedule")
    lr_warmup_frac: float = knob(0.1, "share of steps with linear lr warmup")
    weight_decay: float = knob(0.04, "start of the cosine weight-decay schedule (DINO: 0.04 -> 0.4)")
    weight_decay_end: float = knob(0.4, "end of the cosine weight-decay schedule")
    drop_path_rate: float = knob(
        0.1, "stochastic depth on the student, rising linearly to this at the last block"
    )
    grad_clip: float | None = knob(3.0, "clip the gradient norm to this; null: no clipping")
    # multi-crop
    n_global_crops: int = knob(2, "global crops per image (DINO uses exactly 2)")
    n_local_crops: int = knob(4, "local crops per image")
    global_crop_size: int | None = knob(None, "null: the backbone's input size")
    local_crop_size: int | None = knob(None, "null: derived from the backbone's input size and patch")
    global_crop_scale: tuple[float, float] = knob((0.32, 1.0), "RandomResizedCrop area range, global crops")
    local_crop_scale: tuple[float, float] = knob((0.05, 0.32), "RandomResizedCrop area range, local crops")
    # DINO head and loss
    out_dim: int = knob(4096, "DINO prototypes K")
    head_hidden_dim: int = knob(2048, "DINO head hidden width")
    head_bottleneck_dim: int = knob(256, "DINO head bottleneck width")
    head_nlayers: int = knob(3, "DINO head MLP layers")
    teacher_momentum: float = knob(0.996, "teacher EMA momentum, cosine schedule to 1.0")
    teacher_temp: float = knob(0.07, "teacher softmax temperature after warmup")
    warmup_teacher_temp: float = knob(0.04, "teacher temperature at the first step")
    teacher_temp_warmup_frac: float = knob(0.3, "share of steps over which the teacher temperature warms up")
    student_temp: float = knob(0.1, "student softmax temperature")
    center_momentum: float = knob(0.9, "EMA momentum of the DINO center")
    freeze_last_layer_frac: float = knob(
        0.1, "the DINO head's last layer gets no update for this share of steps"
    )
    export_weights: str = knob("teacher", "teacher (as DINO / DINOv2 evaluate) | student")
    seed: int = knob(0, "seed of LoRA / head init, shuffles and crops")
    num_workers: int = knob(
        0,
        "DataLoader worker processes that decode and crop the images (0: in the training process). The crops "
        "are seeded per image, so the result does not depend on it; a GPU wants several",
    )

    def __post_init__(self) -> None:
        if self.n_global_crops != 2:
            raise ValueError(
                f"ExploraConfig.n_global_crops={self.n_global_crops}: DINO uses exactly 2; set 2."
            )
        if self.unfrozen_blocks < 0 or self.lora_rank < 0 or self.n_local_crops < 0:
            raise ValueError(
                "ExploraConfig: unfrozen_blocks, lora_rank and n_local_crops must be >= 0, got "
                f"{self.unfrozen_blocks}, {self.lora_rank}, {self.n_local_crops}."
            )
        if self.export_weights not in ("teacher", "student"):
            raise ValueError(
                f"ExploraConfig.export_weights={self.export_weights!r}: use 'teacher' or 'student'."
            )
        if self.num_workers < 0:
            raise ValueError(f"ExploraConfig.num_workers={self.num_workers}: use 0 or more worker processes.")
        if self.batch_size < 1:
            raise ValueError(f"ExploraConfig.batch_size={self.batch_size}: must be >= 1.")
        if self.enabled and (self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1)):
            raise ValueError(
                f"ExploraConfig: epochs={self.epochs}, max_steps={self.max_steps}: each must be >= 1 (max_steps may "
                "be null). To pass the base weights through without training, set explora_backbone.enabled: false."
            )
        if self.enabled and (not self.lr > 0 or self.min_lr < 0):
            raise ValueError(f"ExploraConfig: lr={self.lr} must be > 0 and min_lr={self.min_lr} >= 0.")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(
                f"ExploraConfig.grad_clip={self.grad_clip}: use a norm > 0, or 0 / null for no clipping (a negative "
                "norm reverses the gradient)"
            )
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ValueError(
                f"ExploraConfig.teacher_momentum={self.teacher_momentum}: use 0 <= momentum < 1 (1: a frozen "
                "teacher, with export_weights: student)"
            )
        if self.teacher_momentum == 1.0 and self.export_weights == "teacher":
            raise ValueError(
                "ExploraConfig.teacher_momentum=1.0 freezes the teacher, and export_weights is 'teacher': the "
                "exported weights would be the base weights. Use a momentum < 1, or export_weights: student"
            )
        temps = {"teacher_temp": self.teacher_temp, "warmup_teacher_temp": self.warmup_teacher_temp,
                 "student_temp": self.student_temp}  # fmt: skip
        if not all(t > 0 for t in temps.values()):
            raise ValueError(f"ExploraConfig: the softmax temperatures must be > 0, got {temps}")
        if not 0.0 <= self.lr_warmup_frac <= 1.0 or not 0.0 <= self.teacher_temp_warmup_frac <= 1.0:
            raise ValueError(
                f"ExploraConfig: lr_warmup_frac={self.lr_warmup_frac} and teacher_temp_warmup_frac="
                f"{self.teacher_temp_warmup_frac} are shares of the steps: use 0..1"
            )
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(
                    f"ExploraConfig.{name}=({lo}, {hi}): an area range needs 0 < low <= high <= 1"
                )
        if min(self.out_dim, self.head_hidden_dim, self.head_bottleneck_dim, self.head_nlayers) < 1:
            raise ValueError(
                "ExploraConfig: out_dim, head_hidden_dim, head_bottleneck_dim and head_nlayers must be >= 1"
            )
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"ExploraConfig.center_momentum={self.center_momentum}: use 0 <= momentum <= 1")
        if not 0.0 <= self.drop_path_rate < 1.0 or not 0.0 <= self.freeze_last_layer_frac <= 1.0:
            raise ValueError(
                f"ExploraConfig: need 0 <= drop_path_rate < 1 and 0 <= freeze_last_layer_frac <= 1, got "
                f"{self.drop_path_rate} and {self.freeze_last_layer_frac}."
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    mode: Literal["head", "lora", "dora", "full"] = knob(
        "head", "head (frozen backbone, cached features) | lora | dora | full"
    )
    epochs: int = knob(10, "maximum training epochs")
    batch_size: int = knob(32, "images per optimizer step")
    lr: float = knob(1e-4, "peak AdamW learning rate")
    weight_decay: float = knob(0.01, "AdamW weight decay (matrices only)")
    warmup_epochs: float = knob(1.0, "linear warmup (per step) over this many epochs, then cosine to 0")
    label_smoothing: float = knob(0.1, "BCE label smoothing")
    ema_decay: float | None = knob(
        0.999, "timm ModelEmaV3 decay (with warmup); the EMA weights are selected; null: no EMA"
    )
    patience: int = knob(3, "early stopping: epochs without a better val_select MCC")
    balanced_sampling: bool = knob(False, "draw training images class-balanced (WeightedRandomSampler)")
    augment: Literal["validator", "none"] = knob(
        "validator", "validator (the subnet's challenge replica) | none; not in head mode"
    )
    augment_max_level: int = knob(3, "training augmentation levels drawn uniformly in 0..augment_max_level")
    lora_rank: int = knob(8, "adapter rank for lora / dora")
    lora_alpha: float = knob(16.0, "adapter scale numerator (scale = lora_alpha / lora_rank)")
    lora_dropout: float = knob(0.0, "dropout on the adapter input")
    lora_target_regex: str | None = knob(
        None, "regex of the modules that get adapters; null: the backbone family's default"
    )
    grad_clip: float | None = knob(1.0, "clip the gradient norm to this; null: no clipping")
    seed: int = knob(0, "seed of adapter init, shuffles, dropout and augmentations")
    num_workers: int = knob(0, "DataLoader worker processes")

    def __post_init__(self) -> None:
        """Ranges no training can use, refused by name when the config is built (the classifier's run config is
        checked before any step runs: roadwork_assets.definitions.RoadworkIOManager)."""
        import math

        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(
                f"TrainConfig: epochs, batch_size and patience must be >= 1; got {self.epochs}, {self.batch_size} "
                f"and {self.patience}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(
                f"TrainConfig.lr={self.lr}: the learning rate must be > 0 (at lr 0 nothing trains)"
            )
        if not 0.0 <= self.label_smoothing < 1.0:  # False for NaN
            raise ValueError(
                f"TrainConfig.label_smoothing={self.label_smoothing}: use 0 <= label_smoothing < 1 (targets become "
                "label * (1 - s) + s / 2; at s > 1 they invert the labels)"
            )
        for name in ("weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name}={value}: use a finite number >= 0")
        if not 0 <= self.augment_max_level <= 3:
            raise ValueError(
                f"TrainConfig.augment_max_level={self.augment_max_level}: use 0..3 (validator levels)"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(
                f"TrainConfig.grad_clip={self.grad_clip}: use a norm > 0, or null for no clipping (0 zeroes every "
                "gradient, a negative norm reverses it)"
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(
                f"TrainConfig.ema_decay={self.ema_decay}: use 0 <= decay < 1, or null for no EMA"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout={self.lora_dropout}: use 0 <= dropout < 1")
        if self.mode in ("lora", "dora") and (self.lora_rank < 1 or not self.lora_alpha > 0):
            raise ValueError(
                f"TrainConfig: mode {self.mode!r} needs lora_rank >= 1 and lora_alpha > 0 (the adapters' scale is "
                f"lora_alpha / lora_rank; at 0 they add nothing), got {self.lora_rank} and {self.lora_alpha}"
            )
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig.num_workers={self.num_workers}: use 0 or more worker processes")
        if self.lora_target_regex is not None:
            import re

            try:
                re.compile(self.lora_target_regex)
            except re.error as exc:
                raise ValueError(
                    f"TrainConfig.lora_target_regex={self.lora_target_regex!r} is not a regular expression ({exc}); "
                    "write one over module names, e.g. 'blocks\\.\\d+\\.attn\\.qkv', or null for the backbone's default"
                ) from None
