"""The classifier directory format: `model.safetensors` + `config.json`, nothing pickled.

`config.json`:
    {"format": "roadwork.classifier", "format_version": 1,
     "classifier": classifier_config_dict(model),   # backbone / multiview / aggregator / topk / dropout / mean / std
     "weights": {"file": "model.safetensors", "sha256": <sha256 of the file>, "num_tensors": n},
     "extra": {...}}                                 # caller's metadata (training config, metrics, ...)

The explora_backbone directory format (`save_backbone` / `load_backbone`): `backbone.safetensors`
(plain timm keys), `config.json` ({"backbone": the BackboneConfig that rebuilds it (no hub, no file),
"source": the BackboneConfig the base weights came from, "seed", "base_sha256"}) and `report.json`
(what the ExPLoRA run reports).

The classifier asset writes this format and the release bundle embeds it (a bundle directory is a
superset: same two files plus calibrator, policy and manifest). Rebuilding never downloads: the
backbone is rebuilt with `pretrained=False, weights_file=None` and every weight comes from the
safetensors file, loaded strictly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from roadwork_core.io import atomic_dir, atomic_write_bytes, atomic_write_text, sha256_file
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import RoadworkClassifier, build_classifier, classifier_config_dict
from roadwork_core.models.multiview import MultiViewConfig

__all__ = [
    "BACKBONE_CONFIG_FILE",
    "BACKBONE_REPORT_FILE",
    "BACKBONE_WEIGHTS_FILE",
    "CLASSIFIER_CONFIG_FILE",
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_FORMAT_VERSION",
    "CLASSIFIER_WEIGHTS_FILE",
    "SavedBackbone",
    "load_backbone",
    "load_classifier",
    "load_weights",
    "read_classifier_config",
    "inference_attn_backend",
    "rebuild_classifier",
    "save_backbone",
    "save_classifier",
]

CLASSIFIER_FORMAT = "roadwork.classifier"
CLASSIFIER_FORMAT_VERSION = 1
CLASSIFIER_WEIGHTS_FILE = "model.safetensors"
CLASSIFIER_CONFIG_FILE = "config.json"
BACKBONE_WEIGHTS_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "config.json"
BACKBONE_REPORT_FILE = "report.json"


def _state_to_save(model: RoadworkClassifier, state_dict: Mapping[str, torch.Tensor] | None) -> dict:
    state = dict(model.state_dict() if state_dict is None else state_dict)
    adapter_keys = [k for k in state if "lora_" in k or "base_layer" in k]
    if adapter_keys:
        raise ValueError(
            f"save_classifier got a backbone with PEFT adapter weights (e.g. {adapter_keys[0]!r}); the "
            "classifier format stores a plain timm backbone. Merge first: "
            "model.backbone = roadwork_core.models.adapters.merge_adapters(model.backbone)"
        )
    # safetensors needs contiguous CPU tensors that do not share storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_classifier(
    directory: Path,
    model: RoadworkClassifier,
    state_dict: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write `directory` (replaced atomically as a whole) with model.safetensors + config.json.

    `state_dict` overrides the model's own weights (e.g. EMA weights); it must match the
    architecture. `extra` is JSON-serialisable metadata stored under "extra".
    """
    directory = Path(directory)
    state = _state_to_save(model, state_dict)
    weights = safetensors_save(state, metadata={"format": CLASSIFIER_FORMAT})
    config = {
        "format": CLASSIFIER_FORMAT,
        "format_version": CLASSIFIER_FORMAT_VERSION,
        "classifier": classifier_config_dict(model),
        "weights": {"file": CLASSIFIER_WEIGHTS_FILE, "num_tensors": len(state)},
        "extra": dict(extra or {}),
    }
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"save_classifier: config/extra for {directory} is not JSON-serialisable: {err}"
        ) from err
    with atomic_dir(directory) as tmp:
        atomic_write_bytes(tmp / CLASSIFIER_WEIGHTS_FILE, weights)
        config["weights"]["sha256"] = sha256_file(tmp / CLASSIFIER_WEIGHTS_FILE)
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
        atomic_write_text(tmp / CLASSIFIER_CONFIG_FILE, config_text)


