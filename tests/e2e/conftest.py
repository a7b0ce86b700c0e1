"""End-to-end fixtures: a temporary Dagster home, state, inbox and MLflow store, passed to real
`dagster` / `dagster-webserver` / `dagster-daemon` processes through their environment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import seed_mlflow_store

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"

# Runs launched without a daemon (the webserver test) need a coordinator that launches at once.
DEFAULT_COORDINATOR_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""


# Upper bounds (seconds) for the slow things the e2e tests wait on: a failure bound for a hang, not a
# speed target. `make test` runs two pytest workers on two cores, so a tiny whole-graph run can share
# the CPU with another test's run; these hold under that load with a wide margin.
RUN_TIMEOUT = 480  # one tiny whole-graph run, from launch to finished
SERVER_TIMEOUT = 240  # dagster-webserver / roadwork serve answering, a daemon's first tick


def dagster_bin(name: str) -> str:
    """A console script of the running interpreter's environment (dagster, dagster-webserver, ...)."""
    return str(Path(sys.executable).with_name(name))


def tiny_run_config() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 1.0):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_process(proc: subprocess.Popen, log: Path | None = None) -> str:
    """Stop a server started with start_new_session=True (its whole process group); return its log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return log.read_text(errors="replace")[-4000:] if log and log.exists() else ""


@pytest.fixture(scope="session")
def tiny_drop_source(tmp_path_factory) -> Path:
    """A complete synthetic drop `v0001` of 120 images (+8 unlabelled), built once; copy it to use it."""
    from roadwork_core.data.synthetic import make_demo_drop

    return make_demo_drop(tmp_path_factory.mktemp("drops"), "v0001", n=120, seed=7, n_unlabelled=8, scale=0.5)


def e2e_environment(root: Path, mlflow_template: Path | None = None) -> dict[str, str]:
    """Create `root`/dagster_home (the repo's dagster.yaml), state and inbox; return the environment
    (DAGSTER_HOME, ROADWORK_STATE, ROADWORK_INBOX, MLflow store, offline, one thread, new_drop_sensor
    every 5 s, dead_run_slot_reaper every 3 s) that points there. With `mlflow_template`, the MLflow store starts as a copy of it."""
    home, state, inbox = root / "dagster_home", root / "state", root / "inbox"
    for folder in (home, state, inbox):
        folder.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    if mlflow_template is not None:
        seed_mlflow_store(mlflow_template, state)
    return {
        "DAGSTER_HOME": str(home),
        "ROADWORK_STATE": str(state),
        "ROADWORK_INBOX": str(inbox),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ROADWORK_DROP_SENSOR_INTERVAL": "5",
        "ROADWORK_SLOT_REAPER_INTERVAL": "3",
    }


# Settings of the developer's shell that would change what a test's runs do.
UNSET_FOR_TESTS = ("ROADWORK_RUN_CONFIG", "ROADWORK_MONITOR_DIR", "ROADWORK_FORCE_RETRAIN")


@pytest.fixture
def e2e_home(tmp_path, monkeypatch, mlflow_store_template) -> Iterator[dict]:
    """Fresh DAGSTER_HOME (the repo's dagster.yaml), ROADWORK_STATE, ROADWORK_INBOX and an empty MLflow
    store, set in this process's environment so that subprocesses started with os.environ inherit them."""
    for key, value in e2e_environment(tmp_path, mlflow_store_template).items():
        monkeypatch.setenv(key, value)
    for key in UNSET_FOR_TESTS:
        monkeypatch.delenv(key, raising=False)
    home, state, inbox = tmp_path / "dagster_home", tmp_path / "state", tmp_path / "inbox"
    yield {"home": home, "state": state, "inbox": inbox, "tmp": tmp_path}


def mlflow_statuses(state: Path, dagster_run_id: str) -> list[str]:
    """Statuses of the MLflow runs tagged with this Dagster run (in the e2e home's SQLite store)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("roadwork")
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.dagster_run_id = '{dagster_run_id}'"
    )
    return [r.info.status for r in runs]


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory, tiny_drop_source, mlflow_store_template) -> Iterator[dict]:
    """One `dagster-webserver` (a home of its own, the DefaultRunCoordinator: runs launch at once, no
    daemon) and one tiny whole-graph run launched through it by GraphQL and finished SUCCESS, shared by
    the GraphQL test (test_webserver.py) and the browser test (test_browser.py): a second server and a
    second successful run would add about a minute of both cores and test nothing new.

    Returns {port, base, instance, state, home, log, run_id, client}; tests may launch further runs."""
    import dagster as dg
    from dagster_graphql import DagsterGraphQLClient

    root = tmp_path_factory.mktemp("ui")
    env = {k: v for k, v in os.environ.items() if k not in UNSET_FOR_TESTS}
    env.update(e2e_environment(root, mlflow_store_template))
    home, state, inbox = root / "dagster_home", root / "state", root / "inbox"
    (home / "dagster.yaml").write_text(DEFAULT_COORDINATOR_YAML)
    shutil.copytree(tiny_drop_source, inbox / "v0001")
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("dataset_version", ["v0001"])

    port = free_port()
    log = root / "webserver.log"
    server = subprocess.Popen(
        [dagster_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: server_up(port) or server.poll() is not None,
            SERVER_TIMEOUT,
            f"/server_info on port {port}",
        )
        assert server.poll() is None, f"dagster-webserver exited:\n{log.read_text()[-3000:]}"
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        # The whole job: the client's asset_selection sends no asset-check selection, so a subset
        # run plans the split checks but skips them (measured: status SKIPPED).
        run_id = client.submit_job_execution(
            "retrain_job", run_config=tiny_run_config(), tags={"dagster/partition": "v0001"}
        )
        status = wait_for_run(client, run_id)
        assert status == dg.DagsterRunStatus.SUCCESS, (
            f"run {run_id} ended {status}:\n{log.read_text()[-3000:]}"
        )
        yield {
            "port": port,
            "base": f"http://127.0.0.1:{port}",
            "instance": instance,
            "state": state,
            "home": home,
            "log": log,
            "run_id": run_id,
            "client": client,
        }
    finally:
        stop_process(server, log)


def server_up(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for_run(client, run_id: str):
    """Poll a run's status through GraphQL until it is SUCCESS, FAILURE or CANCELED; return it."""
    import dagster as dg

    done = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    return wait_for(
        lambda: (s := client.get_run_status(run_id)) in done and s, RUN_TIMEOUT, f"run {run_id} to finish"
    )
