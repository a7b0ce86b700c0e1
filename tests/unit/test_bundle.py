"""Bundle: classifier directory format, export -> load -> predict, integrity checks, predict CLI."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from roadwork_core.bundle import (
    BUNDLE_FILES,
    BUNDLE_SCHEMA_VERSION,
    Bundle,
    BundleError,
    BundleIntegrityError,
    export_bundle,
)
from roadwork_core.bundle.predict_cli import add_predict_arguments, predict_command, run_predict
from roadwork_core.bundle.schema import manifest_digest
from roadwork_core.calibration import fit_calibrator, fit_gate_policy, fit_threshold_policy
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
from roadwork_core.data.images import decode_image
from roadwork_core.data.loading import pil_to_canvas
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.multiview import MultiViewConfig
from roadwork_core.models.predict import uncertainty_features
from roadwork_core.models.serialization import load_classifier, save_classifier


def _jpeg_bytes(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _synthetic_features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict, np.ndarray]:
    labels = rng.integers(0, 2, n)
    p = np.clip(rng.beta(2, 2, n) * 0.5 + 0.5 * labels * rng.uniform(0.3, 1.0, n), 0.0, 1.0)
    feats = {name: rng.uniform(0, 1, n) for name in UNCERTAINTY_FEATURES}
    return p, feats, labels


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name="vit_test_tiny")).eval()
    root = tmp_path_factory.mktemp("bundle")
    classifier_dir = root / "classifier"
    save_classifier(classifier_dir, model, extra={"epochs": 1})
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 400)
    labels = (rng.uniform(size=400) < 1 / (1 + np.exp(-logits / 2))).astype(int)
    calibrator, _ = fit_calibrator(logits, labels, methods=("temperature",))
    sp, sf, sy = _synthetic_features(rng, 300)
    cp, cf, cy = _synthetic_features(rng, 300)
    policy = fit_gate_policy(sp, sf, sy, cp, cf, cy, target_fnr=0.2)
    bundle_dir = export_bundle(
        root / "release",
        classifier_dir=classifier_dir,
        calibrator=calibrator,
        policy=policy,
        dataset_version="v0001",
        upstream_versions={"image_table": "abc123", "splits": "def456"},
        metrics_summary={"val_calib": {"coverage": 0.9, "fnr": 0.02, "ece": float("nan")}},
        code_version=None,
    )
    images = root / "images"
    images.mkdir()
    paths = []
    for i, size in enumerate([(224, 224), (320, 180), (100, 150), (224, 224), (64, 64)]):
        path = images / f"img{i}.jpg"
        path.write_bytes(_jpeg_bytes(i, size))
        paths.append(path)
    return dict(
        model=model, classifier_dir=classifier_dir, calibrator=calibrator, policy=policy,
        bundle_dir=bundle_dir, paths=paths, root=root,
    )  # fmt: skip


def _copy(parts: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(parts["bundle_dir"], tmp_path / "bundle"))


def _direct(parts: dict, images: list[bytes]) -> dict[str, np.ndarray]:
    """Model + calibrator + policy computed by hand, without the bundle."""
    model = parts["model"]
    canvas = torch.stack(
        [pil_to_canvas(decode_image(b, source="t"), model.canvas_size) for b in images]
    )  # (B, 3, C, C) uint8
    with torch.no_grad():
        out = model(canvas.float() / 255.0)
    view_probs = out["view_logits"].sigmoid()
    feats = {
        k: v.double().numpy() for k, v in uncertainty_features(out["prob"], view_probs, model.mv).items()
    }
    logit = out["logit"].double().numpy()
    p = parts["calibrator"].transform(logit)
    return {"logit": logit, "p": p, "decision": parts["policy"].decide(p, feats), **feats}


# ---------------------------------------------------------------------------------------------------
# classifier directory format


def test_save_load_classifier_reproduces_outputs(parts: dict) -> None:
    model, loaded = parts["model"], load_classifier(parts["classifier_dir"])
    assert not loaded.training, "load_classifier must return the model in eval mode"
    canvas = torch.rand(2, 3, model.canvas_size, model.canvas_size)
    with torch.no_grad():
        a, b = model(canvas), loaded(canvas)
    torch.testing.assert_close(
        a["view_logits"], b["view_logits"], rtol=0, atol=0, msg="weights differ after reload"
    )
    config = json.loads((parts["classifier_dir"] / "config.json").read_text())
    assert config["extra"] == {"epochs": 1}, "extra metadata must be stored under 'extra'"


def test_load_classifier_rejects_weights_of_another_architecture(parts: dict, tmp_path: Path) -> None:
    other = build_classifier(BackboneConfig(name="vit_test_tiny", model_kwargs={"embed_dim": 24}))
    save_classifier(tmp_path / "other", other)
    target = Path(shutil.copytree(parts["classifier_dir"], tmp_path / "mixed"))
    shutil.copyfile(tmp_path / "other" / "model.safetensors", target / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_classifier(target)


# ---------------------------------------------------------------------------------------------------
# export -> load -> predict


def test_bundle_layout_and_manifest(parts: dict) -> None:
    bundle_dir = parts["bundle_dir"]
    names = sorted(p.name for p in bundle_dir.iterdir())
    assert names == sorted([*BUNDLE_FILES, "manifest.json"]), f"unexpected bundle files {names}"
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == BUNDLE_SCHEMA_VERSION
    assert manifest["dataset_version"] == "v0001"
    assert manifest["upstream_versions"] == {"image_table": "abc123", "splits": "def456"}
    assert manifest["policy"] == "gate"
    assert manifest["code_version"]["roadwork"], "code version must name the roadwork version"
    assert manifest["metrics_summary"]["val_calib"]["ece"] is None, "NaN metrics must be written as null"
    assert set(manifest["files"]) == set(BUNDLE_FILES)
    for name, entry in manifest["files"].items():
        assert entry["size"] == (bundle_dir / name).stat().st_size, f"size of {name} not recorded correctly"
    config = json.loads((bundle_dir / "config.json").read_text())
    assert config["preprocessing"]["canvas_size"] == parts["model"].canvas_size
    assert config["classifier"]["backbone"]["weights_file"] is None, "no local weight paths in a bundle"


def test_predict_reproduces_model_calibrator_policy(parts: dict) -> None:
    bundle = Bundle.load(parts["bundle_dir"])
    raw = [p.read_bytes() for p in parts["paths"]]
    expected = _direct(parts, raw)
    for inputs in (parts["paths"], raw, [decode_image(b, source="t") for b in raw]):
        preds = bundle.predict(inputs, batch_size=2)  # batches of 2, 2, 1
        assert len(preds) == len(raw)
        np.testing.assert_allclose([p.logit for p in preds], expected["logit"], atol=1e-4, err_msg="logit")
        np.testing.assert_allclose(
            [p.p_roadwork for p in preds], expected["p"], atol=1e-4, err_msg="p_roadwork"
        )
        assert [p.decision for p in preds] == list(expected["decision"]), "policy decisions differ"
        for name in UNCERTAINTY_FEATURES:
            np.testing.assert_allclose(
                [p.features[name] for p in preds], expected[name], atol=1e-4, err_msg=name
            )
        assert all(p.decision in ("roadwork", "no_roadwork", "defer") for p in preds)


def _as_old_softmax_bundle(src: Path, dest: Path) -> Path:
    """A copy of `src` as roadwork wrote it before the threshold policy was renamed: policy.json and the
    manifest say "softmax", the manifest's file hash and content digest match those bytes."""
    import hashlib

    dest = Path(shutil.copytree(src, dest))
    policy_doc = json.loads((dest / "policy.json").read_text())
    assert policy_doc["policy"] == "threshold"
    data = json.dumps({**policy_doc, "policy": "softmax"}, indent=2).encode()
    (dest / "policy.json").write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["policy"] = "softmax"
    manifest["files"]["policy.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["content_sha256"] = manifest_digest(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def test_bundle_written_with_the_old_softmax_policy_name_loads_and_predicts_the_same(
    parts: dict, tmp_path: Path
) -> None:
    p_calib = parts["calibrator"].transform(np.random.default_rng(1).normal(0, 3, 400))
    labels = (np.random.default_rng(2).uniform(size=400) < p_calib).astype(int)
    policy = fit_threshold_policy(p_calib, labels, target_fnr=0.1, target_fpr=0.2)
    assert policy.policy == "threshold" and policy.t_neg < policy.t_pos  # a defer band: three decisions
    new_dir = export_bundle(
        tmp_path / "new", classifier_dir=parts["classifier_dir"], calibrator=parts["calibrator"], policy=policy,
        dataset_version="v0001", upstream_versions={}, metrics_summary={}, code_version=None,
    )  # fmt: skip
    old_dir = _as_old_softmax_bundle(new_dir, tmp_path / "old")
    assert json.loads((old_dir / "policy.json").read_text())["policy"] == "softmax"

    new, old = Bundle.load(new_dir), Bundle.load(old_dir)
    assert old.manifest.policy == old.policy.policy == "threshold"
    assert old.policy == new.policy
    images = parts["paths"] * 4
    assert [p.to_dict() for p in old.predict(images)] == [p.to_dict() for p in new.predict(images)]


