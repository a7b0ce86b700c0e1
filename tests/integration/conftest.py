"""Fixtures for materializing the real graph on a temporary Dagster instance."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.conftest import seed_mlflow_store

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


def tiny_run_config() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text())


@pytest.fixture(scope="session")
def tiny_inbox(tmp_path_factory) -> Path:
    """An inbox with one complete synthetic drop `v0001` of 120 images (+8 unlabelled)."""
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path_factory.mktemp("inbox")
    make_demo_drop(inbox, "v0001", n=120, seed=7, n_unlabelled=8, scale=0.5)
    return inbox


@pytest.fixture
def rw_home(tmp_path, monkeypatch, mlflow_store_template) -> dict:
    """A fresh state folder, DAGSTER_HOME (with the repo's dagster.yaml) and an empty MLflow store."""
    state = tmp_path / "state"
    seed_mlflow_store(mlflow_store_template, state)
    home = tmp_path / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ROADWORK_STATE", str(state))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return {"state": state, "home": home, "mlflow_uri": f"sqlite:///{state / 'mlflow.db'}"}


def materialize(selection, *, instance, partition: str, resources: dict, run_config: dict | None = None):
    """dg.materialize over the real assets and checks (selection: a Dagster selection string or list)."""
    from roadwork_assets.definitions import ASSET_CHECKS, ASSETS

    return dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        selection=selection,
        instance=instance,
        partition_key=partition,
        resources=resources,
        run_config=run_config or {},
        raise_on_error=False,
    )