def read_classifier_config(path: Path) -> dict[str, Any]:
    """Parse and check a classifier `config.json` (also the bundle's); errors name the file and the fix."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{path} does not exist; a classifier directory holds {CLASSIFIER_CONFIG_FILE} and "
            f"{CLASSIFIER_WEIGHTS_FILE} written by save_classifier"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it with save_classifier") from err
    if not isinstance(doc, dict) or doc.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(
            f"{path} is not a roadwork classifier config (expected format {CLASSIFIER_FORMAT!r})"
        )
    version = doc.get("format_version")
    if not isinstance(version, int) or version > CLASSIFIER_FORMAT_VERSION or version < 1:
        raise ValueError(
            f"{path} has classifier format_version {version!r}; this roadwork reads version "
            f"{CLASSIFIER_FORMAT_VERSION}. A newer version means it was written by a newer roadwork: upgrade."
        )
    if not isinstance(doc.get("classifier"), dict):
        raise ValueError(f"{path} has no 'classifier' object; rewrite it with save_classifier")
    return doc


def inference_attn_backend(attn_backend: str) -> str:
    """The attention kernel a trained model predicts with: the one it trained with, except `flash_attn`,
    which becomes `sdpa`. flash-attn is a CUDA-only extra computing attention in bf16; a bundle built with it
    would not load on a CPU or a machine without the extra, and its predictions would not be the exact fp32
    ones the prediction assets and the bundle promise. The weights are the same (flash-attn only swaps the
    attention core), and PyTorch's SDPA picks a fused kernel on a GPU by itself."""
    return "sdpa" if attn_backend == "flash_attn" else attn_backend


def rebuild_classifier(classifier_cfg: Mapping[str, Any], *, inference: bool = False) -> RoadworkClassifier:
    """Randomly initialised RoadworkClassifier from `classifier_config_dict` output; never downloads.
    `inference`: predict with `inference_attn_backend` of the trained backend (prediction assets, bundles)."""
    try:
        backbone = {**classifier_cfg["backbone"], "pretrained": False, "weights_file": None}
        if (
            inference
        ):  # predicting: the kernel it serves with, no activation checkpointing (a training memory saver)
            backbone["grad_checkpointing"] = False
            if "attn_backend" in backbone:
                backbone["attn_backend"] = inference_attn_backend(str(backbone["attn_backend"]))
        backbone_cfg = BackboneConfig(**backbone)
        mv_cfg = MultiViewConfig(**classifier_cfg["multiview"])
        return build_classifier(
            backbone_cfg,
            mv_cfg,
            aggregator=classifier_cfg["aggregator"],
            topk=int(classifier_cfg["topk"]),
            dropout=float(classifier_cfg["dropout"]),
            mean=tuple(float(m) for m in classifier_cfg["mean"]),
            std=tuple(float(s) for s in classifier_cfg["std"]),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"classifier config is missing or has a malformed field ({err!r}); expected the keys of "
            "classifier_config_dict: backbone, multiview, aggregator, topk, dropout, mean, std"
        ) from err


def load_weights(model: RoadworkClassifier, weights: bytes, *, source: str) -> RoadworkClassifier:
    """Load safetensors `weights` (the file's bytes) into `model` strictly; `source` names the file."""
    try:
        state = safetensors_load(weights)
    except (SafetensorError, ValueError) as err:
        raise ValueError(
            f"{source} is not a readable safetensors file ({err}); re-export the classifier"
        ) from err
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor whose shape differs from the architecture's
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err))
        raise ValueError(
            f"{source} does not match the architecture in its config.json (the weights and config come "
            f"from different models): {first}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source} does not match the architecture in its config.json: missing keys "
            f"{result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}; the weights and "
            "config come from different models"
        )
    return model


