"""The scale-out instance files, for real: deploy/dagster-postgres.yaml against a PostgreSQL server
(Debian's binaries, a temporary data directory, 127.0.0.1), and deploy/dagster-k8s.yaml validated
against dagster-k8s's own config schema (no cluster).

One scenario covers the Postgres acceptance in one daemon session: two complete drops arrive, the
daemon's new_drop_sensor tick (state and ticks stored in Postgres) adds both partitions and launches
two runs, which the queued coordinator runs at the same time; both materialize the whole tiny graph
and their training steps never overlap (the `gpu` pool, whose slots live in Postgres, holds one)."""

from __future__ import annotations

import os
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.conftest import seed_mlflow_store
from tests.e2e.conftest import REPO, TINY_CONFIG, dagster_bin, stop_process, wait_for
from tests.reliability.test_concurrency import _step_windows
from tools import pg_local

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy"
VERSIONS = ("v0001", "v0002")


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session; each test creates its own database on it."""
    data_dir = pg_local.scratch_dir("roadwork-pg-")  # a TMPDIR under a private folder: /tmp instead
    server = pg_local.start(data_dir / "data")
    try:
        yield server
    finally:
        pg_local.stop(server.data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def _database(server: pg_local.PgServer, name: str) -> dict[str, str]:
    """A new empty database on `server`; returns the DAGSTER_PG_* environment that points at it."""
    import psycopg2

    conn = psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname=server.db)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return {**server.env(password="env-only-pg-password"), "DAGSTER_PG_DB": name}


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


def test_postgres_instance_sensor_launches_two_concurrent_partitions_and_pool_holds(
    pg_server, tmp_path, monkeypatch, mlflow_store_template
):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    from roadwork_core.data.synthetic import make_demo_drop

    home, state, inbox = tmp_path / "dagster_home", tmp_path / "state", tmp_path / "inbox"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster-postgres.yaml", home / "dagster.yaml")
    seed_mlflow_store(mlflow_store_template, tmp_path)
    env = {
        **_database(pg_server, "roadwork_graph"),
        "DAGSTER_HOME": str(home),
        "ROADWORK_STATE": str(state),
        "ROADWORK_INBOX": str(inbox),
        "ROADWORK_RUN_CONFIG": str(TINY_CONFIG),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ROADWORK_DROP_SENSOR_INTERVAL": "5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.get()
    assert isinstance(instance.run_storage, PostgresRunStorage), type(instance.run_storage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)

    make_demo_drop(inbox, "v0001", n=120, seed=7, n_unlabelled=8)
    make_demo_drop(inbox, "v0002", n=48, seed=21)
    start = subprocess.run(
        [dagster_bin("dagster"), "sensor", "start", "new_drop_sensor", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert start.returncode == 0, f"dagster sensor start failed:\n{start.stderr[-3000:]}"
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen(
        [dagster_bin("dagster-daemon"), "run", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=os.environ.copy(), stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:

        def runs():
            found = {v: instance.get_runs(dg.RunsFilter(tags={"dagster/partition": v})) for v in VERSIONS}
            return found if all(found.values()) else None

        launched = wait_for(runs, 120, "the sensor tick to launch one run per drop")
        run_ids = {v: launched[v][0].run_id for v in VERSIONS}
        assert sorted(instance.get_dynamic_partitions("dataset_version")) == list(VERSIONS)

        def finished():
            done = {v: instance.get_run_by_id(r) for v, r in run_ids.items()}
            return done if all(run.is_finished for run in done.values()) else None

        done = wait_for(finished, 540, "both sensor-launched runs to finish", interval=2.0)
        for version, run in done.items():
            assert run.status == dg.DagsterRunStatus.SUCCESS, (
                f"run {version} ended {run.status}; daemon log:\n{log.read_text()[-3000:]}"
            )
    finally:
        stop_process(daemon, log)

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
        assert report, f"no evaluation_report for {version}"

    # at the same time
    spans = {v: instance.get_run_stats(r) for v, r in run_ids.items()}
    (a0, a1), (b0, b1) = ((s.start_time, s.end_time) for s in spans.values())
    assert a0 < b1 and b0 < a1, f"the two runs did not overlap, nothing concurrent was tested: {spans}"

    # and the gpu pool (slots in Postgres) let one training step run at a time
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert info.slot_count == 1, f"the gpu pool has {info.slot_count} slots, expected 1"
    assert info.active_slot_count == 0 and info.pending_step_count == 0, "slots were not released"
    training = {"explora_backbone", "classifier"}
    windows = []
    for version, run_id in run_ids.items():
        steps = _step_windows(instance, run_id, training)
        assert set(steps) == training, f"run {version} lacks training step events: {steps}"
        windows += [(f"{version}:{k}", *v) for k, v in steps.items()]
    for (a, a0, a1), (b, b0, b1) in combinations(windows, 2):
        assert a1 <= b0 or b1 <= a0, f"training steps overlapped in a 1-slot gpu pool: {a} and {b}"
