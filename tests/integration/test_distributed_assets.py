"""Data-parallel training from the assets: explora_backbone and classifier with gpu.nproc_per_node=2
launch torchrun (2 gloo processes) through Dagster Pipes; logs and per-epoch metrics come back, the
split contract audit sees exactly the splits read, and a killed rank fails the step with a clear
error after which the next run resumes from rank 0's checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import mlflow
import pytest

from roadwork_assets.definitions import build_resources
from roadwork_assets.partitions import dataset_version
from tests.conftest import seed_mlflow_store
from tests.integration.conftest import REPO, materialize, tiny_run_config

pytestmark = pytest.mark.slow

TRAINING = ["image_table", "splits", "explora_backbone", "classifier"]


def _config(assets: list[str] = TRAINING, **classifier) -> dict:
    config = tiny_run_config()
    config["resources"]["gpu"]["config"]["nproc_per_node"] = 2
    config["ops"]["classifier"]["config"].update(classifier)
    config["ops"] = {k: v for k, v in config["ops"].items() if k in assets}  # only the selected assets
    return config


@pytest.fixture(scope="module")
def ddp_home(tmp_path_factory, tiny_inbox, mlflow_store_template) -> dict:
    root = tmp_path_factory.mktemp("ddp_assets")
    seed_mlflow_store(mlflow_store_template, root)
    home, state = root / "dagster_home", root / "state"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(dataset_version.name, ["v0001"])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    resources = build_resources(state=state, inbox=tiny_inbox, mlflow_uri=uri)
    return {"home": home, "state": state, "inbox": tiny_inbox, "instance": instance, "resources": resources, "uri": uri}  # fmt: skip


def _meta(instance: dg.DagsterInstance, asset: str) -> dict:
    from roadwork_assets._util import latest_materialization_metadata

    return latest_materialization_metadata(instance, dg.AssetKey(asset), "v0001")


def _descendant_worker(local_rank: int) -> int | None:
    """Pid of the torchrun worker of `local_rank` started (indirectly) by this test process."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"roadwork_assets.torchrun_worker" not in (proc / "cmdline").read_bytes():
                continue
            if f"LOCAL_RANK={local_rank}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            pid = int(proc.name)
            while pid > 1:  # walk up the parents: only a worker of ours
                status = Path(f"/proc/{pid}/status").read_text()
                pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
                if pid == me:
                    return int(proc.name)
        except (OSError, StopIteration, ValueError):
            continue
    return None


def _check_results(result) -> dict[tuple[str, str], bool]:
    """(check name, asset) -> passed, for the checks evaluated in `result`'s run."""
    return {
        (e.asset_check_evaluation_data.asset_check_key.name, e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()): e.asset_check_evaluation_data.passed
        for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }  # fmt: skip


def _mlflow_run(ddp_home: dict, dagster_run_id: str):
    client = mlflow.MlflowClient(tracking_uri=ddp_home["uri"])
    [run] = client.search_runs(
        [client.get_experiment_by_name("roadwork").experiment_id],
        filter_string=f"tags.dagster_run_id = '{dagster_run_id}'",
    )
    return run