def test_max_logit_difference_against_recorded_logits(parts: dict) -> None:
    bundle = Bundle.load(parts["bundle_dir"])
    uris = [str(p) for p in parts["paths"]]
    expected = _direct(parts, [p.read_bytes() for p in parts["paths"]])["logit"]
    assert bundle.max_logit_difference(uris, expected) < 1e-4, "bundle does not reproduce the recorded logits"
    assert bundle.max_logit_difference(uris, expected + 0.5) > 0.4, "a shifted logit must be reported"


def test_predict_raises_naming_the_bad_image(parts: dict, tmp_path: Path) -> None:
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is text, not a JPEG")
    bundle = Bundle.load(parts["bundle_dir"])
    with pytest.raises(ValueError, match="not_an_image.jpg"):
        bundle.predict([parts["paths"][0], bad])


def test_export_refuses_more_than_one_policy_and_secrets(parts: dict, tmp_path: Path) -> None:
    policy = fit_threshold_policy(np.linspace(0, 1, 50), (np.arange(50) >= 25).astype(int))
    common = dict(
        classifier_dir=parts["classifier_dir"], calibrator=parts["calibrator"], dataset_version="v1",
        upstream_versions={}, code_version="deadbeef",
    )  # fmt: skip
    with pytest.raises(ValueError, match="exactly one policy"):
        export_bundle(tmp_path / "b1", policy=[policy, parts["policy"]], metrics_summary={}, **common)
    with pytest.raises(ValueError, match="credentials"):
        export_bundle(
            tmp_path / "b2",
            policy=policy,
            metrics_summary={"mlflow": "postgresql://u:hunter2@db/x"},
            **common,
        )
    with pytest.raises(ValueError, match="secret"):
        export_bundle(tmp_path / "b3", policy=policy, metrics_summary={"db_password": "hunter2"}, **common)
    assert not (tmp_path / "b2").exists(), "a refused export must leave nothing behind"


