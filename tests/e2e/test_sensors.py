"""Way in #3: sensors. Direct evaluations with build_sensor_context (new drops, drift). The real tick
path (dagster-daemon evaluates new_drop_sensor, which adds the partitions and launches runs that
materialize the whole graph) runs in tests/e2e/test_miner.py, on one daemon session shared with the
released-drop and run-queue checks; tests/integration/test_postgres_instance.py runs it on Postgres."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml

from roadwork_assets.automation import (
    drift_retrain_sensor,
    drift_sensor,
    drop_sensor_interval_seconds,
    new_drop_sensor,
    slot_reaper_interval_seconds,
)
from roadwork_assets.monitoring import drift_job
from roadwork_core.data.synthetic import make_demo_drop
from roadwork_core.metrics.drift import psi
from roadwork_resources.dataset import DatasetSource
from roadwork_resources.gpu import GPUResource
from roadwork_resources.io_manager import write_artifact
from roadwork_resources.settings import DriftSettings, RetrainSettings
from tests.e2e.conftest import (
    TINY_CONFIG,
)
from tests.unit.test_drift import build_tiny_bundle, shifted_copies, splits_for

torch.set_num_threads(1)


def _drop(inbox: Path, version: str, ready: bool = True) -> None:
    folder = inbox / version
    (folder / "images").mkdir(parents=True)
    (folder / "labels.csv").write_text("file,label\n")
    if ready:
        (folder / "_READY").write_text(f"{version}\n")


def _tick(instance, inbox: Path, cursor: str | None):
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
    )
    return new_drop_sensor(context)


# ---------------------------------------------------------------------------------------------------
# new_drop_sensor


def test_new_drop_sensor_adds_partition_and_one_run_per_drop(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    empty = _tick(instance, inbox, None)
    assert isinstance(empty, dg.SkipReason), f"an empty inbox must not trigger, got {empty}"
    assert not instance.get_dynamic_partitions("dataset_version"), "an empty inbox added a partition"
    _drop(inbox, "v0001", ready=False)
    first = _tick(instance, inbox, None)
    assert isinstance(first, dg.SkipReason), f"a drop without _READY must be ignored, got {first}"

    (inbox / "v0001" / "_READY").write_text("v0001\n")
    second = _tick(instance, inbox, None)
    assert isinstance(second, dg.SensorResult), f"a complete drop must trigger, got {second}"
    [add] = second.dynamic_partitions_requests
    assert add.partitions_def_name == "dataset_version" and list(add.partition_keys) == ["v0001"], add
    [run] = second.run_requests
    assert (run.partition_key, run.run_key) == ("v0001", "drop-v0001"), run
    assert run.tags["roadwork/trigger"] == "new_drop", run.tags

    third = _tick(instance, inbox, second.cursor)
    assert isinstance(third, dg.SkipReason), f"the same drop must trigger once, got {third}"

    _drop(inbox, "v0002")
    _drop(inbox, "v0003")
    _drop(inbox, "v0004", ready=False)
    instance.add_dynamic_partitions("dataset_version", ["v0002"])  # added by hand earlier
    fourth = _tick(instance, inbox, second.cursor)
    assert isinstance(fourth, dg.SensorResult), fourth
    assert sorted(r.partition_key for r in fourth.run_requests) == ["v0002", "v0003"], fourth.run_requests
    assert [list(r.partition_keys) for r in fourth.dynamic_partitions_requests] == [["v0003"]], (
        "only the partition that does not exist yet is added"
    )
    assert list(json.loads(fourth.cursor)["launched"]) == ["v0001", "v0002", "v0003"], fourth.cursor


def _tick_cursor(instance, inbox: Path, cursor: str | None):
    """One evaluation as the daemon runs it: (result, the cursor it leaves, whether returned or updated)."""
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
    )
    result = new_drop_sensor(context)
    return result, (result.cursor if isinstance(result, dg.SensorResult) else context.cursor)


def test_a_drop_that_changes_after_its_run_was_requested_is_trained_again(tmp_path):
    """`cp -r` / shutil.copytree wrote `_READY` before `labels.csv`: the tick launched a run that failed on
    the half-copied drop, and once the copy finished no tick looked at it again. The cursor keeps each
    launched drop's signature (paths, sizes, mtimes); a change that stays for one tick retrains the newest
    version, once, and a drop still changing on every tick waits."""
    import os

    instance = dg.DagsterInstance.ephemeral()
    inbox = tmp_path / "inbox"
    (inbox / "v0001" / "images").mkdir(parents=True)
    (inbox / "v0001" / "_READY").write_text("v0001\n")  # the marker landed first
    first, cursor = _tick_cursor(instance, inbox, None)
    assert [r.run_key for r in first.run_requests] == ["drop-v0001"]
    instance.add_dynamic_partitions("dataset_version", ["v0001"])
    quiet, cursor = _tick_cursor(instance, inbox, cursor)
    assert isinstance(quiet, dg.SkipReason) and "no new complete drop" in quiet.skip_message, quiet

    for i in range(3):  # the copy still running: one more file every tick, no run yet
        (inbox / "v0001" / "images" / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        waiting, cursor = _tick_cursor(instance, inbox, cursor)
        assert isinstance(waiting, dg.SkipReason) and "changed since their run" in waiting.skip_message, (
            waiting
        )
    (inbox / "v0001" / "labels.csv").write_text("file,label\n")
    waiting, cursor = _tick_cursor(instance, inbox, cursor)
    assert isinstance(waiting, dg.SkipReason), waiting
    again, cursor = _tick_cursor(instance, inbox, cursor)  # unchanged for one tick: settled
    assert isinstance(again, dg.SensorResult), again
    [run] = again.run_requests
    assert run.partition_key == "v0001" and run.run_key.startswith("drop-v0001-changed-"), run
    assert run.tags["roadwork/trigger"] == "changed_drop" and run.tags["roadwork/changed_drops"] == "v0001"
    done, cursor = _tick_cursor(instance, inbox, cursor)
    assert isinstance(done, dg.SkipReason) and "no new complete drop" in done.skip_message, "retrained once"

    _drop(inbox, "v0002")  # a later drop: a change to v0001 now retrains v0002, which holds both
    _, cursor = _tick_cursor(instance, inbox, cursor)
    instance.add_dynamic_partitions("dataset_version", ["v0002"])
    labels = inbox / "v0001" / "labels.csv"
    labels.write_text("file,label\n\n")
    os.utime(labels, ns=(1, 1))
    _, cursor = _tick_cursor(instance, inbox, cursor)
    changed, cursor = _tick_cursor(instance, inbox, cursor)
    assert [r.partition_key for r in changed.run_requests] == ["v0002"], changed

    legacy, _ = _tick_cursor(instance, inbox, '["v0001", "v0002"]')  # a cursor written before signatures
    assert isinstance(legacy, dg.SkipReason), "an old cursor must not relaunch every drop"


def test_a_drop_folder_whose_name_cannot_be_a_partition_is_named_and_blocks_no_other_drop(tmp_path):
    """A ready drop named with bytes that are not UTF-8 (a Latin-1 archive) or with '...' would, added as a
    partition, fail the storage or make the UI launch a range: the tick leaves it out, names it with the fix
    on every tick until it is renamed, and still launches the good drops."""
    import os

    instance = dg.DagsterInstance.ephemeral()
    _drop(tmp_path, "v0001")
    for bad in (os.fsdecode(b"caf\xe9"), "v0001...copy"):
        (tmp_path / bad / "images").mkdir(parents=True)
        (tmp_path / bad / "_READY").write_bytes(b"\n")
    result = _tick(instance, tmp_path, None)
    assert [r.partition_key for r in result.run_requests] == ["v0001"]
    [added] = result.dynamic_partitions_requests
    assert list(added.partition_keys) == ["v0001"]
    instance.add_dynamic_partitions("dataset_version", list(added.partition_keys))  # the storage takes it

    again = _tick(instance, tmp_path, result.cursor)
    assert isinstance(again, dg.SkipReason), again
    for shown in ("'caf\\xe9'", "'v0001...copy'", "rename the folder"):
        assert shown in again.skip_message, again.skip_message


def test_new_drop_sensor_passes_the_automation_run_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_RUN_CONFIG", str(TINY_CONFIG))
    _drop(tmp_path, "v0001")
    result = _tick(dg.DagsterInstance.ephemeral(), tmp_path, None)
    config = result.run_requests[0].run_config
    assert config["ops"]["classifier"]["config"]["mode"] == "head", "ROADWORK_RUN_CONFIG was not applied"


def test_the_run_configs_dataset_and_retrain_settings_are_what_the_sensor_watches(tmp_path, monkeypatch):
    """ROADWORK_RUN_CONFIG's `resources:` reach the runs; the sensor must read the same inbox and force_retrain
    (before: it watched the Definitions' inbox and requested runs that read another one)."""
    watched, elsewhere = tmp_path / "inbox_runs_read", tmp_path / "definitions_inbox"
    _drop(watched, "v0001")
    _drop(elsewhere, "v0009")
    config = tmp_path / "run_config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "resources": {
                    "dataset": {"config": {"inbox": str(watched)}},
                    "retrain": {"config": {"force_retrain": True}},
                }
            }
        )
    )
    monkeypatch.setenv("ROADWORK_RUN_CONFIG", str(config))
    result = _tick(dg.DagsterInstance.ephemeral(), elsewhere, None)
    assert [r.partition_key for r in result.run_requests] == ["v0001"], result.run_requests
    [request] = result.run_requests
    assert request.tags.get("roadwork/force_retrain") == "true", request.tags
    assert request.run_config["resources"]["dataset"]["config"]["inbox"] == str(watched)


