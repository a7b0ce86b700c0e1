"""Way in #2: `dagster asset materialize` in a subprocess against a temporary instance."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from tests.e2e.conftest import REPO, RUN_TIMEOUT, TINY_CONFIG, dagster_bin

pytestmark = pytest.mark.slow


def test_cli_materializes_the_whole_graph(e2e_home, tiny_drop_source):
    # The first-use path: the run itself creates (and migrates) the MLflow store, as in a new checkout.
    (e2e_home["state"] / "mlflow.db").unlink()
    shutil.copytree(tiny_drop_source, e2e_home["inbox"] / "v0001")
    instance = dg.DagsterInstance.get()  # DAGSTER_HOME is the temporary home
    instance.add_dynamic_partitions("dataset_version", ["v0001"])

    cmd = [
        dagster_bin("dagster"), "asset", "materialize", "-m", "roadwork_assets.definitions",
        "--select", "*", "--partition", "v0001", "-c", str(TINY_CONFIG),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert proc.returncode == 0, (
        f"dagster asset materialize failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )

    def materialization(asset: str) -> dg.AssetMaterialization:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["v0001"]), limit=1
        ).records
        assert records, f"{asset} was not materialized for v0001 by the CLI run"
        return records[0].asset_materialization

    bundle_dir = Path(materialization("bundle").metadata["path"].value) / "dir"
    for name in ("manifest.json", "model.safetensors", "policy.json", "calibrator.json", "config.json"):
        assert (bundle_dir / name).is_file(), f"bundle file {name} missing under {bundle_dir}"
    report = materialization("evaluation_report")
    assert report.partition == "v0001", f"evaluation_report partition {report.partition}"
    runs = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
    assert len(runs) == 1, f"expected one successful run in the temporary instance, found {len(runs)}"
