"""Release stage: the bundle (exactly one policy) and the evaluation report on val_test."""

import shutil
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from roadwork_assets._util import json_meta, reader_metadata
from roadwork_assets.data import require_green_splits
from roadwork_assets.lineage import materialization_metadata, require_consistent_lineage
from roadwork_assets.partitions import dataset_version
from roadwork_assets.policies import calib_set
from roadwork_assets.released import released_bundles, require_released_bundle
from roadwork_core.contracts import Split, SplitReader
from roadwork_core.metrics.embed import folder_figures, markdown_images
from roadwork_resources.artifact_store import ArtifactStore
from roadwork_resources.gpu import GPUResource
from roadwork_resources.io_manager import new_artifact_dir
from roadwork_resources.mlflow_tracking import (
    MLFLOW_HOOKS,
    MlflowParam,
    log_artifact_path,
    log_bundle_model,
    log_metrics,
)

POLICY_ASSETS = {"threshold": "threshold_policy", "gate": "gate_policy", "scrc": "scrc_policy"}


class BundleConfig(dg.Config):
    release_policy: Literal["threshold", "gate", "scrc", "softmax"] = Field(
        "scrc",
        description="the one policy shipped: threshold | gate | scrc (softmax: the old name of threshold)",
    )


@dg.asset(
    partitions_def=dataset_version,
    group_name="release",
    kinds={"pytorch", "json"},
    hooks=MLFLOW_HOOKS,
    description="The deployable directory: weights, config, calibrator, exactly one policy, manifest with sha256.",
)
def bundle(
    context: dg.AssetExecutionContext,
    mlflow: MlflowParam,
    config: BundleConfig,
    store: ArtifactStore,
    splits: pd.DataFrame,
    classifier: Path,
    calibrator,
    threshold_policy,
    gate_policy,
    scrc_policy,
    calib_predictions: pd.DataFrame,
) -> dg.Output[Path]:
    from roadwork_core.bundle.export import export_bundle
    from roadwork_core.bundle.verify import verify_bundle
    from roadwork_core.calibration.policy import policy_name
    from roadwork_core.subnet.answer import fit_answer_rule

    policies = {"threshold": threshold_policy, "gate": gate_policy, "scrc": scrc_policy}
    release_policy = policy_name(config.release_policy)  # a config written with an old name still runs
    if release_policy not in policies:
        raise ValueError(f"bundle.release_policy={config.release_policy!r}; choose one of {sorted(policies)}")
    policy = policies[release_policy]
    require_green_splits(context)
    lineage = require_consistent_lineage(context, BUNDLE_INPUTS)
    calib = calib_set(SplitReader("bundle", splits), calib_predictions, calibrator)
    summary = calib.summary(policy)
    answer_rule = fit_answer_rule(calib.p, calib.labels, source="val_calib")
    # lineage: the sha256 the IO manager recorded for each upstream artifact this bundle descends from (the
    # materializations its inputs were made from, not the newest: image_table may have run again since)
    upstream = {
        key: materialization_metadata(context.instance, lineage, key).get("sha256")
        for key in (
            "image_table",
            "splits",
            "explora_backbone",
            "classifier",
            "calibrator",
            POLICY_ASSETS[release_policy],
        )
    }
    out = export_bundle(
        new_artifact_dir("bundle"),
        classifier_dir=classifier,
        calibrator=calibrator,
        policy=policy,
        dataset_version=context.partition_key,
        upstream_versions={"dataset_version": context.partition_key, "artifact_sha256": upstream},
        metrics_summary={f"calib_{k}": v for k, v in summary.items()},
        answer_rule=answer_rule,
    )
    log_metrics(mlflow, {f"bundle_calib_{k}": v for k, v in summary.items() if v is not None})
    # what `roadwork serve --latest` and new_drop_sensor read (roadwork_assets.released)
    bundle_id = verify_bundle(out).content_sha256
    kept = _keep_release_copy(context, store, out, bundle_id)
    source = materialization_metadata(context.instance, lineage, "image_table").get("source_fingerprint")
    return dg.Output(
        out,
        metadata={
            "release_policy": release_policy,
            "bundle_id": bundle_id,
            "bundle_path": dg.MetadataValue.path(str(kept)),
            "source_fingerprint": source or "",
            "guarantee": str(getattr(policy, "guarantee", "")),
            "answer_threshold": answer_rule.threshold,
            "answer_expected_reward": answer_rule.expected_reward,
            "answer_expected_reward_at_0.5": answer_rule.expected_reward_at_half,
            **{f"calib_{k}": float("nan") if v is None else float(v) for k, v in summary.items()},
            **reader_metadata(calib.reader),
        },
    )


