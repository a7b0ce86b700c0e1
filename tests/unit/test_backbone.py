"""Backbone factory: presets, pooling defaults, weights from a local file, attention backends, hashing."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from safetensors.torch import save_file

from roadwork_core.models.backbone import (
    PRESETS,
    BackboneConfig,
    backbone_data_config,
    create_backbone,
    require_whole_patches,
    state_dict_sha256,
)

TINY = ("vit_test_tiny", "vit_test_tiny_dinov3", "vit_test_tiny_dinov3_qkvb")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_a_registered_timm_model(name: str) -> None:
    timm_name = PRESETS[name]["timm_name"]
    assert timm.is_model(timm_name), f"preset {name!r} points at unknown timm model {timm_name!r}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_build_headless_models(name: str) -> None:
    model = create_backbone(BackboneConfig(name=name)).eval()
    data_cfg = backbone_data_config(model)
    assert data_cfg["input_size"] == (3, 32, 32), f"{name}: input_size {data_cfg['input_size']}"
    out = model(torch.rand(2, *data_cfg["input_size"]))
    assert out.shape == (2, model.num_features), f"{name}: headless output shape {tuple(out.shape)}"
    assert model.num_features == 48


def test_dinov3_presets_default_to_cls_token_pooling_and_pooling_is_overridable() -> None:
    # depth=1 keeps the real-width DINOv3 S/16 cheap to build; pooling is what is under test.
    dinov3 = create_backbone(BackboneConfig(name="dinov3_small", model_kwargs={"depth": 1}))
    assert dinov3.global_pool == "token", (
        f"DINOv3 preset pools with {dinov3.global_pool!r}, upstream uses CLS"
    )
    assert create_backbone(BackboneConfig(name="vit_test_tiny_dinov3")).global_pool == "token"
    avg = create_backbone(BackboneConfig(name="vit_test_tiny_dinov3", pooling="avg"))
    assert avg.global_pool == "avg", "an explicit pooling must override the preset default"


def test_normalization_comes_from_pretrained_cfg() -> None:
    dinov3 = create_backbone(BackboneConfig(name="vit_test_tiny_dinov3"))
    assert backbone_data_config(dinov3)["mean"] == pytest.approx(dinov3.pretrained_cfg["mean"])
    assert backbone_data_config(dinov3)["std"] == pytest.approx((0.229, 0.224, 0.225))
    vit = create_backbone(BackboneConfig(name="vit_test_tiny"))
    assert backbone_data_config(vit)["mean"] == pytest.approx(vit.pretrained_cfg["mean"])
    big = create_backbone(BackboneConfig(name="dinov3_small", model_kwargs={"depth": 1}))
    assert backbone_data_config(big)["input_size"] == (3, 256, 256), "DINOv3 input size from its cfg"


def test_img_size_override_updates_the_data_config() -> None:
    model = create_backbone(BackboneConfig(name="vit_test_tiny", img_size=48))
    assert backbone_data_config(model)["input_size"] == (3, 48, 48)
    assert model(torch.rand(1, 3, 48, 48)).shape == (1, 48)


def test_unknown_name_lists_valid_presets() -> None:
    with pytest.raises(ValueError, match="Unknown backbone 'dinov9_giant'") as info:
        create_backbone(BackboneConfig(name="dinov9_giant"))
    for preset in ("vit_test_tiny", "dinov2_small", "dinov3_base"):
        assert preset in str(info.value), f"error should list preset {preset!r}: {info.value}"


def test_non_vit_timm_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="VisionTransformer and Eva"):
        create_backbone(BackboneConfig(name="resnet10t"))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attn_without_package_is_a_clear_error() -> None:
    with pytest.raises(ImportError, match="flash-attn package.*attn_backend='sdpa'"):
        create_backbone(BackboneConfig(name="vit_test_tiny", attn_backend="flash_attn"))


def test_unknown_attn_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown attn_backend 'xformers'"):
        create_backbone(BackboneConfig(name="vit_test_tiny", attn_backend="xformers"))


@pytest.mark.parametrize("name", ["vit_test_tiny", "vit_test_tiny_dinov3"])
def test_sdpa_and_eager_attention_agree(name: str) -> None:
    torch.manual_seed(0)
    sdpa = create_backbone(BackboneConfig(name=name, attn_backend="sdpa")).eval()
    eager = create_backbone(BackboneConfig(name=name, attn_backend="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    flags = {m.fused_attn for m in eager.modules() if hasattr(m, "fused_attn")}
    assert flags == {False}, f"eager backend left fused attention on: {flags}"
    assert {m.fused_attn for m in sdpa.modules() if hasattr(m, "fused_attn")} == {True}
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(sdpa(x), eager(x), atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_is_enabled_on_request() -> None:
    model = create_backbone(BackboneConfig(name="vit_test_tiny", grad_checkpointing=True))
    assert model.grad_checkpointing is True


@pytest.mark.parametrize("name", ["vit_test_tiny", "vit_test_tiny_dinov3"])
def test_weights_file_loads_those_weights(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    source = create_backbone(BackboneConfig(name=name)).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = create_backbone(BackboneConfig(name=name, weights_file=str(path))).eval()
    fresh = create_backbone(BackboneConfig(name=name))
    assert state_dict_sha256(loaded) == state_dict_sha256(source), "factory did not load the file's weights"
    assert state_dict_sha256(fresh) != state_dict_sha256(source), "random init should differ from the file"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x))


def test_state_dict_sha256_is_stable_and_weight_sensitive() -> None:
    model = create_backbone(BackboneConfig(name="vit_test_tiny"))
    state = model.state_dict()
    digest = state_dict_sha256(model)
    assert digest == state_dict_sha256(dict(reversed(list(state.items())))), "hash depends on key order"
    assert digest == state_dict_sha256({k: v.clone() for k, v in state.items()}), "hash not stable"
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert state_dict_sha256(model) != digest, "a changed weight must change the hash"
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items() if v.is_floating_point()}
    assert len(state_dict_sha256(bf16)) == 64, "bf16 tensors must hash too"


def test_dinov2_preset_loads_518px_weights_at_224(tmp_path) -> None:
    """Real DINOv2 files are 518 px; the preset runs at 224 and timm resamples the position embedding."""
    source = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", model_kwargs={"depth": 1}))
    assert backbone_data_config(source)["input_size"] == (3, 518, 518)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone(
        BackboneConfig(name="dinov2_small", weights_file=str(path), model_kwargs={"depth": 1})
    )
    assert backbone_data_config(model)["input_size"] == (3, 224, 224)
    assert model.pos_embed.shape[1] == 1 + 16 * 16, "position embedding not resampled to 16x16 patches"
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_weights_file_and_offline_pretrained_errors_name_the_setting_and_the_fix(
    tmp_path, monkeypatch
) -> None:
    import pytest

    from roadwork_core.models.backbone import BackboneConfig, create_backbone

    with pytest.raises(
        FileNotFoundError, match=r"backbone\.weights_file .*missing\.safetensors does not exist"
    ):
        create_backbone(
            BackboneConfig(name="vit_test_tiny", weights_file=str(tmp_path / "missing.safetensors"))
        )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<html>a login page, not weights</html>")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        create_backbone(BackboneConfig(name="vit_test_tiny", weights_file=str(junk)))
    import huggingface_hub.constants

    # never the network (make test exports HF_HUB_OFFLINE=1; the constant is read when the hub is imported)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"set backbone\.weights_file to the local file"):
        create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=True))


@pytest.mark.parametrize("name", ["vit_test_tiny", "vit_small_patch16_224"])
def test_weights_file_of_another_layout_is_refused_not_left_random(name: str, tmp_path) -> None:
    """timm loads non-strictly when the model's class count differs from its pretrained_cfg's (vit_test_tiny,
    ImageNet-tuned ViTs): a classifier checkpoint's `backbone.`-prefixed keys left the backbone random with a
    log line only. Every key must now match; a classifier head in the file is dropped, not refused."""
    kwargs = {"depth": 1} if name != "vit_test_tiny" else {}
    source = create_backbone(BackboneConfig(name=name, model_kwargs=kwargs))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    prefixed = tmp_path / "classifier.safetensors"
    save_file({f"backbone.{k}": v for k, v in state.items()}, str(prefixed))
    with pytest.raises(
        ValueError, match=r"weights_file .*classifier\.safetensors could not be loaded .* not in the file"
    ):
        create_backbone(BackboneConfig(name=name, weights_file=str(prefixed), model_kwargs=kwargs))
    with_head = tmp_path / "with_head.pth"
    width = source.num_features
    torch.save(
        {"model": {**state, "head.weight": torch.zeros(1000, width), "head.bias": torch.zeros(1000)}},
        with_head,
    )
    loaded = create_backbone(BackboneConfig(name=name, weights_file=str(with_head), model_kwargs=kwargs))
    assert state_dict_sha256(loaded) == state_dict_sha256(source), (
        "the file's backbone weights were not loaded"
    )


def test_an_img_size_that_is_no_multiple_of_the_patch_is_refused() -> None:
    """vit_test_tiny has 8 px patches: at 50 px the last 2 px of every view were cut off without a word (with
    ExPLoRA on, the error blamed global_crop_size, which the user had not set)."""
    with pytest.raises(
        ValueError, match=r"backbone.img_size=50 is not a multiple of .* patch size 8.*use 48 or 56"
    ):
        require_whole_patches(cfg := BackboneConfig(name="vit_test_tiny", img_size=50), create_backbone(cfg))
    require_whole_patches(cfg := BackboneConfig(name="vit_test_tiny", img_size=48), create_backbone(cfg))
    padded = BackboneConfig(name="vit_test_tiny", img_size=50, model_kwargs={"dynamic_img_pad": True})
    require_whole_patches(padded, create_backbone(padded))  # timm pads: nothing is cut off
