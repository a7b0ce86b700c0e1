"""MLflow through dagster-mlflow's `mlflow_tracking` resource: one MLflow run per Dagster run.

dagster-mlflow's own `end_mlflow_on_run_finished` hook only closes the MLflow run after the job's
last node, which is unreliable for asset jobs (asset checks, subset selections, the implicit job of
`dagster asset materialize` and of the UI). Runs use the in-process executor, so this resource lives from
the run's first step to its last and is torn down once, at the end: there the MLflow run is ended FINISHED
when no step failed, FAILED when one did (an untracked one too: image_table, a split check). A tracked step
that fails ends it FAILED at once (`end_mlflow_step_failure`), and Dagster skips the steps downstream.
Between steps the MLflow run stays RUNNING: a run whose process is killed mid-way is never left FINISHED
with half its metrics (it used to be ended FINISHED after every tracked step and reopened by the next);
`mlflow_failed_run_closer` sets it FAILED once the Dagster run is marked failed.

The store is opened on a background thread while the first, untracked steps run, and the MLflow run
starts with the first tracked step (`_MlflowWhenNeeded`). A Dagster run none of whose steps logs to MLflow
makes no MLflow run, unless one of its steps failed: then a FAILED MLflow run records it.
"""

import contextlib
import fcntl
import math
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

EXPERIMENT = "roadwork"

# dagster-mlflow's `mlflow_tracking` config, declared here: importing dagster_mlflow imports mlflow
# (1.3 s), and every code server, sensor tick and `dagster sensor start` loads these definitions without
# logging anything. tests/unit/test_import_cost.py checks that the keys match dagster-mlflow's.
CONFIG_SCHEMA = {
    "experiment_name": dg.Field(dg.StringSource, description="MLflow experiment name."),
    "mlflow_tracking_uri": dg.Field(
        dg.Noneable(dg.StringSource),
        default_value=None,
        is_required=False,
        description="MLflow tracking URI.",
    ),
    "parent_run_id": dg.Field(
        dg.Noneable(str),
        default_value=None,
        is_required=False,
        description="Parent MLflow run (nested runs).",
    ),
    "mlflow_run_id": dg.Field(
        dg.Noneable(str), default_value=None, is_required=False, description="MLflow run to log to."
    ),
    "env": dg.Field(dg.Permissive(), description="Environment variables set for MLflow."),
    "env_to_tag": dg.Field(
        dg.Noneable(list),
        default_value=None,
        is_required=False,
        description="Environment variables logged as tags.",
    ),
    "extra_tags": dg.Field(dg.Permissive(), description="Extra tags of the MLflow run."),
}


@contextlib.contextmanager
def _sqlite_init_lock(tracking_uri: str | None) -> Iterator[None]:
    """For a `sqlite:///` store: an exclusive file lock beside the database while the store is opened.

    Opening a fresh SQLite store runs MLflow's schema migrations and creates the experiment; two runs
    starting at once (two partitions, a backfill) would both do it and one fails with
    `table _alembic_tmp_... already exists`. Server stores (Postgres) are migrated once by the operator
    (`mlflow db upgrade`), so nothing is locked for them."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        yield
        return
    lock_path = _sqlite_db_path(tracking_uri).with_name(_sqlite_db_path(tracking_uri).name + ".init-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_db_path(tracking_uri: str) -> Path:
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def _ensure_experiment(tracking_uri: str | None, name: str) -> None:
    """For a `sqlite:///` store, create the experiment with its artifacts beside the database
    (`<store folder>/mlartifacts`, i.e. state/mlartifacts). MLflow's default for such a store is
    `./mlruns` of the current directory: artifacts and registered models would land in whatever folder
    the process ran in (the repository, for `make demo`), outside the state that `make clean-state`
    removes. An existing experiment keeps its location; server stores choose their own."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return
    from roadwork_resources.mlflow_store import seed_store

    seed_store(_sqlite_db_path(tracking_uri))  # a fresh store: the migrated template `make` built

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(name) is None:
        location = (_sqlite_db_path(tracking_uri).parent / "mlartifacts").resolve()
        client.create_experiment(name, artifact_location=location.as_uri())