def load_classifier(
    directory: Path, device: str | torch.device = "cpu", *, inference: bool = False
) -> RoadworkClassifier:
    """Rebuild the classifier in `directory` (config.json + model.safetensors), in eval mode on `device`;
    `inference`: with the attention kernel it predicts with (`inference_attn_backend`), not the training one."""
    directory = Path(directory)
    doc = read_classifier_config(directory / CLASSIFIER_CONFIG_FILE)
    weights_path = directory / CLASSIFIER_WEIGHTS_FILE
    try:
        weights = weights_path.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{weights_path} does not exist; re-save the classifier with save_classifier"
        ) from err
    model = rebuild_classifier(doc["classifier"], inference=inference)
    load_weights(model, weights, source=str(weights_path))
    return model.to(device).eval()


# ---------------------------------------------------------------- the explora_backbone directory


@dataclasses.dataclass
class SavedBackbone:
    """An explora_backbone directory read back by `load_backbone`."""

    state_dict: dict[str, torch.Tensor]  # plain timm keys
    backbone_cfg: BackboneConfig  # rebuilds the architecture: pretrained=False, weights_file=None
    source_cfg: BackboneConfig  # how the base weights were built (hub / local file), before ExPLoRA
    seed: int  # the seed the base backbone was built with (random init is reproducible)
    base_sha256: str | None  # state_dict_sha256 of the base weights
    report: dict[str, Any]


def save_backbone(
    directory: Path,
    state_dict: Mapping[str, torch.Tensor],
    source_cfg: BackboneConfig,
    *,
    seed: int,
    base_sha256: str | None,
    report: Mapping[str, Any],
) -> None:
    """Write `directory` (replaced atomically as a whole): backbone.safetensors, config.json, report.json."""
    weights = safetensors_save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})
    source = dataclasses.asdict(source_cfg)
    config = {
        "backbone": {**source, "pretrained": False, "weights_file": None},  # every weight is in the file
        "source": source,
        "seed": seed,
        "base_sha256": base_sha256,
    }
    with atomic_dir(directory) as tmp:
        atomic_write_bytes(tmp / BACKBONE_WEIGHTS_FILE, weights)
        atomic_write_text(tmp / BACKBONE_CONFIG_FILE, json.dumps(config, indent=2))
        atomic_write_text(tmp / BACKBONE_REPORT_FILE, json.dumps(dict(report), indent=2, default=str))


def load_backbone(directory: Path) -> SavedBackbone:
    """Read a directory written by `save_backbone`; errors name the file and the fix."""
    directory = Path(directory)
    docs = {}
    for name in (BACKBONE_CONFIG_FILE, BACKBONE_REPORT_FILE):
        path = directory / name
        try:
            docs[name] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{path} does not exist; an explora_backbone directory holds {BACKBONE_WEIGHTS_FILE}, "
                f"{BACKBONE_CONFIG_FILE} and {BACKBONE_REPORT_FILE}: rematerialize explora_backbone"
            ) from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); rematerialize explora_backbone") from err
    config = docs[BACKBONE_CONFIG_FILE]
    weights_path = directory / BACKBONE_WEIGHTS_FILE
    try:
        state = safetensors_load(weights_path.read_bytes())
        backbone_cfg, source_cfg = BackboneConfig(**config["backbone"]), BackboneConfig(**config["source"])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{weights_path} does not exist; rematerialize explora_backbone") from err
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{directory} is not a readable explora_backbone directory ({err!r}); rematerialize explora_backbone"
        ) from err
    return SavedBackbone(
        state_dict=state,
        backbone_cfg=backbone_cfg,
        source_cfg=source_cfg,
        seed=int(config.get("seed", 0)),
        base_sha256=config.get("base_sha256"),
        report=docs[BACKBONE_REPORT_FILE],
    )
