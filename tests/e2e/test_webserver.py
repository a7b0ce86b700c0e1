"""Way in #1: the UI's server. dagster-webserver on a free 127.0.0.1 port (the `ui_server` fixture,
shared with the browser test) has launched a materialization through GraphQL (dagster-graphql's
client) and seen it SUCCEED; this reads the asset checks' results back through GraphQL, checks the
MLflow run, and launches a run that fails."""

from __future__ import annotations

import json
import urllib.request

import dagster as dg
import pytest

from tests.e2e.conftest import mlflow_statuses, tiny_run_config, wait_for_run

# the two tests share the `ui_server` fixture (one webserver, one run): kept together on one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ui_server")]

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


def test_webserver_launches_a_materialization_and_reports_checks(ui_server):
    port, run_id, client = ui_server["port"], ui_server["run_id"], ui_server["client"]
    assert client.get_run_status(run_id) == dg.DagsterRunStatus.SUCCESS
    for name in SPLIT_CHECKS:
        data = _graphql(port, CHECK_EXECUTIONS, {"assetKey": {"path": ["splits"]}, "checkName": name})
        executions = [e for e in data["assetCheckExecutions"] if e["runId"] == run_id]
        assert executions, f"no execution of {name} in run {run_id}: {data}"
        assert executions[0]["status"] == "SUCCEEDED", f"{name}: {executions[0]}"
        assert executions[0]["partition"] in ("v0001", None), f"{name}: {executions[0]}"
        assert executions[0]["evaluation"]["success"] is True, f"{name}: {executions[0]}"
    data = _graphql(
        port, CHECK_EXECUTIONS, {"assetKey": {"path": ["bundle"]}, "checkName": "check_bundle_one_policy"}
    )
    executions = [e for e in data["assetCheckExecutions"] if e["runId"] == run_id]
    assert executions and executions[0]["status"] == "SUCCEEDED", data
    assert mlflow_statuses(ui_server["state"], run_id) == ["FINISHED"], "MLflow run of a UI-launched success"

    # a misspelt choice is refused when the run is submitted, before anything starts
    from dagster_graphql import DagsterGraphQLClientError

    typo = tiny_run_config()
    typo["ops"]["classifier"]["config"]["mode"] = "not_a_mode"
    with pytest.raises(DagsterGraphQLClientError, match="not in enum type"):
        client.submit_job_execution("retrain_job", run_config=typo, tags={"dagster/partition": "v0001"})

    # a UI-launched run that fails in a step (adapters on modules the backbone lacks, refused by the
    # classifier): its MLflow run ends FAILED
    bad = tiny_run_config()
    bad["ops"]["classifier"]["config"].update(mode="lora", lora_target_regex=r"no_such_module")
    failing = client.submit_job_execution("retrain_job", run_config=bad, tags={"dagster/partition": "v0001"})
    status = wait_for_run(client, failing)
    assert status == dg.DagsterRunStatus.FAILURE, f"the invalid run ended {status}"
    assert mlflow_statuses(ui_server["state"], failing) == ["FAILED"], "MLflow run of a UI-launched failure"