def _failures(result) -> list[str]:
    return [e.event_specific_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"]  # fmt: skip


def test_training_assets_run_data_parallel_through_pipes_and_a_killed_rank_resumes(ddp_home) -> None:
    """One torchrun launch per training step and run: explora_backbone, then the classifier, whose
    rank 1 a thread SIGKILLs once rank 0 has checkpointed epoch 1, then the classifier again, which
    resumes. Everything materializes in this process (the one launching torchrun, as a run worker
    would). What came back through Pipes (log lines, per-step metrics into MLflow, the split audit) is
    checked on the ExPLoRA run and on the resumed classifier run."""
    instance = ddp_home["instance"]
    upstream = TRAINING[:-1]
    result = materialize(upstream, instance=instance, partition="v0001", resources=ddp_home["resources"], run_config=_config(upstream))  # fmt: skip
    assert result.success, (
        f"the assets up to explora_backbone failed with nproc_per_node=2: {_failures(result)}"
    )
    assert _check_results(result).get(("check_split_contract", "explora_backbone")) is True, _check_results(
        result
    )
    assert _meta(instance, "explora_backbone")["splits_read"] == ["train"]
    messages = [e.user_message for e in instance.all_logs(result.run_id) if e.step_key == "explora_backbone"]
    assert any("data-parallel training: 2 processes" in m for m in messages), messages[-20:]
    client = mlflow.MlflowClient(tracking_uri=ddp_home["uri"])
    assert client.get_metric_history(_mlflow_run(ddp_home, result.run_id).info.run_id, "explora_loss"), (
        "ExPLoRA's steps did not come back through Pipes into MLflow"
    )

    # enough epochs that the kill lands mid-training on a loaded machine: with 12, rank 1 once finished
    # all of them (under the whole suite on 2 cores) before the killer thread's /proc scan found it
    epochs = 30
    config = _config(["classifier"], epochs=epochs, patience=100)
    state_json = ddp_home["state"] / "checkpoints" / "classifier" / "v0001" / "state.json"
    started = time.time()

    def first_epoch_done() -> bool:
        if not state_json.is_file() or state_json.stat().st_mtime < started:
            return False
        return json.loads(state_json.read_text()).get("epoch", 0) >= 1

    killed: dict[str, int] = {}
    done = threading.Event()

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 400
        while not done.is_set() and time.monotonic() < deadline:
            victim = _descendant_worker(local_rank=1) if first_epoch_done() else None
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                killed["pid"] = victim
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    try:
        failed = materialize(["classifier"], instance=instance, partition="v0001", resources=ddp_home["resources"], run_config=config)  # fmt: skip
    finally:
        done.set()
        killer.join(timeout=30)
    assert killed, "rank 1 was not killed: no checkpoint of epoch 1, or no torchrun worker of rank 1 found"
    assert not failed.success, "the run succeeded although a rank was killed"
    message = "\n".join(_failures(failed))
    assert "data-parallel training (2 processes under torchrun) failed" in message, message[-3000:]
    assert "rerunning the step resumes from it" in message, message[-3000:]
    killed_at = json.loads(state_json.read_text())["epoch"]
    assert 1 <= killed_at < epochs, f"the kill landed after training had finished (epoch {killed_at})"

    resumed = materialize(["classifier"], instance=ddp_home["instance"], partition="v0001", resources=ddp_home["resources"], run_config=config)  # fmt: skip
    assert resumed.success, f"the rerun failed: {_failures(resumed)}"
    meta = _meta(ddp_home["instance"], "classifier")
    assert meta["resumed_from_epoch"] == killed_at, f"resumed from {meta['resumed_from_epoch']}, checkpoint said {killed_at}"  # fmt: skip
    assert meta["epochs_run"] == epochs, meta["epochs_run"]
    assert _check_results(resumed).get(("check_split_contract", "classifier")) is True, _check_results(
        resumed
    )
    assert meta["splits_read"] == ["train", "val_select"]

    # rank 0's Pipes log lines landed in the step's event log while it ran: one per epoch it trained
    messages = [e.user_message for e in instance.all_logs(resumed.run_id) if e.step_key == "classifier"]
    assert any("data-parallel training: 2 processes" in m for m in messages), messages[-20:]
    logged = [int(m.split()[1].rstrip(":")) for m in messages if m.startswith("epoch ")]
    assert logged == list(range(killed_at + 1, epochs + 1)), logged
    # per-epoch metrics came back through Pipes custom messages into the resumed run's MLflow run
    history = client.get_metric_history(_mlflow_run(ddp_home, resumed.run_id).info.run_id, "select_mcc")
    assert [m.step for m in history] == logged, history

    classifier_dir = Path(meta["path"]) / "dir"
    written = json.loads((classifier_dir / "config.json").read_text())
    assert len(written["extra"]["history"]) == epochs, "the classifier written by rank 0 lacks its history"
