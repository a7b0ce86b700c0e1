"""One source of defaults: the launchpad's config schema of the training assets is the core dataclasses'."""

from __future__ import annotations

import dataclasses

import pytest

from roadwork_assets._config import config_from
from roadwork_assets.training import classifier, explora_backbone
from roadwork_core.config import (
    BackboneConfig,
    ExploraConfig,
    HeadConfig,
    MultiViewConfig,
    TrainConfig,
    describe,
    from_mapping,
)


def _launchpad_fields(asset) -> dict:
    """The fields Dagster shows for the asset's config: name -> (default or None, description)."""
    fields = asset.op.config_schema.config_type.fields
    return {
        name: (f.default_value if f.default_provided else None, f.description, f.config_type)
        for name, f in fields.items()
    }


def _core(cls: type, exclude: tuple[str, ...] = ()) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in exclude:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            out[f.name] = (default, describe(f))
    return out


@pytest.mark.parametrize(
    ("asset", "sources"),
    [(explora_backbone, (ExploraConfig,)), (classifier, (TrainConfig, MultiViewConfig, HeadConfig))],
    ids=["explora_backbone", "classifier"],
)
def test_launchpad_defaults_are_the_core_defaults(asset, sources) -> None:
    shown = _launchpad_fields(asset)
    for cls in sources:
        for name, (default, doc) in _core(cls, exclude=("seed",)).items():
            assert name in shown, f"{cls.__name__}.{name} is missing from the {asset.key} launchpad"
            assert shown[name][0] == default, (
                f"{asset.key}.{name}: launchpad {shown[name][0]!r}, core {default!r}"
            )
            assert doc and shown[name][1] == doc, f"{asset.key}.{name}: description differs from the core"
    assert "seed" not in shown, "seed comes from the gpu resource, not from the asset config"


def test_nested_backbone_defaults_are_the_core_defaults() -> None:
    backbone = explora_backbone.op.config_schema.config_type.fields["backbone"].config_type.fields
    for name, (default, doc) in _core(BackboneConfig, exclude=("attn_backend", "model_kwargs")).items():
        assert backbone[name].default_value == default, name
        assert backbone[name].description == doc, name


def test_config_round_trips_to_the_core_dataclass() -> None:
    from roadwork_assets.training import ClassifierSettings, ExploraSettings

    assert from_mapping(ExploraConfig, ExploraSettings().model_dump(), seed=5) == ExploraConfig(seed=5)
    assert from_mapping(TrainConfig, ClassifierSettings().model_dump(), seed=5) == TrainConfig(seed=5)
    custom = ClassifierSettings(lora_rank=4, grid=2, aggregator="mean").model_dump()
    assert from_mapping(TrainConfig, custom).lora_rank == 4
    assert from_mapping(MultiViewConfig, custom).grid == 2
    assert from_mapping(HeadConfig, custom).aggregator == "mean"


def test_config_from_refuses_what_it_cannot_show() -> None:
    with pytest.raises(TypeError, match="model_kwargs"):
        config_from("Bad", BackboneConfig)  # a dict field has no typed launchpad form
    with pytest.raises(ValueError, match="two sources"):
        config_from("Twice", TrainConfig, ExploraConfig)  # e.g. lora_rank in both


def test_exact_fp32_turns_tf32_off_inside_and_restores_it():
    import torch

    from roadwork_core.config import exact_fp32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
        True  # as GPUResource.setup does
    )
    try:
        with exact_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