def test_the_sensor_reads_an_env_sourced_inbox_and_names_a_bad_value_with_its_file(tmp_path, monkeypatch):
    watched = tmp_path / "inbox_from_env"
    _drop(watched, "v0001")
    monkeypatch.setenv("RW_TEST_INBOX", str(watched))
    config = tmp_path / "run_config.yaml"
    config.write_text(
        yaml.safe_dump({"resources": {"dataset": {"config": {"inbox": {"env": "RW_TEST_INBOX"}}}}})
    )
    monkeypatch.setenv("ROADWORK_RUN_CONFIG", str(config))
    result = _tick(dg.DagsterInstance.ephemeral(), tmp_path / "definitions_inbox", None)
    assert [r.partition_key for r in result.run_requests] == ["v0001"], result

    config.write_text(yaml.safe_dump({"resources": {"dataset": {"config": {"format": "parquet"}}}}))
    with pytest.raises(
        ValueError, match=r"ROADWORK_RUN_CONFIG=.*resources\.dataset\.config is not valid \(format"
    ):
        _tick(dg.DagsterInstance.ephemeral(), tmp_path / "definitions_inbox", None)


def test_an_unreadable_automation_run_config_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_RUN_CONFIG", str(tmp_path / "missing.yaml"))
    _drop(tmp_path / "inbox", "v0001")
    with pytest.raises(ValueError, match="ROADWORK_RUN_CONFIG=.*missing.yaml.*unset it"):
        _tick(dg.DagsterInstance.ephemeral(), tmp_path / "inbox", None)


