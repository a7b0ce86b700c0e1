"""What a bundle is on disk: its files, the manifest (manifest.json) and the errors of a bad bundle.

A bundle is a directory:
    model.safetensors   classifier weights (safetensors; nothing pickled)
    config.json         the classifier directory config (roadwork_core.models.serialization) + preprocessing
    calibrator.json     the probability calibration map (roadwork_core.calibration.calibrators.Calibrator)
    policy.json         exactly ONE decision policy (threshold | gate | scrc)
    answer.json         the subnet answer's threshold (roadwork_core.subnet.answer; schema 2 on)
    manifest.json       schema version, lineage, code version, metrics summary, sha256 + size of every file

The manifest's `content_sha256` makes accidental or naive edits to the manifest detectable; it is
not a signature (anyone who can write the directory can recompute it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from roadwork_core.calibration.policy import policy_name
from roadwork_core.models.serialization import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE
from roadwork_core.subnet.answer import ANSWER_FILE

BUNDLE_SCHEMA_VERSION = 2  # 2: answer.json (the subnet answer's threshold) joined the bundle
MANIFEST_FILE = "manifest.json"
CALIBRATOR_FILE = "calibrator.json"
POLICY_FILE = "policy.json"
# Every file of a bundle other than the manifest; the manifest must list exactly these.
BUNDLE_FILES: tuple[str, ...] = (
    CLASSIFIER_WEIGHTS_FILE,
    CLASSIFIER_CONFIG_FILE,
    CALIBRATOR_FILE,
    POLICY_FILE,
    ANSWER_FILE,
)
# What a schema-1 bundle holds (no answer.json); still loaded, with the default answer threshold 0.5.
_SCHEMA_1_FILES: tuple[str, ...] = tuple(f for f in BUNDLE_FILES if f != ANSWER_FILE)


def bundle_files(schema_version: int) -> tuple[str, ...]:
    """The files (besides the manifest) a bundle of `schema_version` holds."""
    return _SCHEMA_1_FILES if schema_version == 1 else BUNDLE_FILES


class BundleError(ValueError):
    """A bundle that cannot be used: missing or malformed files, an unsupported schema version."""


class BundleIntegrityError(BundleError):
    """A bundle whose contents differ from what its manifest records (modified, missing or extra files)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str
    size: int


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int
    dataset_version: str
    # {"dataset_version": "v1", "artifact_sha256": {"splits": "<sha256>", ...}}; bundles exported before
    # lineage was a mapping hold every value as a string (e.g. str(dict)) and still load
    upstream_versions: dict[str, str | dict[str, str | None]]
    # {"roadwork": "0.1.0", "git_commit": "<sha>" | None, "git_uncommitted": None | "<n> changed file(s), ..."}
    code_version: dict[str, str | None]
    created_at: str  # ISO 8601, UTC
    metrics_summary: dict[str, Any]
    policy: str  # the `policy` field of policy.json
    files: dict[str, FileEntry]
    content_sha256: str  # manifest_digest of every other field

    @field_validator("policy", mode="before")
    @classmethod
    def _current_policy_name(cls, value: Any) -> Any:
        # a bundle exported under an old policy name ("softmax") loads as the policy it was renamed to;
        # content_sha256 covers the manifest as written, so this does not touch verification
        return policy_name(value)


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `doc` without its `content_sha256` field."""
    body = {k: v for k, v in doc.items() if k != "content_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
