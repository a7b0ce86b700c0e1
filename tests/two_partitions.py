"""The suite's one two-partitions-at-once scenario, shared by the Postgres instance test, the concurrency
tests and the secrets test (they read it on one pytest-xdist worker: `xdist_group("two_partition_runs")`).

Two complete drops land in the inbox of an instance on PostgreSQL (deploy/dagster-postgres.yaml against a
throw-away server: tools/pg_local.py). The real dagster-daemon's new_drop_sensor tick adds both partitions
and launches one retrain run per drop, which the queued coordinator runs at the same time: v0001 (120
images + 8 unlabelled) and v0002 (= v0001 + 48 new images) materialize the whole tiny graph in two run
workers against one instance, one state folder (artifacts, feature cache, checkpoints) and one MLflow
store that neither run had before (both reach it through MLFLOW_TRACKING_URI only). The ExPLoRA stage is
off, so both versions train on the same base backbone and may share feature-cache entries.

One scenario instead of two: the concurrent runs on SQLite (two `dg.materialize` processes) and the
daemon's runs on Postgres cost ~70 CPU-seconds each on the 2-core CI machine and asserted the same things
about artifacts, pools and MLflow. The SQLite storage's own concurrency (two instances interleaving
writes on one home) is tests/unit/test_sqlite_storage.py's."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("v0001", "v0002")
# Credential-looking values that only the environment holds; no file, log or metadata may show them.
SECRET_TOKEN = "tok-9f3c1e7a-SECRET"  # a path component of the MLflow URI (production: user:password@host)
SECRET_PASSWORD = "pw-4be1d2c0-hunter2"  # DAGSTER_PG_PASSWORD (trust auth: the server never checks it)
RUN_TIMEOUT = 540  # both runs, from the sensor's launch to finished, on a loaded 2-core machine


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session; each scenario creates its own database on it."""
    from tools import pg_local

    data_dir = pg_local.scratch_dir("roadwork-pg-")  # a TMPDIR under a private folder: /tmp instead
    server = pg_local.start(data_dir / "data")
    try:
        yield server
    finally:
        pg_local.stop(server.data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def pg_database(server, name: str, password: str) -> dict[str, str]:
    """A new empty database on `server`; returns the DAGSTER_PG_* environment that points at it."""
    import psycopg2

    conn = psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname=server.db)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return {**server.env(password=password), "DAGSTER_PG_DB": name}


@pytest.fixture(scope="session")
def two_partition_runs(tmp_path_factory: pytest.TempPathFactory, pg_server) -> dict:
    """Runs the scenario once; returns {instance (the Postgres instance), results {version: {run_id,
    success}}, outputs {version: the daemon's log, which holds its run workers' output}, seconds, state,
    inbox, home, mlflow_uri, secrets {value: what it stands for}}."""
    import dagster as dg

    from roadwork_core.data.synthetic import make_demo_drop
    from tests.e2e.conftest import UNSET_FOR_TESTS, dagster_bin, stop_process, tiny_run_config, wait_for

    root = tmp_path_factory.mktemp("concurrent")
    inbox, state, home = root / "inbox", root / "state", root / "dagster_home"
    make_demo_drop(inbox, "v0001", n=120, seed=7, n_unlabelled=8)
    make_demo_drop(inbox, "v0002", n=48, seed=21)
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    (state / SECRET_TOKEN).mkdir(parents=True)
    uri = f"sqlite:///{state / SECRET_TOKEN / 'mlflow.db'}"
    config = tiny_run_config()
    # the base backbone for both partitions: their feature-cache entries are then shareable
    config["ops"]["explora_backbone"]["config"]["enabled"] = False
    run_config = root / "run_config.yaml"
    run_config.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if key not in UNSET_FOR_TESTS}
    env.update(
        pg_database(pg_server, "roadwork_graph", password=SECRET_PASSWORD),
        DAGSTER_HOME=str(home),
        ROADWORK_STATE=str(state),
        ROADWORK_INBOX=str(inbox),
        ROADWORK_RUN_CONFIG=str(run_config),
        MLFLOW_TRACKING_URI=uri,
        ROADWORK_API_TOKEN=SECRET_PASSWORD,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        ROADWORK_DROP_SENSOR_INTERVAL="5",
        ROADWORK_SLOT_REAPER_INTERVAL="3",
    )
    with pytest.MonkeyPatch.context() as mp:  # the instance reads its storage settings from the environment
        mp.setenv("DAGSTER_HOME", str(home))
        for key in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):  # fmt: skip
            mp.setenv(key, env[key])
        instance = dg.DagsterInstance.get()

    start = subprocess.run(
        [dagster_bin("dagster"), "sensor", "start", "new_drop_sensor", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert start.returncode == 0, f"dagster sensor start failed:\n{start.stderr[-3000:]}"
    log = root / "daemon.log"
    t0 = time.monotonic()
    daemon = subprocess.Popen(
        [dagster_bin("dagster-daemon"), "run", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:

        def launched():
            found = {v: instance.get_runs(dg.RunsFilter(tags={"dagster/partition": v})) for v in VERSIONS}
            return found if all(found.values()) else None

        run_ids = {v: runs[0].run_id for v, runs in wait_for(launched, 120, "one run per drop").items()}

        def finished():
            done = {v: instance.get_run_by_id(r) for v, r in run_ids.items()}
            return done if all(run.is_finished for run in done.values()) else None

        done = wait_for(finished, RUN_TIMEOUT, "both sensor-launched runs to finish", interval=2.0)
    finally:
        stop_process(daemon, log)
    output = log.read_text(errors="replace")
    return {
        "instance": instance,
        "results": {
            v: {"run_id": run.run_id, "success": run.status == dg.DagsterRunStatus.SUCCESS}
            for v, run in done.items()
        },
        "outputs": dict.fromkeys(VERSIONS, output),
        "seconds": time.monotonic() - t0,
        "state": state,
        "inbox": inbox,
        "home": home,
        "mlflow_uri": uri,
        "secrets": {SECRET_TOKEN: "the MLflow tracking URI", SECRET_PASSWORD: "a credential env var"},
    }
