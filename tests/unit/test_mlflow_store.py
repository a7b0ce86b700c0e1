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


_RACE_CHILD = """
import sys
import dagster as dg
from roadwork_resources.mlflow_tracking import CONFIG_SCHEMA, _MlflowWhenNeeded

assert "sqlalchemy.orm" not in sys.modules, "the check needs an interpreter without sqlalchemy.orm"
config = {"experiment_name": "roadwork", "mlflow_tracking_uri": sys.argv[1]}
handle = _MlflowWhenNeeded(dg.build_init_resource_context(config=config))
# right after the constructor, before the store thread ends: what this thread can meet in SQLAlchemy's
# global inspection registry must be fully imported
orm = [m for name, m in list(sys.modules.items()) if name.startswith("sqlalchemy.orm")]
half = [m.__name__ for m in orm if getattr(m.__spec__, "_initializing", False)]
exc = sys.modules.get("sqlalchemy.orm.exc")
print("ORM", bool(orm), "HALF", half, "EXC", exc is not None and hasattr(exc, "UnmappedClassError"))
assert handle.wait_for_store() is None
"""


def test_the_store_thread_never_leaves_sqlalchemy_orm_half_imported_for_the_run(tmp_path) -> None:
    """The store's thread imports mlflow (and sqlalchemy.orm). Dagster's storage queries on the run's
    thread go through SQLAlchemy's inspection registry, where sqlalchemy.orm registers itself before it
    has finished importing: a step once failed on "partially initialized module 'sqlalchemy.orm.exc'".
    So sqlalchemy.orm is fully imported on the run's thread before the store thread starts."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = subprocess.run(
        [sys.executable, "-c", _RACE_CHILD, uri], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "ORM True HALF [] EXC True" in child.stdout, child.stdout


def test_the_mlflow_run_stays_running_between_steps_and_ends_finished_with_the_run(
    template, tmp_path
) -> None:
    """The MLflow run was ended FINISHED after every tracked step: a run killed in a later step (the
    evaluation report) was left FINISHED with half its metrics and no model (found by an audit)."""
    import dagster as dg
    import mlflow

    from roadwork_resources.mlflow_tracking import MLFLOW_HOOKS, log_metrics, mlflow_resource

    db = tmp_path / "state" / "mlflow.db"
    seed_store(db, template)
    uri = f"sqlite:///{db}"

    def status_of(run_id: str) -> list[str]:
        runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
            [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("roadwork").experiment_id],
            filter_string=f"tags.dagster_run_id = '{run_id}'",
        )
        return [r.info.status for r in runs]

    # no annotations: this module's are strings (`from __future__ import annotations`), which Dagster reads
    @dg.asset(hooks=MLFLOW_HOOKS, required_resource_keys={"mlflow"})
    def trained(context):
        log_metrics(context.resources.mlflow, {"loss": 0.5})
        return 1

    @dg.asset(hooks=MLFLOW_HOOKS, required_resource_keys={"mlflow"})
    def reported(context, trained):
        return status_of(context.run_id)  # what a process killed here leaves behind

    result = dg.materialize([trained, reported], resources={"mlflow": mlflow_resource(uri)})
    assert result.success
    assert result.output_for_node("reported") == ["RUNNING"], "between steps the MLflow run is not over"
    assert status_of(result.run_id) == ["FINISHED"], "the run's end ends it FINISHED"


def test_the_model_requirements_pin_released_versions_and_leave_vendor_builds_unpinned(monkeypatch):
    """`mlflow models serve` installs the registered model's requirements: a release is pinned (its local
    build label dropped), a pre-release or vendor build that no index holds is left unpinned."""
    import importlib.metadata

    from roadwork_resources.mlflow_tracking import MODEL_DISTRIBUTIONS, model_requirements

    fake = {"torch": "2.6.0a0+ecf3bae40a.nv25.01", "torchvision": "0.29.1+cu130", "timm": "1.0.31"}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: fake.get(d) or real(d))
    pins = model_requirements()
    assert len(pins) == len(MODEL_DISTRIBUTIONS)
    assert "torch" in pins and "torchvision==0.29.1" in pins and "timm==1.0.31" in pins, pins
