"""The roadwork Definitions: `dagster dev -w workspace.yaml`, `dagster asset materialize -m roadwork_assets.definitions`.

Runs use the in-process executor: importing torch + timm + peft + dagster costs seconds, and the
multiprocess executor would pay it again in every step's process. The `gpu` pool still serializes
training steps across concurrent runs.
"""

import os
from pathlib import Path

import dagster as dg

from roadwork_assets.automation import (
    dead_run_slot_reaper,
    drift_retrain_sensor,
    drift_sensor,
    mlflow_failed_run_closer,
    new_drop_sensor,
    retrain_job,
    weekly_retrain,
)
from roadwork_assets.contract_checks import CONTRACT_CHECKS
from roadwork_assets.data import SPLIT_CHECKS, image_table, splits
from roadwork_assets.monitoring import drift_job
from roadwork_assets.policies import calibrator, gate_policy, scrc_policy, threshold_policy
from roadwork_assets.predictions import calib_predictions, select_predictions, test_predictions
from roadwork_assets.release import (
    bundle,
    check_bundle_one_policy,
    check_bundle_reproduces_predictions,
    check_test_fnr_within_guarantee,
    evaluation_report,
)
from roadwork_assets.training import classifier, explora_backbone
from roadwork_resources.artifact_store import ArtifactStore
from roadwork_resources.dataset import DatasetSource
from roadwork_resources.gpu import GPUResource
from roadwork_resources.io_manager import ArtifactIOManager
from roadwork_resources.mlflow_tracking import mlflow_resource
from roadwork_resources.paths import artifact_root, bind_paths, inbox_root, resolve_env_values, state_root
from roadwork_resources.settings import DriftSettings, RetrainSettings, SplitSettings

ASSETS = [
    image_table,
    splits,
    explora_backbone,
    classifier,
    select_predictions,
    calib_predictions,
    test_predictions,
    calibrator,
    threshold_policy,
    gate_policy,
    scrc_policy,
    bundle,
    evaluation_report,
]

ASSET_CHECKS = [
    *SPLIT_CHECKS,
    *CONTRACT_CHECKS,
    check_bundle_one_policy,
    check_bundle_reproduces_predictions,
    check_test_fnr_within_guarantee,
]


RENAMED_OPS = {"image_manifest": "image_table"}  # the design's name -> this code location's


def unknown_ops(run_config: dict | None) -> list[str]:
    """`ops` keys of a run config that name no asset or check of this code location. The implicit asset job
    behind `dagster asset materialize` and the UI's Materialize accepts them, so a misspelt asset name
    (`clasifier:`) or an old one (`image_manifest:`) meant a run on default settings."""
    known = {d.node_def.name for d in (*ASSETS, *ASSET_CHECKS)} | {n.name for n in drift_job.graph.nodes}
    return sorted(set((run_config or {}).get("ops") or {}) - known)


def _op_config_classes() -> dict[str, type[dg.Config]]:
    """op name -> the Config class its compute function takes as `config` (assets and checks)."""
    import inspect

    classes: dict[str, type[dg.Config]] = {}
    for definition in (*ASSETS, *ASSET_CHECKS):
        fn = getattr(definition.node_def.compute_fn, "decorated_fn", None)
        param = inspect.signature(fn).parameters.get("config") if fn is not None else None
        if param is None:
            continue
        annotation = param.annotation
        if isinstance(annotation, str):  # `from __future__ import annotations`
            annotation = fn.__globals__.get(annotation)
        if isinstance(annotation, type) and issubclass(annotation, dg.Config):
            classes[definition.node_def.name] = annotation
    return classes


def invalid_op_configs(run_config: dict | None) -> list[str]:
    """Each op's config of a run built as its step will build it (pydantic ranges and choices, then the core
    dataclasses' checks, `check_config`): 'ops.<op>.config: <why>' for each one no step could run with. Dagster
    itself checks only names and types before a run; a range (grad_clip <= 0) or a misspelt list entry
    (calibrator methods) would otherwise fail, or silently train wrong, after the steps before it."""
    import pydantic

    from roadwork_assets._config import check_config

    classes = _op_config_classes()
    problems = []
    for op, entry in sorted(((run_config or {}).get("ops") or {}).items()):
        cls = classes.get(op)
        values = entry.get("config") if isinstance(entry, dict) else None
        if cls is None or not isinstance(values, dict):
            continue
        try:
            check_config(cls(**values))
        except pydantic.ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"])
                problems.append(f"ops.{op}.config.{field}: {error['msg']} (got {error.get('input')!r})")
        except (ValueError, TypeError) as exc:
            problems.append(f"ops.{op}.config: {exc}")
    return problems