class _MlflowWhenNeeded:
    """dagster-mlflow's `MlFlow` handle, built when a step first uses it.

    Opening a fresh SQLite store runs MLflow's ~50 schema migrations (2.4-3.7 s measured here; a copy of
    the template `make` built, when there is one: `roadwork_resources.mlflow_store`), and the
    graph's first steps (image_table, splits, their checks) log nothing to MLflow. So the resource opens
    the store (under `_sqlite_init_lock`) on a background thread at run start, and the first tracked
    step waits for it and then starts or finds the MLflow run, as dagster-mlflow does at resource init.
    Attributes read or set on this object go to the `MlFlow` handle."""

    def __init__(self, context: dg.InitResourceContext):
        # The thread imports mlflow, and with it sqlalchemy.orm, whose first modules register an
        # inspector for every object in SQLAlchemy's global registry before sqlalchemy.orm.exc is done.
        # Dagster's storage on this thread coerces values through that registry (an empty IN list in
        # get_asset_records), and meeting the half-imported module failed a step with "partially
        # initialized module 'sqlalchemy.orm.exc'" (seen once in a two-run concurrency test). Imported
        # here, on the run's own thread, first (~0.2 s).
        import sqlalchemy.orm  # noqa: F401

        object.__setattr__(self, "_context", context)
        object.__setattr__(self, "_handle", None)
        object.__setattr__(self, "_error", None)
        thread = threading.Thread(target=self._open_store, name="roadwork-mlflow-store", daemon=True)
        object.__setattr__(self, "_thread", thread)
        thread.start()

    def _open_store(self) -> None:
        config = self._context.resource_config
        uri = config.get("mlflow_tracking_uri")
        try:
            with _sqlite_init_lock(uri):
                _ensure_experiment(uri, config["experiment_name"])
        except BaseException as exc:  # raised where the handle is first needed
            object.__setattr__(self, "_error", exc)

    @property
    def opened(self) -> bool:
        return self._handle is not None

    def wait_for_store(self) -> BaseException | None:
        """Block until the background opening of the store has ended; its error, if any."""
        self._thread.join()
        return self._error

    def handle(self):
        """The `MlFlow` handle (its MLflow run active in this process), built on first use."""
        if self._handle is None:
            from dagster_mlflow.resources import MlFlow

            error = self.wait_for_store()
            if error is not None:
                uri = self._context.resource_config.get("mlflow_tracking_uri")
                raise RuntimeError(
                    f"could not open the MLflow store {_redacted(uri)}: {type(error).__name__}: {error}. "
                    "Check MLFLOW_TRACKING_URI (a sqlite:/// path in a writable folder, or a reachable server)"
                ) from error
            object.__setattr__(self, "_handle", MlFlow(self._context))
        return self._handle

    def __getattr__(self, name: str):
        return getattr(self.handle(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.handle(), name, value)


def _redacted(uri: str | None) -> str:
    """The URI without credentials (user:password@ of a server store)."""
    if not uri:
        return "(MLflow's default)"
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else uri


@dg.resource(
    config_schema=CONFIG_SCHEMA,
    description="dagster-mlflow's mlflow_tracking: one MLflow run per Dagster run, opened when a step first logs.",
)
def _mlflow_tracking(context: dg.InitResourceContext):
    """dagster-mlflow's `mlflow_tracking`, its store opened on a background thread (`_MlflowWhenNeeded`)."""
    # A run left active in this process by an earlier Dagster run (same interpreter: tests, a
    # notebook, `dg.materialize` twice) may live in another store; dagster-mlflow would adopt it. Only a
    # process that has imported mlflow can hold one: a fresh run worker imports it (1.6 s) on the
    # background thread instead, beside the first steps.
    if "mlflow" in sys.modules:
        mlflow = sys.modules["mlflow"]
        while mlflow.active_run() is not None:
            mlflow.end_run()
    mlf = _MlflowWhenNeeded(context)
    try:
        yield mlf
    finally:
        # never leave the interpreter with the migrations half done
        error = mlf.wait_for_store()
        if mlf.opened:
            mlf.cleanup_on_error()
        if error is None and not _fail_if_a_step_failed(context, mlf):
            _finish(mlf)
        else:
            context.log.warning(f"MLflow store not opened ({type(error).__name__}: {error}); nothing logged")


def _finish(mlf) -> None:
    """The run's MLflow run, still active in this process after its last step, ends FINISHED."""
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None and mlf.opened else None
    if active is not None and active.info.run_id == _run_id(mlf):
        mlflow.end_run(status="FINISHED")


def _fail_if_a_step_failed(context: dg.InitResourceContext, mlf) -> bool:
    """At the end of the Dagster run: if any of its steps failed, its MLflow run ends FAILED.

    The failure hooks cover the tracked assets only; a run that fails in an untracked step (a drop
    whose images are all rejected fails `image_table`, its first) would otherwise leave the MLflow run
    that the resource started as FINISHED (MLflow ends a still-active run FINISHED at exit)."""
    import mlflow

    instance, run_id = context.instance, context.run_id
    if instance is None or run_id is None:
        return False
    failed = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=1).records
    if not failed:
        return False  # a run whose steps never used MLflow has no MLflow run
    mlflow_run_id = _run_id(mlf)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == mlflow_run_id:
        mlflow.end_run(status="FAILED")
    elif mlflow_run_id is not None:
        client = mlflow.MlflowClient()
        if client.get_run(mlflow_run_id).info.status != "FAILED":
            client.set_terminated(mlflow_run_id, status="FAILED")
    return True