def test_failed_export_leaves_previous_bundle_intact(parts: dict, tmp_path: Path) -> None:
    dest = _copy(parts, tmp_path)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(TypeError):
        export_bundle(
            dest, classifier_dir=parts["classifier_dir"], calibrator=parts["calibrator"], policy=parts["policy"],
            dataset_version="v2", upstream_versions={}, metrics_summary={"bad": object()}, code_version="x",
        )  # fmt: skip
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before, "previous bundle was modified"
    Bundle.load(dest)


# ---------------------------------------------------------------------------------------------------
# integrity


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "policy.json", "config.json", "calibrator.json"])
def test_modified_file_is_refused_naming_it(parts: dict, tmp_path: Path, name: str) -> None:
    bundle_dir = _copy(parts, tmp_path)
    path = bundle_dir / name
    _flip_byte(path, len(path.read_bytes()) - 10)  # weights: the last tensor's bytes; JSON: near the end
    with pytest.raises(BundleIntegrityError, match=name) as info:
        Bundle.load(bundle_dir)
    expected = json.loads((bundle_dir / "manifest.json").read_text())["files"][name]["sha256"]
    assert expected in str(info.value), "the error must give the expected hash"


def test_modified_manifest_is_refused(parts: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(parts, tmp_path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["metrics_summary"]["val_calib"]["fnr"] = 0.0  # a flattering edit
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="manifest.json"):
        Bundle.load(bundle_dir)
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleIntegrityError, match="manifest.json"):
        Bundle.load(bundle_dir)


