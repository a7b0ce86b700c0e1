"""Verification of a bundle directory before anything in it is deserialised into a model.

`read_manifest` checks that the manifest parses, its schema version is one this roadwork reads and
its own content digest matches; `verified_files` that every listed file exists with the recorded size
and sha256 (read once; the verified bytes are the ones parsed) and that no unlisted file is present.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from roadwork_core import __version__
from roadwork_core.bundle.schema import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_FILE,
    BundleError,
    BundleIntegrityError,
    BundleManifest,
    bundle_files,
    manifest_digest,
)
from roadwork_core.subnet.answer import ANSWER_FILE


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json(data: bytes | str) -> Any:
    """`json.loads` that also refuses NaN / Infinity (Python's json takes them; no exporter writes them).
    Raises ValueError (JSONDecodeError, a number too long, NaN) or RecursionError (nesting too deep)."""
    return json.loads(data, parse_constant=_no_constant)


def read_manifest(path: Path) -> BundleManifest:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory; a bundle is the directory written by export_bundle")
    if manifest_path.exists() and not manifest_path.is_file():  # a named pipe would block the read for ever
        raise BundleIntegrityError(
            f"{manifest_path} is not a regular file (a named pipe, a device or a folder); re-export the bundle"
        )
    try:
        raw = strict_json(manifest_path.read_bytes())
    except FileNotFoundError as err:
        raise BundleError(
            f"{manifest_path} is missing; this is not a roadwork bundle (re-export it)"
        ) from err
    except (ValueError, RecursionError) as err:  # not JSON, NaN / Infinity, a 5000-digit number, deep nesting
        raise BundleIntegrityError(
            f"{manifest_path} is not valid JSON ({err}); the bundle is corrupt, re-export it"
        ) from err
    if not isinstance(raw, dict):
        raise BundleIntegrityError(
            f"{manifest_path} must hold a JSON object; the bundle is corrupt, re-export it"
        )
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(
            f"{manifest_path} has schema_version {version!r}; expected an integer (this roadwork reads "
            f"schema {BUNDLE_SCHEMA_VERSION}). Re-export the bundle."
        )
    if version > BUNDLE_SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path} has bundle schema_version {version}, written by a newer roadwork; this is "
            f"roadwork {__version__}, which reads schema {BUNDLE_SCHEMA_VERSION}. Upgrade roadwork to load it."
        )
    if version < 1:
        raise BundleError(
            f"{manifest_path} has unknown bundle schema_version {version}; this roadwork reads schema "
            f"{BUNDLE_SCHEMA_VERSION}. Re-export the bundle with this roadwork."
        )
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as err:
        raise BundleIntegrityError(f"{manifest_path} does not match bundle schema {version}: {err}") from err
    actual = manifest_digest(raw)
    if actual != manifest.content_sha256:
        raise BundleIntegrityError(
            f"{manifest_path} was modified after export: content_sha256 expected {manifest.content_sha256}, "
            f"actual {actual}. Do not edit a bundle; re-export it."
        )
    return manifest


def verified_files(path: Path, manifest: BundleManifest) -> dict[str, bytes]:
    """{file name: bytes} of every listed file, each checked against its size and sha256."""
    expected = bundle_files(manifest.schema_version)
    listed = set(manifest.files)
    if listed != set(expected):
        raise BundleIntegrityError(
            f"{path / MANIFEST_FILE} lists files {sorted(listed)}; a schema-{manifest.schema_version} bundle "
            f"holds exactly {sorted(expected)} (one model, one config, one calibrator, exactly one policy"
            f"{', the answer threshold' if ANSWER_FILE in expected else ''}). Re-export it."
        )
    present = {p.name for p in path.iterdir()}
    unlisted = sorted(present - listed - {MANIFEST_FILE})
    if unlisted:
        raise BundleIntegrityError(
            f"{path} holds file(s) not listed in its manifest: {unlisted}. A bundle may contain only "
            f"{sorted(expected)} and {MANIFEST_FILE}; remove them or re-export the bundle."
        )
    contents: dict[str, bytes] = {}
    for name in expected:
        entry = manifest.files[name]
        file_path = path / name
        if not file_path.is_file():
            what = (
                "not a regular file (a named pipe, a device or a folder)" if file_path.exists() else "missing"
            )
            raise BundleIntegrityError(
                f"{file_path} is listed in the manifest but {what}; re-export the bundle"
            )
        if (size := file_path.stat().st_size) != entry.size:  # before reading it: it may be huge
            raise BundleIntegrityError(
                f"{file_path} was modified: size expected {entry.size}, actual {size}. Refusing to load it; "
                "re-export the bundle."
            )
        data = file_path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256 or len(data) != entry.size:
            raise BundleIntegrityError(
                f"{file_path} was modified: sha256 expected {entry.sha256} (size {entry.size}), actual {actual} "
                f"(size {len(data)}). Refusing to load it; re-export the bundle."
            )
        contents[name] = data
    return contents


def verify_bundle(path: str | os.PathLike) -> BundleManifest:
    """Check a bundle directory as `Bundle.load` does before building anything (schema, manifest digest,
    every file's size and sha256, no unlisted file, hence exactly one policy); its manifest, or BundleError."""
    path = Path(path)
    manifest = read_manifest(path)
    verified_files(path, manifest)
    return manifest
