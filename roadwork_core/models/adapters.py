"""PEFT adapters (LoRA / DoRA) on a timm ViT backbone through peft, with REGEX target modules.

A plain target list in peft matches by name suffix, so "proj" would also catch `patch_embed.proj`;
a regex (peft `re.fullmatch` on the module name) says exactly which linears of which blocks.

The DINOv3 "qkvb" trap: timm's Eva attention with a fused `attn.qkv` and separate q / v biases
computes `F.linear(x, self.qkv.weight, qkv_bias)` instead of calling `self.qkv(x)`, so a LoRA that
wraps `attn.qkv` never runs. `apply_adapters` switches those attention modules to timm's own
`qkv_bias_separate=True` path (`self.qkv(x) + qkv_bias`, the same math, same state dict) before
wrapping, and afterwards checks with forward hooks that every wrapped module is really called,
raising if one is not.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
    "ADAPTER_KINDS",
    "DEFAULT_TARGET_REGEX",
    "apply_adapters",
    "default_target_regex",
    "merge_adapters",
]

ADAPTER_KINDS: dict[str, dict[str, bool]] = {"lora": {"use_dora": False}, "dora": {"use_dora": True}}

# The layer types peft's LoRA / DoRA can wrap (a ViT's are its linears and the patch embedding's conv).
_WRAPPABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)

# Every linear of the attention and MLP of every block, per timm family.
DEFAULT_TARGET_REGEX: dict[type[nn.Module], str] = {
    VisionTransformer: r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
    Eva: r"blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))",
}


def default_target_regex(backbone: nn.Module) -> str:
    for cls, regex in DEFAULT_TARGET_REGEX.items():
        if isinstance(backbone, cls):
            return regex
    raise ValueError(
        f"No default LoRA targets for {type(backbone).__name__}; pass target_regex (a regex over module "
        f"names, e.g. {DEFAULT_TARGET_REGEX[VisionTransformer]!r})"
    )


def _route_fused_qkv_through_module(backbone: nn.Module) -> None:
    """Make Eva's fused-qkv-with-bias attention call `self.qkv(x)` so an adapter on it takes effect."""
    for module in backbone.modules():
        if isinstance(module, EvaAttention) and module.qkv is not None and module.q_bias is not None:
            module.qkv_bias_separate = True


def _require_adaptable_targets(backbone: nn.Module, regex: str) -> None:
    """Refuse, naming the setting and real module names, a regex that matches no module or matches one peft
    cannot wrap (a whole block, a norm): peft's own errors say neither which setting nor what would match."""
    import re

    if regex.lower() == "all-linear":  # peft's shorthand for every linear layer but the output head
        return
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(
            f"LoRA target regex {regex!r} (lora_target_regex) is not a regular expression: {exc}"
        ) from None
    linears = [name for name, m in backbone.named_modules() if isinstance(m, _WRAPPABLE)]
    matched = {name: m for name, m in backbone.named_modules() if name and pattern.fullmatch(name)}
    examples = ", ".join(linears[:6])
    if not matched:
        raise ValueError(
            f"LoRA target regex {regex!r} (lora_target_regex) matches no module of {type(backbone).__name__}: it must "
            f"match whole module names (re.fullmatch). Its linear layers are named like: {examples}"
        )
    wrong = sorted(name for name, m in matched.items() if not isinstance(m, _WRAPPABLE))
    if wrong:
        raise ValueError(
            f"LoRA target regex {regex!r} (lora_target_regex) matches {len(wrong)} module(s) that are not layers "
            f"adapters can wrap (linear, conv, embedding): {wrong[:4]}{' ...' if len(wrong) > 4 else ''}. Match linear "
            f"layers only, e.g. {examples}"
        )


def _check_adapters_run(model: nn.Module, img_size: int) -> None:
    """Run one tiny forward and raise if any wrapped module was never called (its adapter is dead)."""
    called: set[str] = set()
    handles = []
    lora_modules = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, module in lora_modules.items():
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: called.add(name)))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    dead = sorted(set(lora_modules) - called)
    if dead:
        raise ValueError(
            f"Adapters on {len(dead)} module(s) never run in the backbone's forward, so they would train "
            f"nothing: {dead[:4]}{' ...' if len(dead) > 4 else ''}. The model uses their weights directly "
            "(e.g. F.linear on a fused qkv weight); pass a target_regex that excludes them."
        )


def apply_adapters(
    backbone: nn.Module,
    kind: str = "lora",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_regex: str | None = None,
) -> nn.Module:
    """Wrap `backbone` with peft LoRA (kind="lora") or DoRA (kind="dora"); base weights frozen.

    Returns the peft-wrapped backbone: forward(x (B, 3, S, S)) -> (B, D) as before, attributes
    (num_features, pretrained_cfg) reachable through it.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"Unknown adapter kind {kind!r}; valid: {', '.join(ADAPTER_KINDS)}")
    regex = target_regex or default_target_regex(backbone)
    _require_adaptable_targets(backbone, regex)
    _route_fused_qkv_through_module(backbone)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=regex,
        bias="none",
        **ADAPTER_KINDS[kind],
    )
    model = get_peft_model(backbone, config)
    img_size = int(getattr(backbone, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
    _check_adapters_run(model, img_size)
    return model


def merge_adapters(backbone: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns the plain timm model (no peft layers)."""
    if not isinstance(backbone, PeftModel):
        raise TypeError(
            f"merge_adapters expects the PeftModel returned by apply_adapters, got {type(backbone).__name__}"
        )
    return backbone.merge_and_unload()