def test_replaced_policy_with_recomputed_hash_still_needs_matching_manifest(
    parts: dict, tmp_path: Path
) -> None:
    """Swapping policy.json and fixing its listed hash (but not the manifest digest) is caught."""
    bundle_dir = _copy(parts, tmp_path)
    policy = fit_threshold_policy(np.linspace(0, 1, 50), (np.arange(50) >= 25).astype(int))
    (bundle_dir / "policy.json").write_text(policy.model_dump_json())
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    data = (bundle_dir / "policy.json").read_bytes()
    import hashlib

    manifest["files"]["policy.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="manifest.json"):
        Bundle.load(bundle_dir)


def test_unlisted_extra_file_is_refused(parts: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(parts, tmp_path)
    (bundle_dir / "policy_scrc.json").write_text(parts["policy"].model_dump_json())
    with pytest.raises(BundleIntegrityError, match="policy_scrc.json"):
        Bundle.load(bundle_dir)


def test_missing_file_is_refused(parts: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(parts, tmp_path)
    (bundle_dir / "calibrator.json").unlink()
    with pytest.raises(BundleIntegrityError, match="calibrator.json"):
        Bundle.load(bundle_dir)


def test_newer_schema_version_gets_upgrade_message(parts: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(parts, tmp_path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["schema_version"] = BUNDLE_SCHEMA_VERSION + 1
    manifest["new_field_from_the_future"] = {"x": 1}
    manifest["content_sha256"] = manifest_digest(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"newer roadwork.*Upgrade roadwork"):
        Bundle.load(bundle_dir)
    manifest["schema_version"] = 0
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown bundle schema_version 0"):
        Bundle.load(bundle_dir)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.load(tmp_path)


# ---------------------------------------------------------------------------------------------------
# predict CLI


def test_predict_command_on_files_with_one_bad_file(parts: dict, tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    paths = [str(parts["paths"][0]), str(bad), str(parts["paths"][1]), str(missing)]
    lines = [json.loads(line) for line in predict_command(str(parts["bundle_dir"]), paths, None)]
    assert [d["image"] for d in lines] == paths, "one line per image, in input order"
    assert "error" in lines[1] and "notes.txt" in lines[1]["error"], f"bad file not named: {lines[1]}"
    assert "error" in lines[3] and "missing.jpg" in lines[3]["error"], f"missing file not named: {lines[3]}"
    expected = _direct(parts, [parts["paths"][0].read_bytes(), parts["paths"][1].read_bytes()])
    for line, p, d in zip([lines[0], lines[2]], expected["p"], expected["decision"], strict=True):
        assert abs(line["p_roadwork"] - p) < 1e-4 and line["decision"] == d, f"wrong prediction {line}"
        assert set(UNCERTAINTY_FEATURES) <= set(line), "uncertainty features missing from the JSON line"

    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        ["--bundle", str(parts["bundle_dir"]), *paths]
    )
    out = io.StringIO()
    assert run_predict(args, stdout=out) == 1, "a bad image must give a non-zero exit code"
    assert len(out.getvalue().splitlines()) == 4


def test_predict_command_reads_base64_from_stdin(parts: dict) -> None:
    raw = [p.read_bytes() for p in parts["paths"][:2]]
    stdin = io.StringIO(
        base64.b64encode(raw[0]).decode()
        + "\n"
        + "@@not base64@@\n\n"
        + base64.b64encode(raw[1]).decode()
        + "\n"
    )
    lines = [json.loads(line) for line in predict_command(str(parts["bundle_dir"]), [], stdin, batch_size=1)]
    assert [d["image"] for d in lines] == ["stdin:0", "stdin:1", "stdin:2"]
    assert "base64" in lines[1]["error"] and "stdin:1" in lines[1]["error"]
    expected = _direct(parts, raw)
    assert abs(lines[0]["p_roadwork"] - expected["p"][0]) < 1e-4
    assert abs(lines[2]["p_roadwork"] - expected["p"][1]) < 1e-4

    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(["--bundle", str(parts["bundle_dir"])])
    out = io.StringIO()
    good = io.StringIO(base64.b64encode(raw[0]).decode() + "\n")
    assert run_predict(args, stdout=out, stdin=good) == 0
    assert json.loads(out.getvalue())["image"] == "stdin:0"


def test_run_predict_refused_bundle_exit_code(parts: dict, tmp_path: Path) -> None:
    bundle_dir = _copy(parts, tmp_path)
    _flip_byte(bundle_dir / "model.safetensors", 200)
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        ["--bundle", str(bundle_dir), str(parts["paths"][0])]
    )
    out = io.StringIO()
    assert run_predict(args, stdout=out) == 2 and out.getvalue() == "", "a refused bundle predicts nothing"


def test_lineage_is_a_json_mapping_and_old_string_lineage_still_loads(parts: dict, tmp_path: Path) -> None:
    from roadwork_core.bundle.verify import verify_bundle

    upstream = {"dataset_version": "v0001", "artifact_sha256": {"splits": "abc", "classifier": None}}
    bundle_dir = export_bundle(
        tmp_path / "mapped", classifier_dir=parts["classifier_dir"], calibrator=parts["calibrator"],
        policy=parts["policy"], dataset_version="v0001", upstream_versions=upstream, metrics_summary={},
        code_version="x",
    )  # fmt: skip
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["upstream_versions"] == upstream, "lineage must be stored as a mapping, not str(dict)"
    assert verify_bundle(bundle_dir).upstream_versions["artifact_sha256"]["splits"] == "abc"
    # a bundle exported before: every lineage value a string (the mapping as its Python repr)
    manifest["upstream_versions"]["artifact_sha256"] = str(upstream["artifact_sha256"])
    manifest["content_sha256"] = manifest_digest(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    assert isinstance(Bundle.load(bundle_dir).manifest.upstream_versions["artifact_sha256"], str)


def test_verify_bundle_refuses_a_second_policy_file(parts: dict, tmp_path: Path) -> None:
    from roadwork_core.bundle.verify import verify_bundle

    bundle_dir = _copy(parts, tmp_path)
    assert verify_bundle(bundle_dir).policy == "gate"
    (bundle_dir / "policy_scrc.json").write_text(parts["policy"].model_dump_json())
    with pytest.raises(BundleIntegrityError, match="policy_scrc.json"):
        verify_bundle(bundle_dir)


def test_backbone_directory_round_trip_and_errors(tmp_path: Path) -> None:
    from roadwork_core.models.serialization import load_backbone, save_backbone

    cfg = BackboneConfig(name="vit_test_tiny", weights_file="/somewhere/base.safetensors")
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}
    save_backbone(tmp_path / "bb", state, cfg, seed=7, base_sha256="feed", report={"loss_curve": [1.0]})
    saved = load_backbone(tmp_path / "bb")
    assert set(saved.state_dict) == {"w", "b"} and torch.equal(saved.state_dict["w"], state["w"])
    assert saved.source_cfg == cfg and saved.seed == 7 and saved.base_sha256 == "feed"
    assert saved.backbone_cfg.weights_file is None and not saved.backbone_cfg.pretrained
    assert saved.report == {"loss_curve": [1.0]}
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".tmp-")], "no temporary left behind"
    (tmp_path / "bb" / "report.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"report\.json.*rematerialize explora_backbone"):
        load_backbone(tmp_path / "bb")


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "cpu"])
def test_a_bundle_on_cuda_serves_without_tf32_as_its_calibration_logits_were_computed(device: str) -> None:
    from roadwork_core.config import serve_exact_fp32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a training step's
        serve_exact_fp32(torch.device(device))  # flags only: no GPU needed to set them
        on_cuda = device.startswith("cuda")
        assert torch.backends.cuda.matmul.allow_tf32 is not on_cuda
        assert torch.backends.cudnn.allow_tf32 is not on_cuda
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_a_classifier_trained_with_flash_attn_and_checkpointing_predicts_and_ships_with_sdpa_without(
    parts: dict, tmp_path: Path
) -> None:
    """`gpu.attn_backend: flash_attn` is a training kernel (CUDA only, bf16): the prediction assets and the
    bundle rebuild the model with SDPA, so the bundle loads on a CPU or a machine without flash-attn."""
    classifier_dir = Path(shutil.copytree(parts["classifier_dir"], tmp_path / "classifier"))
    config_path = classifier_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["classifier"]["backbone"]["attn_backend"] = "flash_attn"  # as a GPU training run writes it
    config["classifier"]["backbone"]["grad_checkpointing"] = True  # a training memory saver, not for serving
    config_path.write_text(json.dumps(config))
    with pytest.raises(ImportError, match="flash-attn"):  # training from it keeps the kernel it asked for
        load_classifier(classifier_dir)

    model = load_classifier(classifier_dir, inference=True)
    assert not model.backbone.grad_checkpointing
    canvas = torch.rand(2, 3, model.canvas_size, model.canvas_size)
    with torch.no_grad():
        torch.testing.assert_close(model(canvas)["logit"], parts["model"](canvas)["logit"], rtol=0, atol=0)

    bundle_dir = export_bundle(
        tmp_path / "release",
        classifier_dir=classifier_dir,
        calibrator=parts["calibrator"],
        policy=parts["policy"],
        dataset_version="v0001",
        upstream_versions={},
        metrics_summary={},
        code_version=None,
    )
    shipped = json.loads((bundle_dir / "config.json").read_text())
    assert shipped["classifier"]["backbone"]["attn_backend"] == "sdpa"
    assert shipped["classifier"]["backbone"]["grad_checkpointing"] is False
    images = [p.read_bytes() for p in parts["paths"]]
    preds = Bundle.load(bundle_dir, device="cpu").predict(images)
    np.testing.assert_allclose([p.logit for p in preds], _direct(parts, images)["logit"], rtol=0, atol=1e-5)


def test_the_mlflow_pyfunc_model_predicts_on_the_device_its_variable_names(monkeypatch) -> None:
    """`mlflow models serve` has no device flag of ours: ROADWORK_SERVE_DEVICE (cpu when unset, as before)."""
    from roadwork_core.bundle.mlflow_pyfunc import DEVICE_VARIABLE, serve_device

    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    assert serve_device() == "cpu"
    monkeypatch.setenv(DEVICE_VARIABLE, "auto")
    assert serve_device() == "auto"
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_VARIABLE, "cuda")
        with pytest.raises(ValueError, match="ROADWORK_SERVE_DEVICE='cuda': CUDA is not available"):
            serve_device()