@pytest.mark.parametrize(
    "variable, read, default",
    [
        ("ROADWORK_DROP_SENSOR_INTERVAL", drop_sensor_interval_seconds, 30),
        ("ROADWORK_SLOT_REAPER_INTERVAL", slot_reaper_interval_seconds, 20),
    ],
)
def test_sensor_intervals_come_from_the_environment(monkeypatch, variable, read, default):
    monkeypatch.delenv(variable, raising=False)
    assert read() == default
    monkeypatch.setenv(variable, "7")
    assert read() == 7
    for bad in ("0", "-5", "2.5", "soon"):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ValueError, match=rf"{variable}=.*whole number of seconds"):
            read()


def test_the_sensors_use_the_intervals_read_when_the_code_location_loads(monkeypatch):
    """The intervals are read at import, where the daemon / `dagster dev` loads the code location."""
    import importlib

    import roadwork_assets.automation as automation

    monkeypatch.setenv("ROADWORK_DROP_SENSOR_INTERVAL", "11")
    monkeypatch.setenv("ROADWORK_SLOT_REAPER_INTERVAL", "3")
    try:
        fresh = importlib.reload(automation)
        assert fresh.new_drop_sensor.minimum_interval_seconds == 11
        assert fresh.dead_run_slot_reaper.minimum_interval_seconds == 3
    finally:
        monkeypatch.undo()
        importlib.reload(automation)


