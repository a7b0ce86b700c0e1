"""Decoding a bundle's verified files into its parts: policy, calibrator, answer rule, model.

Each reader takes bytes that `roadwork_core.bundle.verify` has already checked against the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from roadwork_core.bundle.schema import BundleError
from roadwork_core.models.classifier import RoadworkClassifier
from roadwork_core.models.serialization import (
    CLASSIFIER_CONFIG_FILE,
    CLASSIFIER_FORMAT,
    CLASSIFIER_FORMAT_VERSION,
    CLASSIFIER_WEIGHTS_FILE,
    load_weights,
    rebuild_classifier,
)
from roadwork_core.subnet.answer import ANSWER_FILE, AnswerRule, default_answer_rule


def parse_json(data: bytes, file_path: Path) -> Any:
    from roadwork_core.bundle.verify import strict_json

    try:
        return strict_json(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{file_path} is not valid JSON ({err!r}); re-export the bundle") from err


def load_policy(data: bytes, file_path: Path, expected: str) -> Any:
    from roadwork_core.calibration import gate, scrc, threshold  # noqa: F401  (registers the policies)
    from roadwork_core.calibration.policy import policy_from_json

    raw = parse_json(data, file_path)
    if not isinstance(raw, dict):
        raise BundleError(
            f"{file_path} must hold exactly one policy (a JSON object with a 'policy' field), got "
            f"{type(raw).__name__}; export the bundle with a single policy"
        )
    try:
        policy = policy_from_json(data)
    except ValueError as err:
        raise BundleError(f"{file_path}: {err}") from err
    if policy.policy != expected:
        raise BundleError(
            f"{file_path} holds policy {policy.policy!r} but the manifest says {expected!r}; re-export the bundle"
        )
    return policy


def load_calibrator(data: bytes, file_path: Path) -> Any:
    from roadwork_core.calibration.calibrators import Calibrator

    try:
        return Calibrator.model_validate_json(data)
    except ValidationError as err:
        raise BundleError(f"{file_path} is not a valid calibrator: {err}") from err


def load_answer_rule(contents: dict[str, bytes], path: Path, schema_version: int) -> AnswerRule:
    if ANSWER_FILE not in contents:
        return default_answer_rule(
            f"bundle schema {schema_version} has no {ANSWER_FILE} (exported before the subnet answer existed); "
            "re-export it to get the threshold chosen on val_calib"
        )
    try:
        return AnswerRule.model_validate_json(contents[ANSWER_FILE])
    except ValidationError as err:
        raise BundleError(f"{path / ANSWER_FILE} is not a valid answer rule: {err}") from err


def load_model(
    data: bytes, config: bytes, path: Path, device: torch.device
) -> tuple[RoadworkClassifier, dict]:
    doc = parse_json(config, path / CLASSIFIER_CONFIG_FILE)
    if not isinstance(doc, dict) or doc.get("format") != CLASSIFIER_FORMAT:
        raise BundleError(
            f"{path / CLASSIFIER_CONFIG_FILE} is not a roadwork classifier config; re-export the bundle"
        )
    if doc.get("format_version") != CLASSIFIER_FORMAT_VERSION:
        raise BundleError(
            f"{path / CLASSIFIER_CONFIG_FILE} has classifier format_version {doc.get('format_version')!r}; this "
            f"roadwork reads {CLASSIFIER_FORMAT_VERSION}. Upgrade roadwork or re-export the bundle."
        )
    try:
        model = rebuild_classifier(doc["classifier"], inference=True)
        load_weights(model, data, source=str(path / CLASSIFIER_WEIGHTS_FILE))
    except (KeyError, ValueError) as err:
        raise BundleError(f"{path}: the model cannot be rebuilt: {err}") from err
    return model.to(device).eval(), doc


def device_problem(device: str) -> str | None:
    """Why `device` cannot run a bundle here (a message with the fix), or None when it can."""
    if str(device) == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        return f"not a device ({err}); use cpu, cuda, cuda:N or auto"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or auto"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --device cpu (or auto, which picks the GPU when there is one)"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s), so there is no cuda:{dev.index}"
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
