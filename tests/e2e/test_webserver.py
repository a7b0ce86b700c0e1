"""Way in #1: the UI's server. Start dagster-webserver on a free 127.0.0.1 port, launch a
materialization through GraphQL (dagster-graphql's client), poll it to SUCCESS, then read the asset
checks' results back through GraphQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from tests.e2e.conftest import (
    DEFAULT_COORDINATOR_YAML,
    REPO,
    RUN_TIMEOUT,
    SERVER_TIMEOUT,
    dagster_bin,
    free_port,
    mlflow_statuses,
    stop_process,
    tiny_run_config,
    wait_for,
)

pytestmark = pytest.mark.slow

SPLIT_CHECKS = (
    "check_no_shared_images",
    "check_no_near_duplicates_across_splits",
    "check_label_balance",
    "check_min_per_class",
    "check_sticky_splits",
)

CHECK_EXECUTIONS = """
query ($assetKey: AssetKeyInput!, $checkName: String!) {
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, limit: 5) {
    runId
    partition
    status
    evaluation { success }
  }
}
"""


def _graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert "errors" not in body, f"GraphQL errors: {body['errors']}"
    return body["data"]


def _server_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_webserver_launches_a_materialization_and_reports_checks(e2e_home, tiny_drop_source):
    # No daemon here: runs must launch at once, so this home uses the DefaultRunCoordinator.
    (e2e_home["home"] / "dagster.yaml").write_text(DEFAULT_COORDINATOR_YAML)
    shutil.copytree(tiny_drop_source, e2e_home["inbox"] / "v0001")
    dg.DagsterInstance.get().add_dynamic_partitions("dataset_version", ["v0001"])

    port = free_port()
    log = e2e_home["tmp"] / "webserver.log"
    server = subprocess.Popen(
        [dagster_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=os.environ.copy(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: _server_up(port) or server.poll() is not None,
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
        status = wait_for(
            lambda: (s := client.get_run_status(run_id)) in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                                            dg.DagsterRunStatus.CANCELED) and s,
            RUN_TIMEOUT, f"run {run_id} to finish",
        )  # fmt: skip
        assert status == dg.DagsterRunStatus.SUCCESS, (
            f"run {run_id} ended {status}:\n{log.read_text()[-3000:]}"
        )

        for name in SPLIT_CHECKS:
            data = _graphql(
                port,
                CHECK_EXECUTIONS,
                {"assetKey": {"path": ["splits"]}, "checkName": name},
            )
            executions = [e for e in data["assetCheckExecutions"] if e["runId"] == run_id]
            assert executions, f"no execution of {name} in run {run_id}: {data}"
            assert executions[0]["status"] == "SUCCEEDED", f"{name}: {executions[0]}"
            assert executions[0]["partition"] in ("v0001", None), f"{name}: {executions[0]}"
            assert executions[0]["evaluation"]["success"] is True, f"{name}: {executions[0]}"
        data = _graphql(
            port,
            CHECK_EXECUTIONS,
            {"assetKey": {"path": ["bundle"]}, "checkName": "check_bundle_one_policy"},
        )
        assert data["assetCheckExecutions"][0]["status"] == "SUCCEEDED", data
        assert mlflow_statuses(e2e_home["state"], run_id) == ["FINISHED"], (
            "MLflow run of a UI-launched success"
        )

        # a UI-launched run that fails (an invalid classifier mode): its MLflow run ends FAILED
        bad = tiny_run_config()
        bad["ops"]["classifier"]["config"]["mode"] = "not_a_mode"
        failing = client.submit_job_execution(
            "retrain_job", run_config=bad, tags={"dagster/partition": "v0001"}
        )
        status = wait_for(
            lambda: (s := client.get_run_status(failing)) in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                                             dg.DagsterRunStatus.CANCELED) and s,
            RUN_TIMEOUT, f"run {failing} to finish",
        )  # fmt: skip
        assert status == dg.DagsterRunStatus.FAILURE, f"the invalid run ended {status}"
        assert mlflow_statuses(e2e_home["state"], failing) == ["FAILED"], (
            "MLflow run of a UI-launched failure"
        )
    finally:
        stop_process(server, log)