def mlflow_resource(tracking_uri: str | None, experiment: str = EXPERIMENT) -> dg.ResourceDefinition:
    """The resource; with `tracking_uri=None` the URI is read from MLFLOW_TRACKING_URI at run time,
    so credentials never appear in config, manifests or logs.

    A run config may set any of dagster-mlflow's keys (`resources.mlflow.config`, checked against its schema);
    `experiment_name` and `mlflow_tracking_uri` left out keep these values (a partial override does not
    fall back to MLflow's ./mlruns)."""
    uri: Any = {"env": "MLFLOW_TRACKING_URI"} if tracking_uri is None else tracking_uri
    schema = dict(CONFIG_SCHEMA)
    schema["experiment_name"] = dg.Field(
        dg.StringSource, default_value=experiment, is_required=False, description="MLflow experiment name."
    )
    schema["mlflow_tracking_uri"] = dg.Field(
        dg.Noneable(dg.StringSource),
        default_value=None,
        is_required=False,
        description="MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else the state folder's SQLite store.",
    )

    def with_defaults(config: dict) -> dict:
        return {**config, "mlflow_tracking_uri": config.get("mlflow_tracking_uri") or uri}

    return _mlflow_tracking.configured(with_defaults, config_schema=schema)


def _run_id(mlf) -> str | None:
    """The MLflow run of this Dagster run: the one dagster-mlflow started or found by its
    `dagster_run_id` tag (dagster-mlflow leaves `mlflow_run_id` unset when it starts a new run)."""
    import mlflow

    if mlf.mlflow_run_id:
        return mlf.mlflow_run_id
    active = mlflow.active_run()
    if active is not None and active.data.tags.get("dagster_run_id") == mlf.dagster_run_id:
        mlf.mlflow_run_id = active.info.run_id
        return mlf.mlflow_run_id
    runs = mlflow.search_runs(
        experiment_ids=[mlf.experiment.experiment_id],
        filter_string=f"tags.dagster_run_id = '{mlf.dagster_run_id}'",
        output_format="list",
    )
    if runs:
        mlf.mlflow_run_id = runs[0].info.run_id
    return mlf.mlflow_run_id


def _active(mlf) -> Any:
    """The dagster-mlflow handle with its MLflow run active in this process (reopened if a previous
    step of the same Dagster run ended it)."""
    import mlflow

    run_id = _run_id(mlf)
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        if active is not None:
            mlflow.end_run()
        mlflow.start_run(run_id=run_id)
        if run_id is None:
            mlflow.set_tag("dagster_run_id", mlf.dagster_run_id)
            mlf.mlflow_run_id = mlflow.active_run().info.run_id
    return mlf


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


