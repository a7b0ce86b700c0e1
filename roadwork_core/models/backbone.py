"""Backbone factory: a timm ViT (VisionTransformer or Eva) from a preset name or any timm ViT name.

Every backbone comes back headless (`num_classes=0`): `forward(x (B, 3, S, S)) -> (B, D)` with
`D = model.num_features`. Preprocessing (mean / std / input size) travels with the model in its
`pretrained_cfg`; callers read it through `backbone_data_config`, never hard-code it.

Weights, in order of precedence:
- `weights_file`: a local file (safetensors or a torch state dict, read by timm's `load_state_dict` and the
  model's own `checkpoint_filter_fn`, as timm's pretrained loading does) loaded strictly: a classifier
  head in the file is dropped, any other key the model lacks or misses is an error. No network access.
- `pretrained=True`: timm's own source (Hugging Face hub); needs network access.
- otherwise random init (tests, the CPU demo).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from roadwork_core.config import BackboneConfig

__all__ = [
    "ATTN_BACKENDS",
    "PRESETS",
    "BackboneConfig",
    "backbone_data_config",
    "create_backbone",
    "state_dict_sha256",
]

# Architecture numbers for the tiny random-init test models (fast on a CPU core).
_TINY = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, img_size=32)
# DINOv3's layer scale starts at 1e-5, which makes a random-init 2-block model an (almost) constant
# function of its input; the tiny variant starts it at 1.0 so tests see input-dependent outputs.
_TINY_DINOV3 = dict(_TINY, init_values=1.0)
_DINOV2 = dict(img_size=224)

# preset name -> timm model name, default pooling, extra model kwargs, pretrained_cfg overlay.
PRESETS: dict[str, dict[str, Any]] = {
    # timm's DINOv2 default input is 518 px; the presets use 224 (the network's image size, 16x16
    # patches), timm resamples the position embedding when it loads the 518 weights.
    "dinov2_small": dict(timm_name="vit_small_patch14_dinov2", pooling="token", model_kwargs=_DINOV2),
    "dinov2_small_reg4": dict(
        timm_name="vit_small_patch14_reg4_dinov2", pooling="token", model_kwargs=_DINOV2
    ),
    "dinov2_base": dict(timm_name="vit_base_patch14_dinov2", pooling="token", model_kwargs=_DINOV2),
    "dinov2_base_reg4": dict(timm_name="vit_base_patch14_reg4_dinov2", pooling="token", model_kwargs=_DINOV2),
    # DINOv3 uses CLS-token pooling upstream; timm's Eva defaults to "avg", so the preset says "token".
    "dinov3_small": dict(timm_name="vit_small_patch16_dinov3", pooling="token"),
    "dinov3_small_qkvb": dict(timm_name="vit_small_patch16_dinov3_qkvb", pooling="token"),
    "dinov3_base": dict(timm_name="vit_base_patch16_dinov3", pooling="token"),
    "dinov3_base_qkvb": dict(timm_name="vit_base_patch16_dinov3_qkvb", pooling="token"),
    # Tiny random-init models: the timm classes and code paths of the real ones, 2 blocks of width 48.
    "vit_test_tiny": dict(timm_name="vit_tiny_patch16_224", pooling="token", model_kwargs=_TINY),
    "vit_test_tiny_dinov3": dict(
        timm_name="vit_small_patch16_dinov3", pooling="token", model_kwargs=_TINY_DINOV3
    ),
    # DINOv3 "qkvb" layout: fused attn.qkv plus separate q/v bias (the F.linear LoRA trap, see adapters.py).
    "vit_test_tiny_dinov3_qkvb": dict(
        timm_name="vit_small_patch16_dinov3_qkvb", pooling="token", model_kwargs=_TINY_DINOV3
    ),
}

ATTN_BACKENDS: tuple[str, ...] = ("sdpa", "flash_attn", "eager")


class FlashAttnAttention(Attention):
    """timm `Attention` whose core runs `flash_attn.flash_attn_func` (CUDA, fp16 / bf16 only).

    Same parameters and state dict as `timm.layers.Attention`, so weights load unchanged. fp32
    inputs are computed in bf16 and cast back (flash-attn has no fp32 kernel).
    """

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        from flash_attn import flash_attn_func

        if attn_mask is not None:
            raise ValueError("attn_backend='flash_attn' does not support attn_mask; use attn_backend='sdpa'")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, hd)
        q, k, v = qkv.unbind(2)  # each (B, N, H, hd): flash-attn's layout
        q, k = self.q_norm(q), self.k_norm(k)
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_func(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0,
            softmax_scale=self.scale,
            causal=is_causal,
        ).to(x.dtype)  # (B, N, H, hd)
        out = self.norm(out.reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def _require_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "BackboneConfig.attn_backend='flash_attn' needs the flash-attn package, which is not installed. "
            "Install the project's gpu extra (pip install -e '.[gpu]', CUDA only) or use attn_backend='sdpa' "
            "(PyTorch SDPA already picks a flash kernel on supported GPUs)."
        ) from e


def _resolve(cfg: BackboneConfig) -> tuple[str, dict[str, Any]]:
    """Preset or timm name -> (timm model name, kwargs for timm.create_model)."""
    if cfg.attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"Unknown attn_backend {cfg.attn_backend!r}; valid: {', '.join(ATTN_BACKENDS)}")
    preset = PRESETS.get(cfg.name)
    if preset is None and not timm.is_model(cfg.name):
        raise ValueError(
            f"Unknown backbone {cfg.name!r}. Valid presets: {', '.join(sorted(PRESETS))}; "
            "or pass any timm ViT name (timm.list_models('vit_*')), e.g. 'vit_small_patch14_dinov2'."
        )
    preset = preset or dict(timm_name=cfg.name)
    timm_name = preset["timm_name"]
    kwargs: dict[str, Any] = dict(preset.get("model_kwargs", {}))
    kwargs.update(cfg.model_kwargs)
    pooling = cfg.pooling or preset.get("pooling")
    if pooling is not None:
        kwargs["global_pool"] = pooling
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.attn_backend == "flash_attn":
        _require_flash_attn()
        if timm.models.model_entrypoint(timm_name).__module__ != "timm.models.vision_transformer":
            raise ValueError(
                f"attn_backend='flash_attn' is supported for timm VisionTransformer models (e.g. DINOv2), "
                f"not {timm_name!r} (Eva / DINOv3 with RoPE); use attn_backend='sdpa' there."
            )
        kwargs["attn_layer"] = FlashAttnAttention
    return timm_name, kwargs


def _check_weights_file(path: Path) -> None:
    """A missing or non-weights file named up front (timm says only 'No checkpoint found')."""
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone.weights_file {path} does not exist (or is not a file); give the path of a local "
            "safetensors / torch state-dict file, or set it to null"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001  SafetensorError and friends: the header does not parse
            raise ValueError(
                f"backbone.weights_file {path} is not a readable safetensors file ({err}); re-download it"
            ) from err


def _load_weights_file(model: nn.Module, path: Path, timm_name: str) -> None:
    """Load `path` into the headless `model`, strictly. timm's pretrained loading turns non-strict whenever
    the model's class count differs from its pretrained_cfg's (1000 for ImageNet-tuned ViTs, and timm's test
    ViTs), so a file of another layout (a classifier checkpoint's `backbone.`-prefixed keys, another
    model's) would leave the backbone random with a log line only. The same steps as timm's: its
    `load_state_dict` (safetensors or torch, `state_dict` / `model` wrappers, the `module.` prefix), the
    model's `checkpoint_filter_fn` (upstream DINOv2 / DINOv3 layouts, position embeddings resampled to
    the built image size), the classifier head dropped; then every key must match."""
    import sys

    from timm.models import load_state_dict

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"backbone.weights_file {path} could not be loaded into {timm_name} ({why}); give the {timm_name} "
            "backbone's own weights (timm or upstream layout) as safetensors or a torch state dict"
        )

    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
    except Exception as err:  # noqa: BLE001  unpickling refused, a truncated file, a layout the filter rejects
        raise refuse(f"{type(err).__name__}: {err}") from err
    heads = model.pretrained_cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        state.pop(f"{head}.weight", None)
        state.pop(f"{head}.bias", None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit (another size of the same family)
        raise refuse(f"RuntimeError: {str(err)[:600]}") from err
    if result.missing_keys or result.unexpected_keys:

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        raise refuse(
            f"{len(result.missing_keys)} of the model's weights not in the file: {first(result.missing_keys) or '-'}; "
            f"{len(result.unexpected_keys)} keys of the file not in the model: {first(result.unexpected_keys) or '-'}"
        )


def require_whole_patches(cfg: BackboneConfig, model: nn.Module) -> None:
    """A new run's `img_size` must be a multiple of the patch size, unless timm pads the input
    (`dynamic_img_pad`): otherwise the last pixels of every view are cut off. Saved models are not checked."""
    patch = int(model.patch_embed.patch_size[0])
    if cfg.img_size is None or cfg.img_size % patch == 0 or cfg.model_kwargs.get("dynamic_img_pad"):
        return
    low = cfg.img_size - cfg.img_size % patch
    raise ValueError(
        f"backbone.img_size={cfg.img_size} is not a multiple of {cfg.name}'s patch size {patch}: the last "
        f"{cfg.img_size % patch} px of every view would be cut off; use {low or patch} or {low + patch}"
    )


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """Headless timm ViT for `cfg`: forward(x (B, 3, S, S)) -> (B, num_features).

    Downloads only when `cfg.pretrained` is set and no `weights_file` is given.
    """
    timm_name, kwargs = _resolve(cfg)
    overlay: dict[str, Any] = {}
    if "img_size" in kwargs:  # keep pretrained_cfg's input_size in step with the built model
        overlay["input_size"] = (3, int(kwargs["img_size"]), int(kwargs["img_size"]))
    pretrained = cfg.pretrained and cfg.weights_file is None
    if cfg.weights_file is not None:
        _check_weights_file(Path(cfg.weights_file))
    try:
        model = timm.create_model(
            timm_name,
            pretrained=pretrained,
            num_classes=0,
            pretrained_cfg_overlay=overlay or None,
            **kwargs,
        )
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"backbone.pretrained: true could not fetch the {timm_name} weights from timm's source (the Hugging "
            f"Face hub: {type(err).__name__}: {err}). Without network access, download them once elsewhere and set "
            "backbone.weights_file to the local file (pretrained is then ignored)"
        ) from err
    if not isinstance(model, VisionTransformer | Eva):
        raise ValueError(
            f"Backbone {cfg.name!r} builds a {type(model).__name__}; only timm VisionTransformer and Eva "
            f"(DINOv2 / DINOv3) backbones are supported. Valid presets: {', '.join(sorted(PRESETS))}"
        )
    if cfg.weights_file is not None:
        _load_weights_file(model, Path(cfg.weights_file), timm_name)
    if cfg.attn_backend in ("sdpa", "eager"):
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = cfg.attn_backend == "sdpa"
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def backbone_data_config(model: nn.Module) -> dict[str, tuple]:
    """{"mean": (r, g, b), "std": (r, g, b), "input_size": (3, S, S)} from the model's pretrained_cfg."""
    data_cfg = timm.data.resolve_model_data_config(model)
    return {
        "mean": tuple(float(m) for m in data_cfg["mean"]),
        "std": tuple(float(s) for s in data_cfg["std"]),
        "input_size": tuple(int(s) for s in data_cfg["input_size"]),
    }


def state_dict_sha256(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Stable sha256 over (name, dtype, shape, bytes) of every tensor, keys sorted.

    Independent of device and of parameter registration order; any changed weight changes it.
    """
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