# ---------------------------------------------------------------------------------------------------
# drift_sensor


@pytest.fixture(scope="module")
def drift_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("drift_sensor")
    train = make_demo_drop(root / "inbox", "v0001", n=48, seed=21, scale=0.5)
    same = make_demo_drop(root / "same", "m", n=32, seed=22, scale=0.5)
    return {
        "bundle": build_tiny_bundle(root),
        "splits": splits_for(train / "images"),
        "same": same / "images",
        "root": root,
    }


def _released_instance(
    world: dict, tmp_path: Path, partitions=("v0001",), release: bool = True
) -> dg.DagsterInstance:
    """An instance where `splits` and then `bundle` of v0001 were materialized in one run (recorded with their
    artifact paths; the bundle's input pointer names that splits materialization), with every blocking check
    of `bundle` passing (`release`) or failing: a release as `released_bundle` reads it. Later `partitions`
    are only added, as new_drop_sensor does before their retrain has run."""
    from roadwork_assets.partitions import dataset_version
    from roadwork_assets.released import blocking_checks
    from roadwork_core.bundle.verify import verify_bundle

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("dataset_version", list(partitions))
    paths = {}
    for key, obj in (("bundle", Path(world["bundle"])), ("splits", world["splits"])):
        paths[key] = tmp_path / "artifacts" / key / "v0001"
        write_artifact(paths[key], obj)

    @dg.asset(name="splits", partitions_def=dataset_version)
    def splits_written() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"path": str(paths["splits"])})

    bundle_id = verify_bundle(Path(world["bundle"])).content_sha256

    @dg.asset(name="bundle", partitions_def=dataset_version, deps=["splits"])
    def bundle_written() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"path": str(paths["bundle"]), "bundle_id": bundle_id})

    def check(name: str):
        @dg.asset_check(asset="bundle", name=name, blocking=True, partitions_def=dataset_version)
        def _check() -> dg.AssetCheckResult:
            return dg.AssetCheckResult(passed=release)

        return _check

    result = dg.materialize(
        [splits_written, bundle_written, *(check(n) for n in sorted(blocking_checks()))],
        instance=instance, partition_key="v0001", raise_on_error=False,
    )  # fmt: skip
    assert result.get_asset_materialization_events(), "the stand-in release was not recorded"
    return instance


def _drift_tick(instance, monitor: Path, cursor: str | None = None):
    """drift_sensor's tick; when it launches drift_job, that run (in process, on this instance) and then
    drift_retrain_sensor's tick: (the last outcome, drift_sensor's cursor)."""
    settings = DriftSettings(
        monitor_dir=str(monitor), sample=32, min_images=16, n_permutations=200, psi_threshold=1.0
    )
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"drift": settings})
    launched = drift_sensor(context)
    if not isinstance(launched, dg.RunRequest):
        return launched, context.cursor
    assert launched.tags["roadwork/trigger"] == "drift_check", launched.tags
    run = drift_job.execute_in_process(
        instance=instance, tags=launched.tags,
        resources={"drift": settings, "gpu": GPUResource(device="cpu", threads=1)},
    )  # fmt: skip
    assert run.success
    follow = dg.build_sensor_context(instance=instance)
    outcome = drift_retrain_sensor(follow)
    again = drift_retrain_sensor(dg.build_sensor_context(instance=instance, cursor=follow.cursor))
    assert isinstance(again, dg.SkipReason) and "no drift check since" in again.skip_message, again
    return outcome, context.cursor


