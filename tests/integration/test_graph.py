"""Materialize the real graph on a temporary instance (the whole graph through `dagster asset materialize`,
parts of it in process): every asset, the checks, MLflow, lineage."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

import roadwork_core
from roadwork_assets._util import latest_materialization_metadata
from roadwork_assets.definitions import build_resources
from roadwork_assets.partitions import dataset_version
from roadwork_core.bundle.bundle import Bundle
from tests.integration.conftest import REPO, materialize, tiny_run_config

pytestmark = pytest.mark.slow


def _instance(version: str) -> dg.DagsterInstance:
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(dataset_version.name, [version])
    return instance


def _artifact(instance: dg.DagsterInstance, asset: str, version: str = "v0001"):
    """Load an asset's stored artifact through the path its materialization recorded."""
    from roadwork_assets._util import latest_materialization_metadata
    from roadwork_resources.io_manager import read_artifact

    return read_artifact(Path(latest_materialization_metadata(instance, dg.AssetKey(asset), version)["path"]))


def _checks(source, run_id: str | None = None) -> dict[str, bool]:
    """check@asset -> passed, from an in-process result, or from `source` (an instance)'s log of `run_id`."""
    events = (
        [e.dagster_event for e in source.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
        if run_id is not None
        else source.all_events
    )
    return {
        ev.asset_check_evaluation_data.asset_check_key.name
        + "@"
        + ev.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string(): ev.asset_check_evaluation_data.passed
        for ev in events
        if ev.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_full_graph_materializes_with_green_checks_and_mlflow_run(tiny_inbox, rw_home, monkeypatch, tmp_path):
    """Way in #2, `dagster asset materialize --select '*'` in a subprocess against a temporary instance,
    on first use (the run itself creates and migrates the MLflow store, as in a new checkout), with the
    model registration on (the default; tests/configs/tiny.yaml skips it). Then everything it made: checks,
    per-split predictions, the bundle, metadata, the MLflow run and registered model, and later runs of
    parts of the graph on the same instance (in process)."""
    import os
    import subprocess

    import yaml

    from tests.e2e.conftest import RUN_TIMEOUT, dagster_bin

    instance = _instance("v0001")
    config = tiny_run_config()
    config["ops"]["evaluation_report"]["config"]["register_model"] = True
    config_path = tmp_path / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    (rw_home["state"] / "mlflow.db").unlink()  # first use: no store yet
    env = {**os.environ, "ROADWORK_INBOX": str(tiny_inbox), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in (
        "ROADWORK_RUN_CONFIG",
        "ROADWORK_MONITOR_DIR",
        "ROADWORK_FORCE_RETRAIN",
        "MLFLOW_TRACKING_URI",
    ):
        env.pop(key, None)  # the store is the state folder's own: sqlite:///$ROADWORK_STATE/mlflow.db
    cmd = [
        dagster_bin("dagster"), "asset", "materialize", "-m", "roadwork_assets.definitions",
        "--select", "*", "--partition", "v0001", "-c", str(config_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, (
        f"dagster asset materialize failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    [dagster_run] = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
    assert len(instance.get_runs()) == 1, "expected exactly one run in the temporary instance"
    assert (rw_home["state"] / "mlflow.db").is_file(), "the run did not create the MLflow store"
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])

    checks = _checks(instance, dagster_run.run_id)
    assert checks and all(checks.values()), f"failing checks: {[k for k, v in checks.items() if not v]}"
    for name in (
        "check_no_shared_images",
        "check_no_near_duplicates_across_splits",
        "check_label_balance",
        "check_min_per_class",
        "check_sticky_splits",
    ):
        assert f"{name}@splits" in checks, f"split check {name} did not run"
    assert "check_split_contract@evaluation_report" in checks

    bundle_files = _artifact(instance, "bundle")
    for name in ("manifest.json", "model.safetensors", "policy.json", "calibrator.json", "config.json"):
        assert (Path(bundle_files) / name).is_file(), f"bundle file {name} missing under {bundle_files}"

    # every predictions asset read exactly its own split
    for asset, split in [
        ("select_predictions", "val_select"),
        ("calib_predictions", "val_calib"),
        ("test_predictions", "val_test"),
    ]:
        frame, splits = _artifact(instance, asset), _artifact(instance, "splits")
        own = set(splits.loc[splits["split"] == split, "image_id"])
        assert set(frame["image_id"]) == own, f"{asset} is not exactly {split}"

    # the bundle loads (checksums verified) and decides
    bundle_dir = _artifact(instance, "bundle")
    bundle = Bundle.load(Path(bundle_dir))
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    assert manifest["dataset_version"] == "v0001"
    assert manifest["policy"] == "scrc"
    assert manifest["code_version"]["roadwork"] == roadwork_core.__version__
    uri = _artifact(instance, "splits")["uri"].iloc[0]
    pred = bundle.predict([uri])[0]
    assert 0.0 <= pred.p_roadwork <= 1.0 and pred.decision in {"roadwork", "no_roadwork", "defer"}
    # the subnet answer: its threshold was chosen on val_calib by the bundle asset and recorded
    assert bundle.answer_rule.source.startswith("val_calib") and bundle.answer_rule.n > 0, bundle.answer_rule
    assert (pred.answer > 0.5) == (pred.p_roadwork >= bundle.answer_rule.threshold) and pred.answer != 0.5
    bundle_meta = latest_materialization_metadata(instance, dg.AssetKey("bundle"), "v0001")
    assert bundle_meta["answer_threshold"] == bundle.answer_rule.threshold
    # ExPLoRA's capped epoch (tiny.yaml: 32 of ~72 train + 8 pool images) is train images only, and
    # the metadata says so (it used to report the pool as used); the run log carries the warning
    explora_meta = latest_materialization_metadata(instance, dg.AssetKey("explora_backbone"), "v0001")
    assert explora_meta["images_used"] == 32 and explora_meta["unlabelled_kept"] > 0, explora_meta
    assert explora_meta["unlabelled_used"] == 0, explora_meta
    messages = [entry.user_message for entry in instance.all_logs(dagster_run.run_id)]
    assert any("raise explora_backbone.max_images" in m for m in messages if m), "no cap warning logged"
    assert bundle_meta["bundle_id"] == manifest["content_sha256"] and bundle_meta["source_fingerprint"]

    # head mode: later epochs ran no backbone forward and are much faster (cache)
    clf = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("classifier"), asset_partitions=["v0001"]), limit=1
        )
        .records[0]
        .asset_materialization.metadata
    )
    history = clf["history"].value
    assert all(h["backbone_forwards"] == 0 for h in history[1:]), history

    report_dir = _artifact(instance, "evaluation_report")
    report = json.loads((report_dir / "report.json").read_text())
    assert "augrc" in report["metrics"] and (report_dir / "reliability.png").is_file()
    assert report["config"]["bootstrap_unit"] == "group_id", "CIs must resample near-duplicate groups"
    assert "strictly past" in report["guarantee_check"]["policy_guarantee"]["conditioning"]
    # the subnet section: val_test through the validator replica, three answers, per level and the mix
    subnet = report["subnet"]
    cells = {(r["answer"], r["level"]) for r in subnet["per_level"]}
    assert cells == {(a, lv) for a in ("model", "always_0.5", "argmax") for lv in ("0", "1", "2", "3", "mix")}
    assert {r["answer"] for r in subnet["stream"]} == {"model", "always_0.5", "argmax"}
    assert all(0 <= r["low"] <= r["high"] <= 1 for r in subnet["stream"]), subnet["stream"]
    assert "Subnet: val_test through the validator replica" in (report_dir / "summary.md").read_text()

    # one MLflow run for the Dagster run, FINISHED, with params, per-epoch metrics and the evaluation
    mlflow.set_tracking_uri(rw_home["mlflow_uri"])
    runs = mlflow.search_runs(
        experiment_names=["roadwork"],
        filter_string=f"tags.dagster_run_id = '{dagster_run.run_id}'",
        output_format="list",
    )
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "classifier.mode" in run.data.params
    assert run.data.params.get("run_config.ops.classifier.config.mode") == "head", (
        "the run config is logged as params"
    )
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == len(history)
    assert any(k.startswith("test_") for k in run.data.metrics)
    assert "test_subnet_model_stream_expected_reward" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bundle", "evaluation_report"} <= artifacts, artifacts
    # artifacts live in the state folder beside the store, not in ./mlruns of the current directory
    assert run.info.artifact_uri.startswith((rw_home["state"] / "mlartifacts").resolve().as_uri()), (
        run.info.artifact_uri
    )

    # the bundle registered as MLflow model 'roadwork' (alias production: the newest version's release) loads
    # through mlflow.pyfunc and predicts the same
    [registered] = client.search_model_versions("name = 'roadwork'")
    assert (
        registered.tags["dataset_version"] == "v0001"
        and registered.tags["dagster_run_id"] == dagster_run.run_id
    )
    assert registered.tags["bundle_id"] == bundle.manifest.content_sha256, registered.tags
    assert client.get_model_version_by_alias("roadwork", "production").version == registered.version
    model = mlflow.pyfunc.load_model("models:/roadwork@production")
    # the environment `mlflow models serve` builds is pinned to the versions the bundle was made with
    from importlib.metadata import version as installed

    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/roadwork@production"))
    pins = dict(line.split("==") for line in requirements.read_text().split() if "==" in line)
    assert pins.get("torch") == installed("torch").split("+")[0] and pins.get("timm") == installed("timm"), (
        pins
    )
    signature = model.metadata.signature  # what `mlflow models serve` and the MLflow UI show and check
    assert signature is not None and signature.inputs.input_names() == ["image_b64", "path"], signature
    served = model.predict(pd.DataFrame({"image_b64": [base64.b64encode(Path(uri).read_bytes()).decode()]}))
    # the other input column alone passes the schema; paths are read inside ROADWORK_PYFUNC_PATH_ROOT only
    monkeypatch.setenv("ROADWORK_PYFUNC_PATH_ROOT", str(tiny_inbox))
    by_path = model.predict(pd.DataFrame({"path": [str(uri)]}))
    assert by_path["decision"].iloc[0] == pred.decision
    assert served["decision"].iloc[0] == pred.decision
    assert abs(served["p_roadwork"].iloc[0] - pred.p_roadwork) < 1e-6
    assert abs(served["answer"].iloc[0] - pred.answer) < 1e-6, "the pyfunc must return the subnet answer"

    def failure_of(run) -> str:
        assert not run.success, "the run should have been refused"
        return str(
            next(
                ev for ev in run.all_events if ev.event_type_value == "STEP_FAILURE"
            ).event_specific_data.error
        )

    def only(*ops: str) -> dict:  # the run config for a selection (unknown ops are refused in process)
        return {"resources": config["resources"], "ops": {k: v for k, v in config["ops"].items() if k in ops}}

    # the report made again for the same release registers no second version of the same bundle
    again = materialize(["evaluation_report"], instance=instance, partition="v0001", resources=resources, run_config=only("evaluation_report"))  # fmt: skip
    assert again.success
    assert [v.version for v in client.search_model_versions("name = 'roadwork'")] == [registered.version]

    # a bundle materialized without its blocking checks is no release: evaluation_report alone refuses it
    # (it used to evaluate it and register it in MLflow)
    unchecked = materialize(
        dg.AssetSelection.assets("bundle").without_checks(), instance=instance, partition="v0001",
        resources=resources, run_config=only("bundle"),
    )  # fmt: skip
    assert unchecked.success
    message = failure_of(materialize(["evaluation_report"], instance=instance, partition="v0001", resources=resources, run_config=only("evaluation_report")))  # fmt: skip
    assert "is not released" in message and "check_bundle_reproduces_predictions" in message, message

    # `classifier+` minus the calibrator and policies: the bundle would ship the new model with the old
    # model's calibration and SCRC thresholds (every check green); its inputs' lineage refuses it
    retrain = only("classifier", "calib_predictions", "bundle")
    retrain["ops"]["classifier"] = {"config": {**config["ops"]["classifier"]["config"], "lr": 0.01}}
    mixed = materialize(
        ["classifier", "calib_predictions", "bundle"], instance=instance, partition="v0001", resources=resources,
        run_config=retrain,
    )  # fmt: skip
    message = failure_of(mixed)
    assert "different materializations of" in message and "calibrator" in message, message
    assert "--select 'classifier*'" in message, message


def test_failing_blocking_check_stops_downstream_and_fails_mlflow_run(tmp_path, rw_home):
    """A class too small for min_per_class: the blocking split check fails, nothing downstream runs."""
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=40, seed=3, scale=0.5)
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = tiny_run_config()
    config["resources"]["split_settings"]["config"]["min_per_class"] = 50
    result = materialize("*", instance=instance, partition="v0001", resources=resources, run_config=config)
    assert not result.success
    checks = _checks(result)
    assert checks["check_min_per_class@splits"] is False
    materialized = {ev.asset_key.to_user_string() for ev in result.get_asset_materialization_events()}
    assert materialized == {"image_table", "splits"}, f"downstream assets ran: {materialized}"
    message = next(
        ev.asset_check_evaluation_data.description
        for ev in result.all_events
        if ev.event_type_value == "ASSET_CHECK_EVALUATION"
        and ev.asset_check_evaluation_data.asset_check_key.name == "check_min_per_class"
    )
    assert "more" in message, f"the failure must say how many more images are needed: {message}"