# The Pythonic resources a run config may configure (`resources.<key>.config`), by their Definitions key.
RESOURCE_CLASSES: dict[str, type[dg.ConfigurableResource]] = {
    "dataset": DatasetSource,
    "store": ArtifactStore,
    "gpu": GPUResource,
    "split_settings": SplitSettings,
    "drift": DriftSettings,
    "retrain": RetrainSettings,
}


def invalid_resource_configs(run_config: dict | None) -> list[str]:
    """Each resource's config of a run built as the run will build it: 'resources.<key>.config.<field>: <why>'
    for a value no run can use (a negative thread count, split ratios that do not sum to 1). Dagster checks
    names and types at submission; these would fail at resource start-up without the path, or in `splits`
    after `image_table` had run."""
    import pydantic

    from roadwork_core.data.splits import validate_ratios

    problems = []
    for key, entry in sorted(((run_config or {}).get("resources") or {}).items()):
        cls = RESOURCE_CLASSES.get(key)
        values = entry.get("config") if isinstance(entry, dict) else None
        if cls is None or not isinstance(values, dict):
            continue
        try:
            resource = cls(**resolve_env_values(values))
            if isinstance(resource, SplitSettings):
                validate_ratios(resource.ratios())
        except pydantic.ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"])
                problems.append(
                    f"resources.{key}.config.{field}: {error['msg']} (got {error.get('input')!r})"
                )
        except ValueError as exc:
            problems.append(f"resources.{key}.config: {exc}")
    return problems


class RoadworkIOManager(ArtifactIOManager):
    """`ArtifactIOManager` that first refuses a run config naming ops this code location lacks: every run
    sets up its IO manager before any step body runs."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import difflib

        run = getattr(context, "dagster_run", None)
        unknown = unknown_ops(run.run_config if run is not None else None)
        if unknown:
            known = sorted({d.node_def.name for d in (*ASSETS, *ASSET_CHECKS)})
            hints = []
            for name in unknown:
                near = (
                    [RENAMED_OPS[name]]
                    if name in RENAMED_OPS
                    else difflib.get_close_matches(name, known, n=1)
                )
                hints.append(f"{name!r} (did you mean {near[0]!r}?)" if near else repr(name))
            raise dg.DagsterInvalidConfigError(
                f"the run config sets ops {', '.join(hints)}, which are no asset or check of this code location, "
                f"so their settings would be ignored and the run would use defaults. Rename them under `ops:`; "
                f"the assets are {', '.join(d.node_def.name for d in ASSETS)}",
                [],
                run.run_config,
            )
        config = run.run_config if run is not None else None
        problems = invalid_op_configs(config) + invalid_resource_configs(config)
        if problems:
            raise dg.DagsterInvalidConfigError(
                "the run config holds values no step can run with; fix them (nothing has run yet):\n  "
                + "\n  ".join(problems),
                [],
                run.run_config,
            )


def build_resources(
    state: Path | None = None, inbox: Path | None = None, mlflow_uri: str | None = None
) -> dict:
    """Resources for the embedded set-up; arguments override the environment (tests use them).

    The MLflow URI may carry credentials: when MLFLOW_TRACKING_URI is set (and no `mlflow_uri` is
    given) it is read from the environment at run time and never written into config, manifests or logs.
    """
    bind_paths(state=state, inbox=inbox, monitor=None)  # what a run config's partial override falls back to
    artifacts = Path(state) / "artifacts" if state else artifact_root()
    state = Path(state) if state else state_root()
    if mlflow_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow_uri = f"sqlite:///{state / 'mlflow.db'}"
    return {
        "io_manager": RoadworkIOManager(root=str(artifacts)),
        "dataset": DatasetSource(inbox=str(inbox or inbox_root())),
        "store": ArtifactStore(root=str(state)),
        "gpu": GPUResource(),
        "split_settings": SplitSettings(),
        "mlflow": mlflow_resource(mlflow_uri),
        "drift": DriftSettings(monitor_dir=os.environ.get("ROADWORK_MONITOR_DIR", str(state / "monitor"))),
        "retrain": RetrainSettings(force_retrain=force_retrain_from_environment()),
    }


def force_retrain_from_environment() -> bool:
    """ROADWORK_FORCE_RETRAIN: 1 / true / yes / on (any case) or 0 / false / no / off / unset; anything else is
    refused by name (`TRUE` and `yes` read as false before, silently)."""
    value = os.environ.get("ROADWORK_FORCE_RETRAIN", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"ROADWORK_FORCE_RETRAIN={value!r}: use 1 / true / yes or 0 / false / no, or unset it")


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ASSET_CHECKS,
    jobs=[retrain_job, drift_job],
    sensors=[
        new_drop_sensor,
        drift_sensor,
        drift_retrain_sensor,
        mlflow_failed_run_closer,
        dead_run_slot_reaper,
    ],
    schedules=[weekly_retrain],
    resources=build_resources(),
    executor=dg.in_process_executor,
)