def test_a_classifier_saved_with_settings_new_runs_may_not_ask_for_still_loads(tmp_path: Path) -> None:
    """The run-config checks (pooling choices, canvas below the view size, img_size off the patch grid) guard new
    runs; a classifier or bundle saved with such settings, by an earlier roadwork, must still load."""
    torch.manual_seed(0)
    cfg = BackboneConfig(name="vit_test_tiny", img_size=36, pooling="avgmax")
    model = build_classifier(cfg, MultiViewConfig(view_size=36, grid=2, canvas_size=30)).eval()
    save_classifier(tmp_path / "c", model)
    loaded = load_classifier(tmp_path / "c", inference=True)
    canvas = torch.rand(1, 3, model.canvas_size, model.canvas_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(canvas)["logit"], model(canvas)["logit"], rtol=0, atol=0)


def test_predict_refuses_one_image_given_instead_of_a_list(parts: dict) -> None:
    """`predict("img.jpg")` read the string as one-character paths (IsADirectoryError: '/'), and bytes as ints."""
    bundle = Bundle.load(parts["bundle_dir"])
    for single in (str(parts["paths"][0]), parts["paths"][0], parts["paths"][0].read_bytes()):
        with pytest.raises(TypeError, match=r"takes a list of images.*pass \[image\]"):
            bundle.predict(single)
    assert len(bundle.predict([str(parts["paths"][0])])) == 1