def log_params(mlf, params: Mapping[str, Any]) -> None:
    """Log (nested) params once per Dagster run; a retried step logging the same keys is fine."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _active(mlf)
    flat: dict[str, str] = {}
    _flatten("", params, flat)
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    new = {k: v for k, v in flat.items() if k not in existing}
    try:
        for chunk_start in range(0, len(new), 100):
            mlflow.log_params(dict(list(new.items())[chunk_start : chunk_start + 100]))
    except MlflowException as exc:  # a conflicting value from an earlier attempt of this run
        mlf.log.warning(f"MLflow params not logged: {exc}")


def log_metrics(mlf, metrics: Mapping[str, Any], step: int | None = None) -> None:
    import mlflow

    _active(mlf)
    numeric = {
        k.replace("/", "_"): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if numeric:
        mlflow.log_metrics(numeric, step=int(step) if step is not None else None)


def log_artifact_path(mlf, path: str, artifact_path: str | None = None) -> None:
    import mlflow

    _active(mlf)
    if __import__("os").path.isdir(path):
        mlflow.log_artifacts(path, artifact_path=artifact_path)
    else:
        mlflow.log_artifact(path, artifact_path=artifact_path)


@dg.failure_hook(required_resource_keys={"mlflow"})
def end_mlflow_step_failure(context: dg.HookContext) -> None:
    import mlflow

    _active(context.resources.mlflow)
    mlflow.end_run(status="FAILED")


MLFLOW_HOOKS = {end_mlflow_step_failure}

# Type of the `mlflow` parameter of tracked assets (dagster-mlflow's legacy resource, passed as a param).
MlflowParam = dg.ResourceParam[Any]


def bundle_model_signature():
    """The served model's schema (shown in the MLflow UI, checked by `mlflow models serve`): one of the columns
    `image_b64` (base64 JPEG / PNG) or `path` in, one row per image out (roadwork_core.bundle.mlflow_pyfunc)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema(
        [ColSpec("string", "image_b64", required=False), ColSpec("string", "path", required=False)]
    )
    outputs = Schema(
        [
            ColSpec("double", "answer"),
            ColSpec("double", "p_roadwork"),
            ColSpec("string", "decision"),
            ColSpec("double", "logit"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


PRODUCTION_ALIAS = "production"


# what the pyfunc model (roadwork_core.bundle.mlflow_pyfunc) imports when it loads and predicts
MODEL_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "pillow",
    "pandas",
    "numpy",
    "scipy",
    "pydantic",
)


def model_requirements() -> list[str]:
    """The pyfunc model's pip requirements, pinned to the versions this process runs (`torch==2.14.1`, the
    local build label such as `+cu130` dropped so that any build of that release satisfies it): `mlflow
    models serve` builds its environment from them, and unpinned names would install whatever is newest
    that day. A pre-release or vendor build (`2.6.0a0+nv25.01`) is on no package index: left unpinned."""
    import re
    from importlib.metadata import version

    pins = []
    for dist in MODEL_DISTRIBUTIONS:
        release = version(dist).split("+")[0]
        pins.append(f"{dist}=={release}" if re.fullmatch(r"\d+(\.\d+)*", release) else dist)
    return pins


def log_bundle_model(
    mlf,
    bundle_dir: str,
    registered_name: str = "roadwork",
    *,
    dataset_version: str | None = None,
    bundle_id: str | None = None,
    production: bool = False,
) -> str:
    """Log the bundle as an MLflow pyfunc model (from code, nothing pickled) and register it as
    `registered_name` once per bundle: a bundle already registered (model-version tag `bundle_id`) is not
    registered again (an evaluation_report-only re-run made v2 a copy of v1). Each version carries the tags
    `dataset_version`, `bundle_id` and `dagster_run_id`. `production`: the bundle is the release of the newest
    dataset version (`roadwork_assets.released`), so the alias `production` moves to it; `mlflow models serve
    -m models:/roadwork@production` then serves what `roadwork serve --latest` does, where `/latest` (the
    highest version number) names whichever version was registered last, an older dataset version's after a
    backfill. Returns the model URI (`models:/<name>/<version>`)."""
    from pathlib import Path

    import mlflow

    import roadwork_core
    from roadwork_core.bundle import mlflow_pyfunc

    _active(mlf)
    client = mlflow.MlflowClient()
    existing = []
    if bundle_id:
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # no such model yet
            existing = client.search_model_versions(
                f"name = '{registered_name}' and tags.bundle_id = '{bundle_id}'"
            )
    if existing:
        version = max(existing, key=lambda v: int(v.version))
    else:
        package_dir = Path(roadwork_core.__file__).parent
        info = mlflow.pyfunc.log_model(
            name="roadwork_model",
            python_model=mlflow_pyfunc.__file__,
            signature=bundle_model_signature(),
            artifacts={"bundle": bundle_dir},
            code_paths=[str(package_dir)],
            registered_model_name=registered_name,
            pip_requirements=model_requirements(),
        )
        version = client.get_model_version(registered_name, str(info.registered_model_version))
        tags = {
            "dataset_version": dataset_version,
            "bundle_id": bundle_id,
            "dagster_run_id": mlf.dagster_run_id,
        }
        for key, value in tags.items():
            if value:
                client.set_model_version_tag(registered_name, version.version, key, str(value))
    if production:
        client.set_registered_model_alias(registered_name, PRODUCTION_ALIAS, version.version)
    return f"models:/{registered_name}/{version.version}"
