"""Bundle integrity beyond tests/unit/test_bundle.py: an attacker who swaps in other VALID files and
fixes the per-file hashes, but cannot produce the manifest's content digest it was exported with."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from roadwork_core.bundle.bundle import Bundle
from roadwork_core.bundle.schema import BundleError, BundleIntegrityError, manifest_digest

torch.set_num_threads(1)


def _copy(tiny_bundle: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle["bundle_dir"], tmp_path / "bundle"))


def _swap_file(bundle_dir: Path, name: str, data: bytes, recompute_digest: bool) -> dict:
    """Replace `name` and fix its manifest entry (what an attacker can always do)."""
    (bundle_dir / name).write_bytes(data)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    if recompute_digest:
        manifest["content_sha256"] = manifest_digest(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _other_weights(tmp_path: Path) -> bytes:
    from roadwork_core.models.backbone import BackboneConfig
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.serialization import save_classifier

    torch.manual_seed(123)  # same architecture, other (valid) weights
    save_classifier(tmp_path / "other", build_classifier(BackboneConfig(name="vit_test_tiny")).eval())
    return (tmp_path / "other" / "model.safetensors").read_bytes()


def test_valid_replacement_weights_with_fixed_file_hash_are_refused(
    tiny_bundle: dict, tmp_path: Path
) -> None:
    bundle_dir = _copy(tiny_bundle, tmp_path)
    _swap_file(bundle_dir, "model.safetensors", _other_weights(tmp_path), recompute_digest=False)
    with pytest.raises(BundleIntegrityError, match=r"manifest\.json was modified after export"):
        Bundle.load(bundle_dir)


def test_valid_replacement_policy_with_fixed_file_hash_is_refused(tiny_bundle: dict, tmp_path: Path) -> None:
    from roadwork_core.calibration import fit_threshold_policy

    bundle_dir = _copy(tiny_bundle, tmp_path)
    lenient = fit_threshold_policy(np.linspace(0, 1, 60), (np.arange(60) >= 5).astype(int))
    assert lenient.model_dump_json() != (bundle_dir / "policy.json").read_text(), "must be a different policy"
    _swap_file(bundle_dir, "policy.json", lenient.model_dump_json().encode(), recompute_digest=False)
    with pytest.raises(BundleIntegrityError, match=r"content_sha256 expected"):
        Bundle.load(bundle_dir)


def test_policy_of_another_kind_is_refused_even_with_a_recomputed_digest(
    tiny_bundle: dict, tmp_path: Path
) -> None:
    """The manifest's `policy` field must name the policy actually shipped."""
    bundle_dir = _copy(tiny_bundle, tmp_path)
    policy = json.loads((bundle_dir / "policy.json").read_text())
    policy["policy"] = "scrc" if policy.get("policy") != "scrc" else "threshold"
    _swap_file(bundle_dir, "policy.json", json.dumps(policy).encode(), recompute_digest=True)
    with pytest.raises(BundleError, match="policy.json"):
        Bundle.load(bundle_dir)


def test_truncated_weights_and_manifest_replaced_by_a_directory(tiny_bundle: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(tiny_bundle, tmp_path)
    weights = bundle_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(BundleIntegrityError, match=r"model\.safetensors was modified.*size"):
        Bundle.load(bundle_dir)
    shutil.rmtree(bundle_dir)
    bundle_dir = _copy(tiny_bundle, tmp_path)
    (bundle_dir / "manifest.json").unlink()
    (bundle_dir / "manifest.json").mkdir()
    with pytest.raises((BundleError, OSError), match="manifest.json"):
        Bundle.load(bundle_dir)


def test_untouched_copy_still_loads(tiny_bundle: dict, tmp_path: Path) -> None:
    bundle = Bundle.load(_copy(tiny_bundle, tmp_path))
    pred = bundle.predict([tiny_bundle["images"][0]])[0]
    assert pred.decision in {"roadwork", "no_roadwork", "defer"}
