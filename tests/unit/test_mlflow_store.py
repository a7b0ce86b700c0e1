"""The migrated empty MLflow store that `make` builds once per environment and fresh states copy."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from roadwork_resources.mlflow_store import make_template, seed_store, template_path
from roadwork_resources.mlflow_tracking import _ensure_experiment


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_template(tmp_path_factory.mktemp("template") / "store.db")


def _experiments(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name, artifact_location FROM experiments").fetchall()
    return dict(rows)


def test_template_is_named_by_the_mlflow_version_of_this_environment() -> None:
    from importlib.metadata import version

    path = template_path()
    assert path.name == f"mlflow-store-{version('mlflow')}.db"
    assert path.is_relative_to(Path(__import__("sys").prefix))


def test_a_seeded_store_opens_without_migrating_and_keeps_its_artifacts_beside_it(
    template, tmp_path, caplog
) -> None:
    import mlflow

    db = tmp_path / "state" / "mlflow.db"
    assert seed_store(db, template)
    # the Default experiment's artifacts beside the store, not in the template's or this process's folder
    assert _experiments(db) == {"Default": (tmp_path / "state" / "mlartifacts" / "0").resolve().as_uri()}
    with caplog.at_level(logging.INFO, logger="mlflow"):
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
        experiment_id = client.create_experiment("roadwork", artifact_location=(tmp_path / "a").as_uri())
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "mcc", 0.5)
        client.set_terminated(run.info.run_id)
    assert not [r for r in caplog.records if "Creating initial MLflow database tables" in r.getMessage()]
    assert client.get_run(run.info.run_id).data.metrics == {"mcc": 0.5}
    # the template itself is untouched: still only the Default experiment, at its own location
    assert list(_experiments(template)) == ["Default"]


def test_an_existing_store_is_never_replaced(template, tmp_path) -> None:
    db = tmp_path / "mlflow.db"
    assert seed_store(db, template)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE experiments SET name = 'kept' WHERE experiment_id = 0")
    assert not seed_store(db, template)
    assert list(_experiments(db)) == ["kept"]


def test_without_a_template_mlflow_creates_the_store_itself(tmp_path) -> None:
    db = tmp_path / "mlflow.db"
    assert not seed_store(db, tmp_path / "no-such-template.db")
    assert not db.exists()
    _ensure_experiment(f"sqlite:///{db}", "roadwork")
    assert _experiments(db)["roadwork"] == (tmp_path / "mlartifacts").resolve().as_uri()


def test_the_resource_seeds_a_fresh_store_from_the_template(template, tmp_path, monkeypatch) -> None:
    import roadwork_resources.mlflow_store as store

    monkeypatch.setattr(store, "template_path", lambda: template)
    db = tmp_path / "state" / "mlflow.db"
    _ensure_experiment(f"sqlite:///{db}", "roadwork")
    assert _experiments(db) == {
        "Default": (tmp_path / "state" / "mlartifacts" / "0").resolve().as_uri(),
        "roadwork": (tmp_path / "state" / "mlartifacts").resolve().as_uri(),
    }
