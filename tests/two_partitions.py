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

import json
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


def _pg_server_record(root: Path) -> Path:
    return root / "built_once" / "pg_server"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    """One PostgreSQL server for the session, shared by the pytest-xdist workers (`built_once`); each
    scenario creates its own database on it. The session's end stops it (`stop_pg_server`, called from
    the controller's pytest_sessionfinish: a worker that finishes first must not stop it under the other)."""
    from tests.conftest import built_once
    from tools import pg_local

    def build(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)  # what a failed build of another worker left
        path.mkdir(parents=True)
        scratch = pg_local.scratch_dir("roadwork-pg-")  # a TMPDIR under a private folder: /tmp instead
        (path / "scratch").write_text(str(scratch))  # first: the session's end removes it whatever happens
        server = pg_local.start(scratch / "data")
        fields = {"data_dir": str(server.data_dir), "host": server.host, "port": server.port, "user": server.user, "db": server.db}  # fmt: skip
        (path / "server.json").write_text(json.dumps(fields))

    fields = json.loads((built_once(tmp_path_factory, "pg_server", build) / "server.json").read_text())
    return pg_local.PgServer(**{**fields, "data_dir": Path(fields["data_dir"])})


def stop_pg_server(root: Path) -> None:
    """Stop the session's PostgreSQL server (if one was started under the built_once folder of `root`)
    and remove its data."""
    from tools import pg_local

    record = _pg_server_record(root) / "scratch"
    if record.is_file():
        scratch = Path(record.read_text())
        pg_local.stop(scratch / "data")
        shutil.rmtree(scratch, ignore_errors=True)


def pg_database(server, name: str, password: str) -> dict[str, str]:
    """A new empty database on `server`; returns the DAGSTER_PG_* environment that points at it."""
    import psycopg2

    conn = psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname=server.db)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return {**server.env(password=password), "DAGSTER_PG_DB": name}


PG_VARS = (
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USERNAME",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
)


def _run_scenario(root: Path, server) -> None:
    """The scenario, under `root`; writes root/result.json."""
    import dagster as dg

    from roadwork_core.data.synthetic import make_demo_drop
    from tests.e2e.conftest import UNSET_FOR_TESTS, dagster_bin, stop_process, tiny_run_config, wait_for

    shutil.rmtree(root, ignore_errors=True)  # what a failed build of another worker left
    inbox, state, home = root / "inbox", root / "state", root / "dagster_home"
    make_demo_drop(inbox, "v0001", n=120, seed=7, n_unlabelled=8, scale=0.5)
    make_demo_drop(inbox, "v0002", n=48, seed=21, scale=0.5)
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    (state / SECRET_TOKEN).mkdir(parents=True)
    uri = f"sqlite:///{state / SECRET_TOKEN / 'mlflow.db'}"
    config = tiny_run_config()
    # the base backbone for both partitions: their feature-cache entries are then shareable
    config["ops"]["explora_backbone"]["config"]["enabled"] = False
    run_config = root / "run_config.yaml"
    run_config.write_text(yaml.safe_dump(config))
    database = f"roadwork_graph_{os.getpid()}"  # a failed build's database stays; the next one is new
    env = {key: value for key, value in os.environ.items() if key not in UNSET_FOR_TESTS}
    env.update(
        pg_database(server, database, password=SECRET_PASSWORD),
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
    instance = _instance(home, env)
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
    result = {
        "results": {
            v: {"run_id": run.run_id, "success": run.status == dg.DagsterRunStatus.SUCCESS}
            for v, run in done.items()
        },
        "seconds": time.monotonic() - t0,
        "pg_env": {key: env[key] for key in PG_VARS},
        "mlflow_uri": uri,
    }
    (root / "result.json").write_text(json.dumps(result))


def _instance(home: Path, env: dict[str, str]):
    """The scenario's instance (its storage settings come from the environment, read once here)."""
    import dagster as dg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        for key in PG_VARS:
            mp.setenv(key, env[key])
        return dg.DagsterInstance.get()


@pytest.fixture(scope="session")
def two_partition_runs(tmp_path_factory: pytest.TempPathFactory, pg_server) -> dict:
    """The scenario, run once for the session (`built_once`: the pytest-xdist workers share it); returns
    {instance (the Postgres instance), results {version: {run_id, success}}, outputs {version: the
    daemon's log, which holds its run workers' output}, seconds, state, inbox, home, mlflow_uri, secrets
    {value: what it stands for}}."""
    from tests.conftest import built_once

    root = built_once(tmp_path_factory, "two_partition_runs", lambda path: _run_scenario(path, pg_server))
    result = json.loads((root / "result.json").read_text())
    output = (root / "daemon.log").read_text(errors="replace")
    return {
        "instance": _instance(root / "dagster_home", result["pg_env"]),
        "results": result["results"],
        "outputs": dict.fromkeys(VERSIONS, output),
        "seconds": result["seconds"],
        "state": root / "state",
        "inbox": root / "inbox",
        "home": root / "dagster_home",
        "mlflow_uri": result["mlflow_uri"],
        "secrets": {SECRET_TOKEN: "the MLflow tracking URI", SECRET_PASSWORD: "a credential env var"},
    }