def _load_into(where: Path, outcome: list) -> None:
    try:
        Bundle.load(where)
        outcome.append(None)
    except BaseException as err:  # noqa: BLE001 - the caller checks the outcome
        outcome.append(err)


def test_a_bundle_file_that_is_a_named_pipe_is_refused_not_read_for_ever(parts: dict, tmp_path: Path) -> None:
    """Reading a FIFO blocks until a writer comes: `roadwork predict` and serve start-up hung."""
    import os
    import threading

    from roadwork_core.bundle.schema import BundleIntegrityError

    for name in ("manifest.json", "calibrator.json"):
        bundle_dir = Path(shutil.copytree(parts["bundle_dir"], tmp_path / name))
        (bundle_dir / name).unlink()
        os.mkfifo(bundle_dir / name)
        outcome: list[BaseException | None] = []
        thread = threading.Thread(target=_load_into, args=(bundle_dir, outcome), daemon=True)
        thread.start()
        thread.join(timeout=30)
        if thread.is_alive():  # unblock the reader so the thread ends
            os.close(os.open(bundle_dir / name, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"Bundle.load blocked on the named pipe {name}")
        [err] = outcome
        assert isinstance(err, BundleIntegrityError) and "not a regular file" in str(err), err


def test_a_reader_that_stops_reading_ends_predict_quietly(parts: dict) -> None:
    """`roadwork predict ... | head -1` printed a BrokenPipeError traceback."""

    class Head(io.StringIO):  # takes one line, then the pipe is closed
        def write(self, text: str) -> int:
            if self.getvalue().endswith("\n"):
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    paths = [str(p) for p in parts["paths"][:3]]
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        ["--bundle", str(parts["bundle_dir"]), *paths]
    )
    out = Head()
    assert run_predict(args, stdout=out) == 0
    assert len(out.getvalue().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e12", "soon"])
def test_serve_refuses_a_poll_interval_it_cannot_keep(value: str, capsys) -> None:
    """0, negatives and NaN polled in a tight loop (a whole core); inf and 1e12 killed the release watcher."""
    from roadwork_core.serving.serve_cli import add_serve_arguments

    parser = add_serve_arguments(argparse.ArgumentParser(prog="roadwork serve"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--latest", "--poll-seconds", value])
    assert "--poll-seconds" in capsys.readouterr().err
    assert parser.parse_args(["--latest", "--poll-seconds", "2.5"]).poll_seconds == 2.5


def test_the_pyfunc_model_names_the_bad_row_and_reads_paths_only_inside_its_folder(
    parts: dict, tmp_path: Path, monkeypatch
) -> None:
    """Under `mlflow models serve` a `path` is read on the server for whoever asks: /etc/passwd answered
    'unreadable' and a missing file FileNotFoundError (probing). One bad base64 row failed the batch with
    'Only base64 data is allowed' naming no row, and rows mixing image_b64 and path raised a TypeError."""
    import pandas as pd

    from roadwork_core.bundle.mlflow_pyfunc import PATH_ROOT_VARIABLE, RoadworkBundleModel

    model = RoadworkBundleModel()
    model.bundle = Bundle.load(parts["bundle_dir"])
    inside = parts["paths"][0]
    b64 = base64.b64encode(parts["paths"][1].read_bytes()).decode()
    expected = [p.answer for p in model.bundle.predict([parts["paths"][1], inside])]

    monkeypatch.delenv(PATH_ROOT_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=rf"row 0: images by path are off.*{PATH_ROOT_VARIABLE}"):
        model.predict(None, pd.DataFrame({"path": [str(inside)]}))
    monkeypatch.setenv(PATH_ROOT_VARIABLE, str(inside.parent))
    mixed = pd.DataFrame({"image_b64": [b64, None], "path": [None, str(inside)]})
    assert model.predict(None, mixed)["answer"].tolist() == pytest.approx(expected)
    for outside in ("/etc/passwd", str(tmp_path / "nope.jpg"), str(inside.parent / ".." / "x.jpg")):
        with pytest.raises(ValueError, match=rf"row 1: .* is outside {PATH_ROOT_VARIABLE}"):
            model.predict(None, pd.DataFrame({"path": [str(inside), outside]}))
    relative = pd.DataFrame({"path": [inside.name, "missing.jpg"]})  # relative: inside the folder
    with pytest.raises(ValueError, match=r"^row 1: missing.jpg: No such file or directory$"):
        model.predict(None, relative)
    assert model.predict(None, relative.iloc[:1])["answer"].tolist() == pytest.approx(expected[1:])
    with pytest.raises(ValueError, match=r"row 2: image_b64 is not valid base64"):
        model.predict(None, pd.DataFrame({"image_b64": [b64, b64, "not base64!"]}))
    with pytest.raises(ValueError, match=r"row 0: neither image_b64 nor path"):
        model.predict(None, pd.DataFrame({"image_b64": [None], "path": [None]}))


def test_code_version_names_uncommitted_changes_to_the_commit(tmp_path: Path) -> None:
    """A bundle trained from edited code recorded the commit alone, as if it were that commit's code."""
    import subprocess

    from roadwork_core.bundle.export import current_code_version

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
            cwd=tmp_path, check=True, capture_output=True,
        )  # fmt: skip

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "policy.py").write_text("LAMBDA = 0.1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    clean = current_code_version(tmp_path / "pkg")
    assert re.fullmatch(r"[0-9a-f]{40}", clean["git_commit"] or "") and clean["git_uncommitted"] is None, (
        clean
    )
    (tmp_path / "pkg" / "policy.py").write_text("LAMBDA = 0.2\n")
    edited = current_code_version(tmp_path / "pkg")
    assert edited["git_commit"] == clean["git_commit"]
    assert (edited["git_uncommitted"] or "").startswith("1 changed file(s), diff sha256 "), edited
    (tmp_path / "pkg" / "policy.py").write_text("LAMBDA = 0.3\n")
    assert current_code_version(tmp_path / "pkg")["git_uncommitted"] != edited["git_uncommitted"]
    assert (
        current_code_version(tmp_path)["git_uncommitted"]
        == current_code_version(tmp_path / "pkg")["git_uncommitted"]
    )
    outside = tmp_path.parent / f"{tmp_path.name}-not-git"
    outside.mkdir()
    assert current_code_version(outside) == {
        "roadwork": clean["roadwork"],
        "git_commit": None,
        "git_uncommitted": None,
    }