def test_classifier_asset_with_the_demo_settings(tiny_inbox, rw_home):
    """The classifier asset as `make demo` runs it (configs/demo.yaml: full mode, EMA, its augmentation
    setting, its torch threads and attention kernel), for one epoch on the tiny drop. The tiny config
    trains in head mode, so this is the graph test that walks the demo's own training path."""
    import yaml

    demo = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text())
    classifier = {**demo["ops"]["classifier"]["config"], "epochs": 1, "patience": 1}
    assert classifier["mode"] == "full" and classifier["ema_decay"], classifier
    config = tiny_run_config()
    config["ops"] = {
        "explora_backbone": {"config": {**config["ops"]["explora_backbone"]["config"], "enabled": False}},
        "classifier": {"config": classifier},
    }
    for knob in ("threads", "attn_backend"):
        config["resources"]["gpu"]["config"][knob] = demo["resources"]["gpu"]["config"][knob]
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    result = materialize(
        ["image_table", "splits", "explora_backbone", "classifier"],
        instance=instance,
        partition="v0001",
        resources=resources,
        run_config=config,
    )
    failures = [
        e.event_specific_data.error.to_string()[-2000:] for e in result.all_events if e.is_step_failure
    ]
    assert result.success, f"the classifier with the demo's settings failed:\n{failures}"
    meta = latest_materialization_metadata(instance, dg.AssetKey("classifier"), "v0001")
    assert meta["mode"] == "full" and meta["epochs_run"] == 1, meta