def _keep_release_copy(
    context: dg.AssetExecutionContext, store: ArtifactStore, out: Path, bundle_id: str
) -> Path:
    """A copy of this bundle (hard links: no extra disk) under `releases/bundle/<version>/<bundle id>/`, which is
    what a release serves from (`roadwork_assets.released`): the IO manager's directory holds the partition's
    latest materialization, replaced by a re-run before its blocking checks run, so a bundle that then fails
    them would otherwise overwrite the release that `serve`, `drift_job` and `predict` use. Copies of this
    version other than this bundle and the version's newest release are removed."""
    from roadwork_core.bundle.verify import verify_bundle
    from roadwork_core.io import linked_copy

    root = store.release_dir("bundle", context.partition_key)
    dest = root / bundle_id
    try:
        same = dest.is_dir() and verify_bundle(dest).content_sha256 == bundle_id
    except Exception:  # noqa: BLE001  a damaged copy is replaced below
        same = False
    if not same:
        linked_copy(out, dest)
    released = released_bundles(context.instance, context.partition_key)
    keep = {bundle_id, *(r.bundle_id for r in released[:1])}
    for release in released[
        :1
    ]:  # a release recorded before releases had copies: copied now, while it is whole
        own = root / release.bundle_id
        if release.path != own and not own.is_dir() and release.path.is_dir():
            try:
                whole = verify_bundle(release.path).content_sha256 == release.bundle_id
            except Exception:  # noqa: BLE001  already replaced or damaged: nothing to keep
                whole = False
            if whole:
                linked_copy(release.path, own)
    for old in root.iterdir():
        if old.is_dir() and old.name not in keep and not old.name.startswith(".tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _register(context: dg.AssetExecutionContext, mlflow: MlflowParam, bundle: Path) -> str:
    """The bundle as the MLflow model `roadwork` (once per bundle id); alias `production` when it is the release
    of the newest dataset version, the one `roadwork serve --latest` serves."""
    from roadwork_assets.released import released_bundle
    from roadwork_core.bundle.verify import verify_bundle

    bundle_id = verify_bundle(bundle).content_sha256
    newest = released_bundle(context.instance)
    return log_bundle_model(
        mlflow,
        str(bundle),
        dataset_version=context.partition_key,
        bundle_id=bundle_id,
        production=newest is not None and newest.bundle_id == bundle_id,
    )


BUNDLE_INPUTS = (
    "splits",
    "classifier",
    "calibrator",
    "threshold_policy",
    "gate_policy",
    "scrc_policy",
    "calib_predictions",
)


def _bundle_check(description: str, **kw):
    return dg.asset_check(
        asset=bundle, blocking=True, partitions_def=dataset_version, description=description, **kw
    )


@_bundle_check("the bundle carries exactly one policy and its checksums verify")
def check_bundle_one_policy(bundle: Path) -> dg.AssetCheckResult:
    from roadwork_core.bundle.schema import POLICY_FILE, BundleError
    from roadwork_core.bundle.verify import verify_bundle

    try:  # the manifest lists exactly one policy file and nothing unlisted may be present
        manifest = verify_bundle(bundle)
    except BundleError as err:
        return dg.AssetCheckResult(passed=False, description=str(err))
    return dg.AssetCheckResult(
        passed=True,
        description="one policy",
        metadata={"policy_files": json_meta([POLICY_FILE]), "policy": manifest.policy},
    )


class ReproduceConfig(dg.Config):
    sample: int = Field(16, ge=1, description="calib images re-predicted through Bundle.load + predict")
    tolerance: float = Field(1e-4, gt=0, description="largest |difference| of logit and p allowed")


@_bundle_check(
    "Bundle.load + predict reproduces calib_predictions on a sample within tolerance",
    additional_ins={"calib_predictions": dg.AssetIn("calib_predictions"), "splits": dg.AssetIn("splits")},
)
def check_bundle_reproduces_predictions(
    config: ReproduceConfig,
    gpu: GPUResource,
    bundle: Path,
    calib_predictions: pd.DataFrame,
    splits: pd.DataFrame,
) -> dg.AssetCheckResult:
    from roadwork_core.bundle.bundle import Bundle
    from roadwork_core.config import exact_fp32

    loaded = Bundle.load(bundle, device=gpu.torch_device())  # where calib_predictions were computed
    sample = calib_predictions.sort_values("image_id").head(config.sample)
    uris = splits.set_index("image_id").loc[sample["image_id"], "uri"].tolist()
    with exact_fp32():  # as the prediction assets ran
        preds = loaded.predict(uris)
    got = np.array([pr.logit for pr in preds], dtype=float)
    want = sample["logit"].to_numpy(float)
    p_got = np.array([pr.p_roadwork for pr in preds], dtype=float)
    p_want = loaded.calibrator.transform(want)
    diff = float(max(np.max(np.abs(got - want), initial=0.0), np.max(np.abs(p_got - p_want), initial=0.0)))
    return dg.AssetCheckResult(
        passed=diff <= config.tolerance,
        description=f"max |difference| over {len(sample)} calib images = {diff:.2e} (tolerance {config.tolerance:.0e})",
        metadata={"max_abs_diff": diff, "n": len(sample)},
    )


class ReportConfig(dg.Config):
    register_model: bool = Field(
        True, description="register the bundle as the MLflow pyfunc model 'roadwork'"
    )
    n_bootstrap: int = Field(1000, ge=1, description="bootstrap resamples of the confidence intervals")
    seed: int = 0
    robustness_levels: list[int] = Field([0, 1, 2, 3], description="validator distortion levels to evaluate")
    robustness_max_images: int | None = Field(
        None, ge=1, description="cap on test images re-predicted per level"
    )
    subnet: bool = Field(
        True, description="score val_test through the validator replica (levels 0-3, reward)"
    )
    subnet_max_images: int | None = Field(None, ge=1, description="cap on test images in the subnet section")

    @field_validator("robustness_levels")
    @classmethod
    def _validator_levels(cls, levels: list[int]) -> list[int]:
        bad = [level for level in levels if level not in (0, 1, 2, 3)]
        if bad:
            raise ValueError(f"robustness_levels {bad} are not validator distortion levels (0, 1, 2, 3)")
        return levels


@dg.asset(
    partitions_def=dataset_version,
    group_name="release",
    kinds={"json", "matplotlib"},
    hooks=MLFLOW_HOOKS,
    description="Metrics with bootstrap CIs, risk-coverage, slices, robustness and plots on val_test only.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    mlflow: MlflowParam,
    config: ReportConfig,
    gpu: GPUResource,
    splits: pd.DataFrame,
    test_predictions: pd.DataFrame,
    bundle: Path,
) -> dg.Output[Path]:
    from roadwork_core.metrics.subnet_eval import subnet_metrics
    from roadwork_core.workflows.evaluate import evaluate_bundle_on_test

    gpu.setup()
    require_green_splits(context)
    require_released_bundle(context)
    require_consistent_lineage(context, ("splits", "test_predictions", "bundle"))
    reader = SplitReader("evaluation_report", splits)
    test_rows = reader.read(Split.VAL_TEST)
    test_preds = reader.restrict(Split.VAL_TEST, test_predictions)
    out = new_artifact_dir("evaluation_report")
    report, paths = evaluate_bundle_on_test(
        bundle,
        test_rows,
        test_preds,
        out,
        levels=config.robustness_levels,
        max_images=config.robustness_max_images,
        subnet=config.subnet,
        subnet_max_images=config.subnet_max_images,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
        device=gpu.torch_device(),
    )
    log_metrics(mlflow, {f"test_{k}": v for k, v in _flat_metrics(report.metrics).items()})
    log_metrics(mlflow, {f"test_{k}": v for k, v in subnet_metrics(report.subnet).items() if np.isfinite(v)})
    log_artifact_path(mlflow, str(out), "evaluation_report")
    log_artifact_path(mlflow, str(bundle), "bundle")
    model_uri = _register(context, mlflow, bundle) if config.register_model else None
    # every figure the report wrote, inline (a file:// link does not load in the UI's http page)
    plots_md = markdown_images(folder_figures(out, first=[p for p in paths.values() if p.endswith(".png")]))
    return dg.Output(
        out,
        metadata={
            "summary": dg.MetadataValue.md(report.summary_markdown()),
            "plots": dg.MetadataValue.md(plots_md),
            "guarantee_check": json_meta(report.guarantee_check),
            "mlflow_model_uri": model_uri or "(not registered)",
            **{k: v for k, v in _flat_metrics(report.metrics).items() if np.isfinite(v)},
            **{
                k: v
                for k, v in subnet_metrics(report.subnet).items()
                if "stream_expected" in k and np.isfinite(v)
            },
            **reader_metadata(reader),
        },
    )


def _flat_metrics(metrics: dict) -> dict[str, float]:
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, int | float) and not isinstance(vv, bool):
                    flat[f"{k}_{kk}"] = float(vv)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            flat[k] = float(v)
    return flat


@dg.asset_check(
    asset=evaluation_report,
    partitions_def=dataset_version,
    description="the realized test FNR is within the policy's guarantee plus its statistical tolerance",
)
def check_test_fnr_within_guarantee(evaluation_report: Path) -> dg.AssetCheckResult:
    from roadwork_core.metrics.report import read_report

    gc = read_report(evaluation_report).guarantee_check or {}
    return dg.AssetCheckResult(
        passed=bool(gc.get("passed", True)),
        severity=dg.AssetCheckSeverity.WARN,
        description=str(gc.get("message", "no guarantee stated by the released policy")),
        metadata={
            k: v for k, v in gc.items() if isinstance(v, int | float | str) and not isinstance(v, bool)
        },
    )
