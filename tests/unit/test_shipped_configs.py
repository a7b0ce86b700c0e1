"""Every run config the project ships (configs/*.yaml, tests/configs/*.yaml) is valid for the whole graph:
a misspelt or removed key is found here, not after minutes of a GPU run."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "tests" / "configs").glob("*.yaml")])


@pytest.fixture(scope="module")
def retrain_job():
    from roadwork_assets.definitions import defs

    return defs.resolve_job_def("retrain_job")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_run_config_is_valid_for_the_retrain_job(retrain_job, path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    dg.validate_run_config(retrain_job, config)  # raises DagsterInvalidConfigError naming the key


def test_a_misspelt_key_is_refused(retrain_job) -> None:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["ops"]["explora_backbone"]["config"]["num_workrs"] = 2
    with pytest.raises(dg.DagsterInvalidConfigError, match="num_workrs"):
        dg.validate_run_config(retrain_job, config)
