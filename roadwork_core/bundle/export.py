"""Export a release bundle: classifier directory + calibrator + exactly one policy + manifest.

The directory is built under a temporary name and swapped in whole (`atomic_dir`), so a reader
sees the previous bundle or the new one, never a partial one. Nothing secret is written: string
values that look like URIs with credentials are refused, and no environment value is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from roadwork_core import __version__
from roadwork_core.bundle.schema import (
    BUNDLE_FILES,
    BUNDLE_SCHEMA_VERSION,
    CALIBRATOR_FILE,
    MANIFEST_FILE,
    POLICY_FILE,
    BundleManifest,
    FileEntry,
    manifest_digest,
)
from roadwork_core.io import atomic_dir, atomic_write_text, sha256_file
from roadwork_core.models.serialization import (
    CLASSIFIER_CONFIG_FILE,
    CLASSIFIER_WEIGHTS_FILE,
    inference_attn_backend,
    load_classifier,
    read_classifier_config,
)
from roadwork_core.subnet.answer import ANSWER_FILE, AnswerRule, default_answer_rule

__all__ = ["current_code_version", "export_bundle"]

# scheme://user:password@host  (or scheme://token@host): credentials embedded in a URI.
_CREDENTIAL_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:[^/\s@]*@")
# A key naming a secret as a whole word: "db_password", "api-key", "token" (not "n_tokens").
_SECRET_KEY = re.compile(
    r"(^|[_.-])(password|passwd|secret|token|api[_-]?key|credentials?)($|[_.-])", re.IGNORECASE
)


def current_code_version(source: Path | None = None) -> dict[str, str | None]:
    """{"roadwork": package version, "git_commit": HEAD of the source checkout or None, "git_uncommitted": None
    when the checkout is that commit, else what differs ("3 changed file(s), diff sha256 <16 hex>"): a bundle
    trained from edited code must not claim the commit alone}. `source`: a folder of the checkout (default:
    this package's)."""
    where = source or Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    commit = head.stdout.decode().strip() if head is not None and head.returncode == 0 else ""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return {"roadwork": __version__, "git_commit": None, "git_uncommitted": None}
    uncommitted = None
    status = git("status", "--porcelain")  # the whole checkout, as the commit names it
    diff = git("diff", "HEAD", "--binary")
    if status is None or status.returncode != 0 or diff is None or diff.returncode != 0:
        uncommitted = "unknown (git status failed)"
    elif status.stdout.strip():
        digest = hashlib.sha256(status.stdout + b"\0" + diff.stdout).hexdigest()[:16]
        uncommitted = f"{len(status.stdout.splitlines())} changed file(s), diff sha256 {digest}"
    return {"roadwork": __version__, "git_commit": commit, "git_uncommitted": uncommitted}


def _json_safe(value: Any, where: str) -> Any:
    """Plain JSON values: numpy scalars -> Python, NaN/inf -> None; refuses credentials (names `where`)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = str(k)
            if _SECRET_KEY.search(key) and v not in (None, ""):
                raise ValueError(
                    f"{where}.{key} looks like a secret; bundles never store secrets. Drop it from what you pass."
                )
            out[key] = _json_safe(v, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        if _CREDENTIAL_URI.search(value):
            raise ValueError(
                f"{where} holds a URI with embedded credentials; bundles never store secrets. Pass the URI "
                "without user:password (credentials come from environment variables at run time)."
            )
        return value
    if isinstance(value, bool) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"{where} = {value!r} ({type(value).__name__}) is not JSON-serialisable")


def _serialize_model(obj: Any, what: str) -> str:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2)
    raise TypeError(f"export_bundle: {what} must be a pydantic model (got {type(obj).__name__})")


def _single_policy_json(policy: Any) -> tuple[str, str]:
    from roadwork_core.calibration.policy import BasePolicy, policy_to_json

    if isinstance(policy, list | tuple | set | Mapping):
        raise ValueError(
            f"export_bundle: a bundle carries exactly one policy, got a {type(policy).__name__} of "
            f"{len(policy)}; choose one (config release_policy)"
        )
    if not isinstance(policy, BasePolicy):
        raise TypeError(
            f"export_bundle: policy must be a roadwork policy (BasePolicy), got {type(policy).__name__}"
        )
    return policy_to_json(policy), policy.policy


def _bundle_config(classifier_dir: Path) -> str:
    """The classifier config.json, made portable (no local weight paths), plus a preprocessing block."""
    doc = read_classifier_config(classifier_dir / CLASSIFIER_CONFIG_FILE)
    model = load_classifier(classifier_dir, inference=True)  # proves the weights match the config
    backbone = dict(doc["classifier"]["backbone"])
    backbone.update(
        pretrained=False, weights_file=None, grad_checkpointing=False
    )  # weights: model.safetensors
    if "attn_backend" in backbone:  # the kernel it predicts with: a flash_attn model serves anywhere
        backbone["attn_backend"] = inference_attn_backend(str(backbone["attn_backend"]))
    doc["classifier"] = {**doc["classifier"], "backbone": backbone}
    doc["preprocessing"] = {
        "canvas_size": model.canvas_size,
        "view_size": model.mv.view_size,
        "num_views": model.num_views,
        "mean": [float(m) for m in model.mean.flatten().tolist()],
        "std": [float(s) for s in model.std.flatten().tolist()],
        "input": "RGB image resized (antialiased) to canvas_size x canvas_size, uint8 / 255; "
        "normalisation and multi-view tiling happen inside the model",
    }
    doc["extra"] = _json_safe(doc.get("extra", {}), "config.extra")
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False)


def _lineage(upstream_versions: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's lineage: string values, or one level of mapping (asset -> sha256 or None)."""
    out: dict[str, Any] = {}
    for key, value in upstream_versions.items():
        if isinstance(value, Mapping):
            out[str(key)] = {str(k): None if v is None else str(v) for k, v in value.items()}
        else:
            out[str(key)] = str(value)
    return out


def export_bundle(
    out_dir: Path,
    *,
    classifier_dir: Path,
    calibrator: Any,
    policy: Any,
    dataset_version: str,
    upstream_versions: dict,
    metrics_summary: dict,
    code_version: dict | str | None = None,
    answer_rule: AnswerRule | None = None,
) -> Path:
    """Write the bundle directory `out_dir` (replaced atomically) and return its path.

    `classifier_dir` is a directory written by `save_classifier`; `calibrator` a Calibrator; `policy`
    exactly one policy. `code_version` defaults to `current_code_version()` (roadwork version + git commit);
    a string is recorded as the git commit. `answer_rule` is the subnet answer's threshold, chosen on
    val_calib by `roadwork_core.subnet.answer.fit_answer_rule`; without it the bundle answers with the
    threshold 0.5 and its answer.json says so.
    """
    out_dir, classifier_dir = Path(out_dir), Path(classifier_dir)
    policy_json, policy_name = _single_policy_json(policy)
    calibrator_json = _serialize_model(calibrator, "calibrator")
    if answer_rule is None:
        answer_rule = default_answer_rule("export_bundle was given no answer_rule (none chosen on val_calib)")
    answer_json = _serialize_model(answer_rule, "answer_rule")
    config_json = _bundle_config(classifier_dir)
    if code_version is None:
        code = current_code_version()
    elif isinstance(code_version, str):
        code = {"roadwork": __version__, "git_commit": code_version}
    else:
        code = {str(k): (None if v is None else str(v)) for k, v in code_version.items()}
    lineage = _json_safe(_lineage(upstream_versions), "upstream_versions")
    metrics = _json_safe(metrics_summary, "metrics_summary")
    _json_safe(dataset_version, "dataset_version")
    _json_safe(code, "code_version")

    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(classifier_dir / CLASSIFIER_WEIGHTS_FILE, tmp / CLASSIFIER_WEIGHTS_FILE)
        with open(tmp / CLASSIFIER_WEIGHTS_FILE, "rb+") as f:  # durable before the directory swap
            os.fsync(f.fileno())
        atomic_write_text(tmp / CLASSIFIER_CONFIG_FILE, config_json)
        atomic_write_text(tmp / CALIBRATOR_FILE, calibrator_json)
        atomic_write_text(tmp / POLICY_FILE, policy_json)
        atomic_write_text(tmp / ANSWER_FILE, answer_json)
        files = {
            name: FileEntry(sha256=sha256_file(tmp / name), size=(tmp / name).stat().st_size).model_dump()
            for name in BUNDLE_FILES
        }
        doc: dict[str, Any] = {
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "dataset_version": str(dataset_version),
            "upstream_versions": lineage,
            "code_version": code,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "metrics_summary": metrics,
            "policy": policy_name,
            "files": files,
        }
        doc["content_sha256"] = manifest_digest(doc)
        BundleManifest.model_validate(doc)  # the exact schema Bundle.load reads
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(doc, indent=2, sort_keys=True, allow_nan=False))
    return out_dir
