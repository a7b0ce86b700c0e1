"""The scale-out instance files, for real: deploy/dagster-postgres.yaml against a PostgreSQL server
(Debian's binaries, a temporary data directory, 127.0.0.1), and deploy/dagster-k8s.yaml validated
against dagster-k8s's own config schema (no cluster).

The suite's two-partitions-at-once scenario (tests/two_partitions.py) covers the Postgres acceptance in
one daemon session: two complete drops arrive, the daemon's new_drop_sensor tick (state and ticks stored
in Postgres) adds both partitions and launches two runs, which the queued coordinator runs at the same
time; both materialize the whole tiny graph, and their training steps never overlap (the `gpu` pool,
whose slots live in Postgres, holds one: tests/reliability/test_concurrency.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.e2e.conftest import REPO
from tests.two_partitions import VERSIONS
from tools import pg_local

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy"


# ---------------------------------------------------------------------------------------------------
# Kubernetes run launcher: the instance file against the library's schema


def _kubeconfig(path: Path) -> Path:
    """A syntactically complete kubeconfig pointing nowhere: loading it contacts no cluster."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "none", "user": {"token": "unused"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "current-context": "none",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_k8s_instance_file_validates_against_dagster_k8s_schema(tmp_path, monkeypatch):
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes import ConfigurableClassData
    from dagster_k8s import K8sRunLauncher

    for key, value in {**pg_local.PgServer(tmp_path, "db.example", 5432, "u", "d").env(), "ROADWORK_IMAGE": "reg/roadwork:abc"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    shutil.copy(DEPLOY / "dagster-k8s.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # the whole instance schema (storage, queue, pools)
    assert set(config["storage"]) == {"postgres"}
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")

    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, f"deploy/dagster-k8s.yaml run_launcher config is invalid: {checked.errors}"
    assert checked.value["job_image"] == "reg/roadwork:abc", "job_image must come from ROADWORK_IMAGE"

    # The launcher builds from exactly that config (only the cluster credentials swapped for a file).
    offline = {**launcher["config"], "load_incluster_config": False}
    offline["kubeconfig_file"] = str(_kubeconfig(tmp_path / "kubeconfig"))
    built = ConfigurableClassData("dagster_k8s", "K8sRunLauncher", yaml.safe_dump(offline)).rehydrate()
    assert isinstance(built, K8sRunLauncher) and built.job_namespace == "roadwork"
    limits = built.run_k8s_config["container_config"]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1, limits

    # the check can fail: a misspelt key is refused by the same schema
    typo = {**launcher["config"], "job_namspace": "roadwork"}
    assert not process_config(K8sRunLauncher.config_type(), typo).success, "a misspelt key was accepted"


def test_instance_files_hold_no_credentials():
    for name in ("dagster-postgres.yaml", "dagster-k8s.yaml"):
        db = yaml.safe_load((DEPLOY / name).read_text())["storage"]["postgres"]["postgres_db"]
        connection = ("hostname", "port", "username", "password", "db_name")
        literal = [k for k in connection if not (isinstance(db.get(k), dict) and set(db[k]) == {"env"})]
        assert not literal, f"deploy/{name}: {literal} must come from env vars, not literals"


# ---------------------------------------------------------------------------------------------------
# Postgres: the daemon's sensor tick, two partitions at once, the gpu pool


@pytest.mark.xdist_group("two_partition_runs")  # the worker that builds the scenario for test_concurrency
def test_postgres_instance_sensor_launches_two_concurrent_partitions_and_pool_holds(two_partition_runs):
    """The shared scenario (tests/two_partitions.py) ran on this Postgres instance: the daemon's sensor
    tick, stored in Postgres, launched both runs; they overlapped and both materialized the whole graph.
    Their artifacts, MLflow runs, feature cache and the gpu pool's one slot are test_concurrency's."""
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    runs, instance = two_partition_runs, two_partition_runs["instance"]
    assert isinstance(instance.run_storage, PostgresRunStorage), type(instance.run_storage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    run_ids = {v: r["run_id"] for v, r in runs["results"].items()}
    for version, result in runs["results"].items():
        assert result["success"], f"run {version} failed; daemon log:\n{runs['outputs'][version][-3000:]}"
    assert sorted(instance.get_dynamic_partitions("dataset_version")) == list(VERSIONS)

    # the sensor's tick, stored in Postgres, names both runs
    [sensor_state] = [s for s in instance.all_instigator_state() if s.name == "new_drop_sensor"]
    ticks = instance.get_ticks(sensor_state.instigator_origin_id, sensor_state.selector_id)
    launched_by_ticks = {rid for tick in ticks for rid in tick.run_ids}
    assert launched_by_ticks == set(run_ids.values()), f"ticks launched {launched_by_ticks}, runs {run_ids}"

    # both partitions materialized the whole graph
    for version in VERSIONS:
        report = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation_report"), asset_partitions=[version]),
            limit=1,
        ).records
        assert report and report[0].run_id == run_ids[version], f"no evaluation_report of the {version} run"

    # at the same time
    spans = {v: instance.get_run_stats(r) for v, r in run_ids.items()}
    (a0, a1), (b0, b1) = ((s.start_time, s.end_time) for s in spans.values())
    assert a0 < b1 and b0 < a1, f"the two runs did not overlap, nothing concurrent was tested: {spans}"
