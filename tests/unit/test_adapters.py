"""LoRA / DoRA adapters change the backbone, merge reproduces them, and the DINOv3 qkvb trap is handled."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from roadwork_core.models.adapters import _check_adapters_run, apply_adapters, merge_adapters
from roadwork_core.models.backbone import BackboneConfig, create_backbone

TINY = ("vit_test_tiny", "vit_test_tiny_dinov3", "vit_test_tiny_dinov3_qkvb")


def _set_lora_b(model: torch.nn.Module, name_part: str = "", std: float = 0.1) -> int:
    """Make lora_B non-zero (peft initialises it to zero, so a fresh adapter is the identity)."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name_part in name:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=std)
            count += 1
    return count


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("name", TINY)
def test_adapters_change_outputs_and_merge_reproduces_them(name: str, kind: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(name=name)).eval()
    x = torch.rand(3, 3, 32, 32)
    base = backbone(x)
    wrapped = apply_adapters(backbone, kind=kind, r=4, alpha=8).eval()
    torch.testing.assert_close(wrapped(x), base, msg=f"{name}/{kind}: a fresh adapter must be the identity")
    assert _set_lora_b(wrapped) > 0, "no adapter layers were inserted"
    adapted = wrapped(x)
    assert adapted.shape == base.shape
    assert (adapted - base).abs().max() > 1e-2, f"{name}/{kind}: non-zero lora_B left the output unchanged"
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), (
        f"only adapters should train: {sorted(trainable)[:5]}"
    )
    merged = merge_adapters(wrapped).eval()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules()), "merge left peft layers behind"
    assert type(merged).__name__ in ("VisionTransformer", "Eva")
    torch.testing.assert_close(merged(x), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_default_targets_are_block_linears_only(name: str) -> None:
    wrapped = apply_adapters(create_backbone(BackboneConfig(name=name)))
    targets = {
        n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)
    }
    assert "patch_embed.proj" not in targets, "a suffix match on 'proj' would catch patch_embed.proj"
    expected = {
        f"blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert targets == expected, f"{name}: targets {sorted(targets)}"


def test_qkvb_fused_qkv_adapter_actually_changes_outputs() -> None:
    """The trap: Eva with fused qkv + q/v bias calls F.linear on attn.qkv.weight directly."""
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(name="vit_test_tiny_dinov3_qkvb")).eval()
    attn = backbone.blocks[0].attn
    assert attn.qkv is not None and attn.q_bias is not None, "fixture must have the fused qkv + bias layout"
    x = torch.rand(2, 3, 32, 32)
    base = backbone(x)
    wrapped = apply_adapters(backbone).eval()
    assert _set_lora_b(wrapped, "attn.qkv") == 2
    assert (wrapped(x) - base).abs().max() > 1e-2, "LoRA on attn.qkv had no effect on a qkvb model"


def test_dead_adapter_is_detected_on_raw_qkvb_model() -> None:
    """Without the routing fix, peft wraps attn.qkv but the forward bypasses it: this must be caught."""
    backbone = create_backbone(BackboneConfig(name="vit_test_tiny_dinov3_qkvb")).eval()
    raw = get_peft_model(backbone, LoraConfig(r=4, target_modules=r"blocks\.\d+\.attn\.qkv"))
    with pytest.raises(ValueError, match=r"never run.*blocks\.0\.attn\.qkv"):
        _check_adapters_run(raw, 32)


def test_explicit_regex_and_unknown_kind() -> None:
    backbone = create_backbone(BackboneConfig(name="vit_test_tiny"))
    with pytest.raises(ValueError, match="Unknown adapter kind 'ia3'"):
        apply_adapters(backbone, kind="ia3")
    wrapped = apply_adapters(backbone, target_regex=r"blocks\.1\.mlp\.fc2")
    targets = [n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
    assert [t.removeprefix("base_model.model.") for t in targets] == ["blocks.1.mlp.fc2"]


@pytest.mark.parametrize(
    ("regex", "says"),
    [
        ("qkv", "matches no module"),  # a suffix, as a peft target list would match it: not a full name
        (r"blocks\.\d+", "not layers adapters can wrap"),  # whole blocks
        ("blocks.(", "not a regular expression"),
    ],
)
def test_a_target_regex_that_wraps_nothing_is_refused_naming_the_setting_and_real_names(regex, says) -> None:
    backbone = create_backbone(BackboneConfig(name="vit_test_tiny"))
    with pytest.raises(ValueError, match="lora_target_regex") as raised:
        apply_adapters(backbone, target_regex=regex)
    assert says in str(raised.value), raised.value
    if "regular expression" not in says:
        assert "blocks.0.attn.qkv" in str(raised.value), "the error should show what a module is called"


def test_pefts_all_linear_shorthand_is_still_accepted() -> None:
    wrapped = apply_adapters(create_backbone(BackboneConfig(name="vit_test_tiny")), target_regex="all-linear")
    targets = {
        n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)
    }
    assert "blocks.0.attn.qkv" in targets and "blocks.1.mlp.fc2" in targets, sorted(targets)


def test_merge_rejects_a_plain_model() -> None:
    with pytest.raises(TypeError, match="PeftModel"):
        merge_adapters(create_backbone(BackboneConfig(name="vit_test_tiny")))
