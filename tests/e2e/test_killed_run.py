"""A `dagster asset materialize` killed with SIGKILL mid-training (as the OOM killer or a reboot would)
leaves its run STARTED and its `gpu` pool slot claimed. The next command must not wait for ever: the
slot is freed (by the next run itself without a daemon, by the dead_run_slot_reaper sensor with one)
and training resumes from the checkpoint, for explora_backbone and for classifier."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from roadwork_resources import pool_slots
from tests.e2e.conftest import REPO, dagster_bin, stop_process, tiny_run_config, wait_for

pytestmark = pytest.mark.slow

EXPLORA_EPOCHS, CLASSIFIER_EPOCHS = 3, 4  # each epoch outlasts the 20 ms poll that kills after the first
UPSTREAM = "image_table,splits,explora_backbone"


def _start(select: str, config: Path, log: Path) -> subprocess.Popen:
    cmd = [
        dagster_bin("dagster"), "asset", "materialize", "-m", "roadwork_assets.definitions",
        "--select", select, "--partition", "v0001", "-c", str(config),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO, env=os.environ.copy(), stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _kill_after_first_epoch(proc: subprocess.Popen, state_json: Path, log: Path, epochs: int) -> float:
    """SIGKILL the command's whole process group as soon as its first epoch is checkpointed;
    return the wall-clock time of the kill."""
    deadline = time.monotonic() + 400
    while not state_json.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the run exited (rc {proc.returncode}) before {state_json} existed:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint {state_json} after 400 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # no finally blocks, no atexit, no run-failure event
    killed_at = time.time()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run should have died of SIGKILL, got {proc.returncode}"
    epoch = json.loads(state_json.read_text())["epoch"]
    assert 1 <= epoch < epochs, f"killed after epoch {epoch} of {epochs}: not mid-training, raise the epochs"
    return killed_at


def _gpu_holders(instance: dg.DagsterInstance) -> set[str]:
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return {slot.run_id for slot in info.claimed_slots}


def _killed_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    """The run just killed: STARTED for ever, holding the gpu slot (the state the issue reports)."""
    [run] = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
    assert _gpu_holders(instance) == {run.run_id}, "the killed run should hold the gpu slot"
    return run


def _failure_time(instance: dg.DagsterInstance, run_id: str) -> tuple[float, str]:
    [event] = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    return event.timestamp, event.message


def _freed(instance, run, with_daemon: bool, killed_at: float, log: Path | None, figures: dict, what: str):
    """With the daemon: wait until its sensor marked the run FAILURE and freed the slot, before the
    next command starts. Without: the next command (already finished or past its start) did it."""
    if with_daemon:
        wait_for(
            lambda: (
                instance.get_run_by_id(run.run_id).is_finished and not (_gpu_holders(instance) & {run.run_id})
            ),
            180,
            f"the daemon to fail run {run.run_id} and free its gpu slot",
        )
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    failed_at, message = _failure_time(instance, run.run_id)
    by = "sensor dead_run_slot_reaper" if with_daemon else "at start"
    assert by in message and "is gone" in message, f"run {run.run_id} failed with {message!r}"
    if log is not None:
        assert f"freed the slots in pool gpu held by run {run.run_id}" in log.read_text(), (
            "the next run did not say that it freed the dead run's slot"
        )
    figures[what] = round(failed_at - killed_at, 1)


def _metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["v0001"]), limit=1
    ).records
    assert records, f"{asset} was not materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_killed_training_frees_the_gpu_slot_and_resumes(e2e_home, tiny_drop_source):
    """explora_backbone is killed while the daemon runs (its sensor frees the slot); classifier is
    killed with no daemon (the next command frees the slot, the issue's own repro). Both resume."""
    shutil.copytree(tiny_drop_source, e2e_home["inbox"] / "v0001")
    instance = dg.DagsterInstance.get()  # creates the SQLite storage before any other process
    instance.add_dynamic_partitions("dataset_version", ["v0001"])
    config = tiny_run_config()
    config["ops"]["explora_backbone"]["config"].update(epochs=EXPLORA_EPOCHS, max_images=16)  # 1 step/epoch
    config["ops"]["classifier"]["config"].update(epochs=CLASSIFIER_EPOCHS, patience=CLASSIFIER_EPOCHS)
    config_path = e2e_home["tmp"] / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ckpt, tmp, figures = e2e_home["state"] / "checkpoints", e2e_home["tmp"], {}

    daemon_log = tmp / "daemon.log"
    daemon = subprocess.Popen(
        [dagster_bin("dagster-daemon"), "run", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=os.environ.copy(), stdout=daemon_log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        # 1. killed in explora_backbone, holding the gpu slot; the daemon's sensor frees it
        log1 = tmp / "run1.log"
        proc = _start(UPSTREAM, config_path, log1)
        killed_at = _kill_after_first_epoch(
            proc, ckpt / "explora_backbone" / "v0001" / "state.json", log1, EXPLORA_EPOCHS
        )
        run1 = _killed_run(instance)
        _freed(instance, run1, True, killed_at, None, figures, "explora_backbone, daemon")
    finally:
        stop_process(daemon, daemon_log)

    # 2. no daemon from here: explora_backbone resumes and finishes; classifier is killed mid-training
    log2 = tmp / "run2.log"
    proc = _start("explora_backbone,classifier", config_path, log2)
    killed_at = _kill_after_first_epoch(
        proc, ckpt / "classifier" / "v0001" / "state.json", log2, CLASSIFIER_EPOCHS
    )
    explora = _metadata(instance, "explora_backbone")
    assert 1 <= explora["resumed_from_epoch"] < EXPLORA_EPOCHS, explora
    assert explora["epochs"] == EXPLORA_EPOCHS, explora
    run2 = _killed_run(instance)

    # 3. the same command again: it frees the dead run's slot at its start, classifier resumes and finishes
    log3 = tmp / "run3.log"
    proc = _start("classifier", config_path, log3)
    assert proc.wait(timeout=400) == 0, f"the resumed classifier run failed:\n{log3.read_text()[-4000:]}"
    _freed(instance, run2, False, killed_at, log3, figures, "classifier, next command")
    classifier = _metadata(instance, "classifier")
    assert 1 <= classifier["resumed_from_epoch"] < CLASSIFIER_EPOCHS, classifier
    assert classifier["epochs_run"] == CLASSIFIER_EPOCHS, classifier
    assert not _gpu_holders(instance), "a finished run left a gpu slot claimed"
    print(f"\nseconds from SIGKILL to the dead run's gpu slot freed: {figures}")


_HOLDER_CHILD = """
import time
import dagster as dg
from roadwork_resources.gpu import GPUResource

@dg.asset(pool="gpu")
def holder(gpu: GPUResource) -> None:
    print("HOLDING", flush=True)
    time.sleep(600)

dg.materialize([holder], instance=dg.DagsterInstance.get(), resources={"gpu": GPUResource()})
"""


def test_a_run_of_another_host_is_not_guessed_dead_and_is_freed_by_hand(e2e_home, capsys):
    """Pids mean nothing on another host: such a run is listed with the command that frees it, and
    that command frees it. A pid now held by a process started later does not count as the run's."""
    instance = dg.DagsterInstance.get()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_CHILD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "HOLDING", "the child did not reach its gpu step"
    child.kill()
    child.wait(timeout=30)
    [holder] = pool_slots.slot_holders(instance)
    assert holder.state == "dead" and holder.pools == ["gpu"] and holder.pids == [child.pid], holder

    instance.add_run_tags(holder.run_id, {pool_slots.HOST_TAG: "another-host"})
    lines: list[str] = []
    freed = pool_slots.free_slots_of_dead_runs(instance, "test", log=lines.append)
    assert not freed and _gpu_holders(instance) == {holder.run_id}, "a run of another host was freed"
    assert len(lines) == 1 and f"pool_slots --free {holder.run_id}" in lines[0], lines
    pool_slots.main([])
    assert f"{holder.run_id}  pools=gpu  unknown" in capsys.readouterr().out

    pool_slots.main(["--free", holder.run_id])
    assert not _gpu_holders(instance), "--free left the slot claimed"
    assert instance.get_run_by_id(holder.run_id).status == dg.DagsterRunStatus.FAILURE

    me = psutil.Process()
    assert pool_slots._alive(me.pid, named_at=me.create_time() + 5)
    assert not pool_slots._alive(me.pid, named_at=me.create_time() - 60), "a reused pid counted as alive"


def test_a_run_killed_outside_a_training_step_is_marked_failed(e2e_home):
    """Killed in a step that takes no pool slot (the evaluation report), a run stayed STARTED for ever, and
    with it its MLflow run (the closer acts on failed runs): the reaper judged slot holders only (an audit)."""
    instance = dg.DagsterInstance.get()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    no_pool = _HOLDER_CHILD.replace('@dg.asset(pool="gpu")', "@dg.asset")
    child = subprocess.Popen(
        [sys.executable, "-c", no_pool], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "HOLDING", "the child did not reach its step"
    alive = pool_slots.slot_holders(instance)
    assert alive == [], f"a live run was judged: {alive}"
    child.kill()
    child.wait(timeout=30)
    lines: list[str] = []
    [freed] = pool_slots.free_slots_of_dead_runs(instance, "test", log=lines.append)
    assert freed.pools == [] and freed.pids == [child.pid], freed
    run = instance.get_run_by_id(freed.run_id)
    assert run.status == dg.DagsterRunStatus.FAILURE, run.status
    assert len(lines) == 1 and "held no pool slot" in lines[0], lines
