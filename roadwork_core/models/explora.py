"""ExPLoRA parameter surgery on a timm ViT: LoRA on Q and V, unfrozen blocks, norms and tokens, merge.

ExPLoRA (Khanna et al., arXiv 2406.10973): keep a pretrained DINOv2 / DINOv3 backbone frozen except
the last ``unfrozen_blocks`` blocks (all of their parameters), every norm layer and the class /
register tokens; put LoRA of rank r on the attention Q and V projections of every remaining (frozen)
block (``lora_every_other=True`` halves that, an option the paper does not use); continue the source
model's self-supervised objective (see ``roadwork_core.training.explora`` for which parts of it).

Why a parametrization on ``attn.qkv.weight`` and not peft or a replacement module:
timm's attention uses ONE fused ``qkv`` Linear (rows ``[0:d]`` are Q, ``[d:2d]`` K, ``[2d:3d]`` V).
``VisionTransformer`` calls ``self.qkv(x)``, but ``timm.models.eva.EvaAttention`` (DINOv3) with
``q_bias``/``v_bias`` (the ``*_qkvb`` variants) calls ``F.linear(x, weight=self.qkv.weight, ...)``
and so bypasses any replacement module's ``forward``. ``torch.nn.utils.parametrize`` hooks the
*attribute* ``qkv.weight`` itself, so every code path that reads the weight sees
``W + scale * [B_q A_q; 0; B_v A_v]``; K rows are untouched by construction. peft on the whole
``qkv`` would also adapt K, which ExPLoRA does not. Eva built with ``qkv_fused=False`` has separate
``q_proj`` / ``v_proj`` Linears; those get the same parametrization over all of their rows.

``merge_explora`` evaluates the parametrized weights once and returns a plain timm state dict
(the exact keys of the un-wrapped backbone), so downstream code loads it with
``model.load_state_dict`` and never sees LoRA.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import timm.layers
import torch
from torch import nn
from torch.nn.utils import parametrize

from roadwork_core.config import ExploraConfig

__all__ = [
    "NORM_LAYERS",
    "ExploraConfig",
    "ExploraPlan",
    "QVLoRA",
    "add_qv_lora",
    "count_trainable_closed_form",
    "merge_explora",
    "plan_lora_blocks",
    "setup_explora",
]

# Layer types counted as "norm layers" (train_norms=True makes all of them trainable).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,  # also timm.layers.LayerNorm / LayerNormFp32 (subclasses)
    nn.GroupNorm,
    nn.RMSNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    timm.layers.RmsNorm,
    timm.layers.SimpleNorm,
)


@dataclass
class ExploraPlan:
    """What ``setup_explora`` did to the backbone (all counts in scalar parameters)."""

    trainable_params: int
    total_params: int  # every parameter of the wrapped backbone, LoRA factors included
    trainable_pct: float
    blocks_unfrozen: list[int]
    lora_blocks: list[int]
    rank: int
    lora_alpha: float
    trainable_names: list[str]

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("trainable_names")
        return d


class QVLoRA(nn.Module):
    """Parametrization ``W -> W + (alpha / r) * B @ A`` applied to chosen row ranges of a weight.

    For a fused qkv weight (3d, d_in) the ranges are Q ``[0, d)`` and V ``[2d, 3d)``; K rows pass
    through unchanged. ``B`` starts at zero, so wrapping does not change outputs until trained.
    """

    def __init__(self, in_features: int, row_ranges: list[tuple[int, int]], rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"QVLoRA rank={rank}: must be >= 1.")
        self.row_ranges = sorted(row_ranges)
        self.scale = alpha / rank
        self.lora_A = nn.ParameterList()  # each (r, d_in)
        self.lora_B = nn.ParameterList()  # each (rows, r)
        for start, stop in self.row_ranges:
            a = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # same init as peft / nn.Linear
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(stop - start, rank)))

    def delta(self, index: int) -> torch.Tensor:
        return self.scale * (self.lora_B[index] @ self.lora_A[index])  # (rows, d_in)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # weight: (d_out, d_in)
        pieces, cursor = [], 0
        for i, (start, stop) in enumerate(self.row_ranges):
            if start > cursor:
                pieces.append(weight[cursor:start])
            pieces.append(weight[start:stop] + self.delta(i).to(weight.dtype))
            cursor = stop
        if cursor < weight.shape[0]:
            pieces.append(weight[cursor:])
        return torch.cat(pieces, dim=0)


def _qv_targets(attn: nn.Module) -> list[tuple[nn.Linear, list[tuple[int, int]]]]:
    """(Linear, row ranges) pairs holding Q and V for one timm attention module."""
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        d_out = qkv.out_features
        if d_out % 3:
            raise ValueError(f"{type(attn).__name__}.qkv has {d_out} output rows, not a multiple of 3.")
        d = d_out // 3
        return [(qkv, [(0, d), (2 * d, 3 * d)])]
    q_proj, v_proj = getattr(attn, "q_proj", None), getattr(attn, "v_proj", None)
    if isinstance(q_proj, nn.Linear) and isinstance(v_proj, nn.Linear):
        return [(q_proj, [(0, q_proj.out_features)]), (v_proj, [(0, v_proj.out_features)])]
    raise TypeError(
        f"Cannot find Q/V projections on {type(attn).__name__}: expected a fused `qkv` Linear "
        "(timm VisionTransformer / Eva) or `q_proj` + `v_proj` Linears."
    )


def add_qv_lora(model: nn.Module, block_indices: list[int], rank: int, alpha: float) -> None:
    """Register a ``QVLoRA`` parametrization on the Q/V weights of ``model.blocks[i].attn``."""
    for i in block_indices:
        for linear, ranges in _qv_targets(model.blocks[i].attn):
            if parametrize.is_parametrized(linear, "weight"):
                raise ValueError(f"blocks.{i}.attn already carries LoRA; call setup_explora once per model.")
            parametrize.register_parametrization(
                linear, "weight", QVLoRA(linear.in_features, ranges, rank, alpha), unsafe=False
            )


def plan_lora_blocks(depth: int, unfrozen_blocks: int, every_other: bool) -> list[int]:
    """Frozen blocks that get LoRA: every other one counted back from the last frozen block."""
    frozen = list(range(depth - min(unfrozen_blocks, depth)))
    chosen = frozen[::-1][::2] if every_other else frozen
    return sorted(chosen)


def _token_params(model: nn.Module, cfg: ExploraConfig) -> list[nn.Parameter]:
    params = []
    if cfg.train_cls_token and isinstance(getattr(model, "cls_token", None), nn.Parameter):
        params.append(model.cls_token)
    if cfg.train_reg_tokens and isinstance(getattr(model, "reg_token", None), nn.Parameter):
        params.append(model.reg_token)
    return params


def setup_explora(backbone: nn.Module, cfg: ExploraConfig) -> ExploraPlan:
    """Freeze ``backbone`` in place, then unfreeze the ExPLoRA plan and add LoRA on Q/V.

    Trainable afterwards: every parameter of the last ``cfg.unfrozen_blocks`` blocks, all norm
    layers (``train_norms``), ``cls_token`` / ``reg_token`` (bare parameters, per config) and the
    LoRA factors. Patch embedding, position embedding and the other block weights stay frozen.
    """
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"setup_explora needs a timm ViT with `.blocks` (VisionTransformer or Eva), got {type(backbone).__name__}."
        )
    depth = len(blocks)
    if cfg.unfrozen_blocks > depth:
        raise ValueError(
            f"ExploraConfig.unfrozen_blocks={cfg.unfrozen_blocks} exceeds the model depth {depth}."
        )

    backbone.requires_grad_(False)
    blocks_unfrozen = list(range(depth - cfg.unfrozen_blocks, depth))
    for i in blocks_unfrozen:
        blocks[i].requires_grad_(True)
    if cfg.train_norms:
        for module in backbone.modules():
            if isinstance(module, NORM_LAYERS):
                module.requires_grad_(True)
    for p in _token_params(backbone, cfg):
        p.requires_grad_(True)

    lora_blocks = plan_lora_blocks(depth, cfg.unfrozen_blocks, cfg.lora_every_other) if cfg.lora_rank else []
    add_qv_lora(backbone, lora_blocks, cfg.lora_rank, cfg.lora_alpha)  # new LoRA params: requires_grad

    trainable_names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in backbone.parameters())
    return ExploraPlan(
        trainable_params=trainable,
        total_params=total,
        trainable_pct=100.0 * trainable / total,
        blocks_unfrozen=blocks_unfrozen,
        lora_blocks=lora_blocks,
        rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        trainable_names=trainable_names,
    )


def count_trainable_closed_form(
    *,
    embed_dim: int,
    depth: int,
    mlp_hidden_dim: int,
    unfrozen_blocks: int,
    lora_rank: int,
    lora_every_other: bool = False,
    train_norms: bool = True,
    train_cls_token: bool = True,
    num_reg_tokens: int = 0,
    train_reg_tokens: bool = True,
    qkv_bias: bool = True,
    layer_scale: bool = True,
) -> int:
    """Trainable parameters of a pre-norm timm VisionTransformer (LayerNorm with bias) after ExPLoRA.

    Per block (dim d, MLP hidden h): 2 LayerNorms 4d; qkv 3d^2 (+3d bias); proj d^2 + d;
    MLP 2dh + h + d; LayerScale 2d. LoRA of rank r on Q and V of one block: 2 * (r*d + d*r) = 4rd.
    Frozen blocks contribute their norms (4d) when ``train_norms``; the final norm adds 2d.
    """
    d, h, r = embed_dim, mlp_hidden_dim, lora_rank
    norms_per_block = 4 * d
    block = (
        norms_per_block
        + 3 * d * d
        + (3 * d if qkv_bias else 0)
        + d * d
        + d
        + 2 * d * h
        + h
        + d
        + (2 * d if layer_scale else 0)
    )
    n_lora = len(plan_lora_blocks(depth, unfrozen_blocks, lora_every_other)) if r else 0
    total = unfrozen_blocks * block + n_lora * 4 * r * d
    if train_norms:
        total += (depth - unfrozen_blocks) * norms_per_block + 2 * d  # + final norm
    if train_cls_token:
        total += d
    if train_reg_tokens:
        total += num_reg_tokens * d
    return total


@torch.no_grad()
def merge_explora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain timm state dict of ``model`` with every LoRA update folded into its weight.

    The model is left as it is (still parametrized). Keys are exactly those of the un-wrapped
    backbone; bare parameters (``cls_token``, ``reg_token``) are included explicitly.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():  # keeps the backbone's key order
        parts = key.split(".")
        if "parametrizations" not in parts:
            merged[key] = value.detach().clone().contiguous()
            continue
        at = parts.index("parametrizations")
        module_name, tensor_name = ".".join(parts[:at]), parts[at + 1]
        merged_key = f"{module_name}.{tensor_name}" if module_name else tensor_name
        if merged_key not in merged:  # first of original / original0 / LoRA factors
            module = model.get_submodule(module_name)
            merged[merged_key] = getattr(module, tensor_name).detach().clone().contiguous()
    for token in ("cls_token", "reg_token"):  # bare parameters: saved explicitly
        param = getattr(model, token, None)
        if isinstance(param, nn.Parameter):
            merged[token] = param.detach().clone().contiguous()
    return merged