def test_drift_sensor_requests_retrain_with_figures(drift_world, tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = _released_instance(drift_world, tmp_path)
    monitor = tmp_path / "monitor"
    shifted_copies(sorted(str(p) for p in drift_world["same"].glob("*.jpg")), monitor)

    request, cursor = _drift_tick(instance, monitor)
    assert isinstance(request, dg.RunRequest), f"darkened/inverted images must request a retrain: {request}"
    assert request.partition_key == "v0001", request
    assert request.tags["roadwork/trigger"] == "drift", request.tags
    assert request.tags["roadwork/drift_drifted"] == "True", request.tags
    assert float(request.tags["roadwork/drift_mmd_pvalue"]) < 0.01, request.tags
    assert list((tmp_path / "state" / "drift_cache").glob("*.safetensors")), "reference not cached"

    again, _ = _drift_tick(instance, monitor, cursor)
    assert isinstance(again, dg.SkipReason) and "unchanged" in again.skip_message, again


def test_drift_sensor_skips_same_distribution(drift_world, tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = _released_instance(drift_world, tmp_path)
    result, cursor = _drift_tick(instance, drift_world["same"])
    assert isinstance(result, dg.SkipReason) and "no significant drift" in result.skip_message, result
    assert cursor, "an evaluated folder must be remembered in the cursor"


def test_drift_sensor_compares_with_the_release_while_the_newest_version_retrains(
    drift_world, tmp_path, monkeypatch
):
    """v0002 was added (its retrain queued, running or failed): no bundle there yet, and drift monitoring
    used to stop ("no released bundle yet"). It compares with v0001's release and requests the newest
    version's retrain. A bundle whose blocking checks failed is no release to compare with."""
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    monitor = tmp_path / "monitor"
    shifted_copies(sorted(str(p) for p in drift_world["same"].glob("*.jpg")), monitor)
    instance = _released_instance(drift_world, tmp_path, partitions=("v0001", "v0002"))
    request, _ = _drift_tick(instance, monitor)
    assert isinstance(request, dg.RunRequest) and request.partition_key == "v0002", request
    failed = _released_instance(drift_world, tmp_path / "failed", release=False)
    skip, _ = _drift_tick(failed, monitor)
    assert isinstance(skip, dg.SkipReason) and "no released bundle" in skip.skip_message, skip


def test_drift_job_refuses_a_release_whose_directory_now_holds_another_bundle(
    drift_world, tmp_path, monkeypatch
):
    """A later bundle of the version that failed its checks used to overwrite the directory, and drift_job
    embedded with it while reporting 'against the release of v0001'."""
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = _released_instance(drift_world, tmp_path)
    policy = tmp_path / "artifacts" / "bundle" / "v0001" / "dir" / "answer.json"
    policy.write_text(policy.read_text().replace("0.5", "0.25"))  # another bundle, or the same one damaged
    settings = DriftSettings(
        monitor_dir=str(drift_world["same"]), sample=32, min_images=16, n_permutations=200
    )
    run = drift_job.execute_in_process(
        instance=instance, raise_on_error=False,
        resources={"drift": settings, "gpu": GPUResource(device="cpu", threads=1)},
    )  # fmt: skip
    assert not run.success
    failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "release of v0001" in message and "answer.json" in message, message


def test_a_release_recorded_before_copies_survives_the_next_bundle_of_its_version(
    drift_world, tmp_path, monkeypatch
):
    """A release whose materialization has no `bundle_path` (recorded by the code before release copies) still
    pointed at artifacts/bundle/<v>/dir, which the version's next bundle replaces (a review of the fix)."""
    import shutil

    from roadwork_assets.release import _keep_release_copy
    from roadwork_assets.released import released_bundle
    from roadwork_core.bundle.verify import verify_bundle
    from roadwork_resources.artifact_store import ArtifactStore

    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = _released_instance(drift_world, tmp_path)  # recorded with path + bundle_id only
    before = released_bundle(instance)
    assert before.path == tmp_path / "artifacts" / "bundle" / "v0001" / "dir", before.path
    newer = tmp_path / "newer"
    shutil.copytree(drift_world["bundle"], newer)  # the next bundle of v0001 (its id stands in below)
    context = dg.build_asset_context(instance=instance, partition_key="v0001")
    _keep_release_copy(context, ArtifactStore(root=str(tmp_path)), newer, "f" * 64)
    other = (
        tmp_path / "elsewhere"
    )  # the next bundle's files, as the IO manager writes them over the release's
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    write_artifact(tmp_path / "artifacts" / "bundle" / "v0001", other)
    after = released_bundle(instance)
    assert after.path == tmp_path / "releases" / "bundle" / "v0001" / before.bundle_id, after.path
    assert verify_bundle(after.path).content_sha256 == before.bundle_id


def test_drift_sensor_skips_without_bundle_or_images(drift_world, tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = dg.DagsterInstance.ephemeral()
    result, _ = _drift_tick(instance, drift_world["same"])
    assert isinstance(result, dg.SkipReason) and "no released bundle" in result.skip_message, result
    few, _ = _drift_tick(instance, tmp_path / "empty")
    assert isinstance(few, dg.SkipReason) and "need 16" in few.skip_message, few


def test_drift_sensor_takes_the_run_configs_drift_settings_and_passes_its_resources(
    drift_world, tmp_path, monkeypatch
):
    """ROADWORK_RUN_CONFIG's `resources:` apply to drift checks too: its min_images decides the tick, and
    the drift_job run gets its resources (only those: the file's `ops:` are the retrain job's)."""
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = _released_instance(drift_world, tmp_path)
    n = len(list(drift_world["same"].glob("*.jpg")))
    config = tmp_path / "run_config.yaml"
    resources = {"drift": {"config": {"monitor_dir": str(drift_world["same"]), "min_images": n + 1}}}
    config.write_text(
        yaml.safe_dump({"ops": {"classifier": {"config": {"epochs": 1}}}, "resources": resources})
    )
    monkeypatch.setenv("ROADWORK_RUN_CONFIG", str(config))
    skipped, _ = _drift_tick(instance, drift_world["same"])
    assert isinstance(skipped, dg.SkipReason) and f"need {n + 1}" in skipped.skip_message, skipped

    resources["drift"]["config"]["min_images"] = 16
    config.write_text(
        yaml.safe_dump({"ops": {"classifier": {"config": {"epochs": 1}}}, "resources": resources})
    )
    request = drift_sensor(
        dg.build_sensor_context(
            instance=instance, resources={"drift": DriftSettings(monitor_dir=str(tmp_path))}
        )
    )
    assert isinstance(request, dg.RunRequest), request
    assert request.run_config == {"resources": resources}, request.run_config
    from roadwork_assets.definitions import defs

    dg.validate_run_config(defs.resolve_job_def("drift_job"), request.run_config)


def test_default_drift_settings_keep_psi_false_alarms_rare():
    """PSI grows as 1/n on small samples; the defaults must keep a no-drift folder under the threshold."""
    defaults = DriftSettings(monitor_dir="unused")
    rng = np.random.default_rng(0)
    values = np.array(
        [psi(rng.uniform(size=defaults.sample), rng.uniform(size=defaults.min_images)) for _ in range(300)]
    )
    rate = float((values > defaults.psi_threshold).mean())
    assert rate <= 0.10, f"PSI > {defaults.psi_threshold} by chance in {rate:.0%} of no-drift checks"


def test_a_failed_drift_check_is_tried_again_and_every_new_report_counts(drift_world, tmp_path, monkeypatch):
    """drift_sensor moves its cursor when it launches drift_job: a run that failed (a missing artifact, an
    unreadable image) was never retried while the folder stayed the same. And drift_retrain_sensor read only
    the newest observation, so a drifted check followed by a calm one within a tick was lost."""
    import json

    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    instance = _released_instance(drift_world, tmp_path)
    settings = DriftSettings(monitor_dir=str(drift_world["same"]), sample=32, min_images=16)
    context = dg.build_sensor_context(instance=instance, resources={"drift": settings})
    launched = drift_sensor(context)
    assert isinstance(launched, dg.RunRequest), launched
    failing = DriftSettings(monitor_dir=str(drift_world["same"]), min_images=10_000)  # the op refuses
    run = drift_job.execute_in_process(
        instance=instance, tags=launched.tags, raise_on_error=False,
        resources={"drift": failing, "gpu": GPUResource(device="cpu", threads=1)},
    )  # fmt: skip
    assert not run.success
    retry = drift_sensor(
        dg.build_sensor_context(instance=instance, cursor=context.cursor, resources={"drift": settings})
    )
    assert isinstance(retry, dg.RunRequest) and retry.run_key != launched.run_key, retry

    for drifted in (True, False):  # two checks between two ticks: the drifted one must not be lost
        instance.report_runless_asset_event(
            dg.AssetObservation(
                asset_key="drift_report",
                metadata={
                    "drifted": drifted,
                    "mmd_pvalue": 0.001 if drifted else 0.5,
                    "psi": 0.1,
                    "ks_pvalue": 0.5,
                    "monitor_fingerprint": f"fp{drifted}",
                    "tags": json.dumps({"roadwork/drift_drifted": str(drifted)}),
                },
            )  # fmt: skip
        )
    request = drift_retrain_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(request, dg.RunRequest), request
    assert request.tags["roadwork/drift_drifted"] == "True" and request.run_key.endswith("fpTrue"), request


# ---------------------------------------------------------------------------------------------------
# mlflow_failed_run_closer


@pytest.mark.parametrize("experiment", [None, "ablations"])
def test_the_failed_run_closer_fails_the_mlflow_run_in_the_store_and_experiment_the_run_used(
    tmp_path, monkeypatch, experiment
):
    """A failed Dagster run whose MLflow run was left RUNNING (a blocking check, a killed step) gets it marked
    FAILED, in the experiment its run config named (before: only experiment 'roadwork' was looked at)."""
    import mlflow

    from roadwork_assets.automation import mlflow_failed_run_closer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    @dg.op
    def boom() -> None:
        raise RuntimeError("a failing step")

    run_config = {"resources": {"mlflow": {"config": {"experiment_name": experiment}}}} if experiment else {}
    instance = dg.DagsterInstance.ephemeral()

    @dg.job
    def failing() -> None:
        boom()

    failed = failing.execute_in_process(instance=instance, raise_on_error=False)
    assert not failed.success
    dagster_run = failed.dagster_run._replace(run_config=run_config)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment or "roadwork")
    mlflow_run = client.create_run(experiment_id, tags={"dagster_run_id": dagster_run.run_id})
    other = client.create_run(experiment_id, tags={"dagster_run_id": "another-run"})
    context = dg.build_run_status_sensor_context(
        sensor_name="mlflow_failed_run_closer", dagster_event=failed.get_run_failure_event(),
        dagster_instance=instance, dagster_run=dagster_run,
    ).for_run_failure()  # fmt: skip
    mlflow_failed_run_closer(context)
    assert client.get_run(mlflow_run.info.run_id).info.status == "FAILED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING", (
        "another Dagster run's MLflow run was closed"
    )
