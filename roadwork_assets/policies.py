"""Policies stage: calibrator and the three decision policies, each fitted on the splits its contract allows."""

from dataclasses import dataclass
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from roadwork_assets._util import json_meta, reader_metadata
from roadwork_assets.data import require_green_splits
from roadwork_assets.partitions import dataset_version
from roadwork_core.contracts import Split, SplitReader
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
from roadwork_resources.mlflow_tracking import MLFLOW_HOOKS, MlflowParam, log_metrics


def _features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {name: frame[name].to_numpy(dtype=float) for name in UNCERTAINTY_FEATURES}


@dataclass
class CalibSet:
    """val_calib as the policy and bundle assets use it: calibrated probabilities, labels, features."""

    reader: SplitReader
    p: np.ndarray  # calibrated P(roadwork)
    labels: np.ndarray
    feats: dict[str, np.ndarray]  # UNCERTAINTY_FEATURES

    def summary(self, policy) -> dict:
        """Coverage / FNR / FPR ... of `policy`'s decisions on val_calib."""
        from roadwork_core.calibration.policy import summarize_decisions

        return summarize_decisions(policy.decide(self.p, self.feats), self.labels)


def calib_set(reader: SplitReader, calib_predictions: pd.DataFrame, calibrator) -> CalibSet:
    """The preamble of threshold_policy, gate_policy, scrc_policy and bundle, written once."""
    calib = reader.restrict(Split.VAL_CALIB, calib_predictions)
    p = calibrator.transform(calib["logit"].to_numpy(float))
    return CalibSet(reader, p, calib["label"].to_numpy(int), _features(calib))


def _policy_output(policy, calib: CalibSet, **extra) -> dg.Output:
    """The policy with its val_calib summary, risk-coverage plot and the splits it read as metadata."""
    from roadwork_core.metrics.embed import markdown_images
    from roadwork_core.metrics.stage_plots import policy_plot

    summary = calib.summary(policy)
    plot = policy_plot(policy, calib.p, calib.feats, calib.labels)
    meta = {
        **extra,
        **{f"calib_{k}": float("nan") if v is None else float(v) for k, v in summary.items()},
        "risk_coverage": dg.MetadataValue.md(markdown_images([("risk-coverage on val_calib", plot)])),
        **reader_metadata(calib.reader),
    }
    return dg.Output(policy, metadata=meta)


def _policy_asset(**kw):
    return dg.asset(
        partitions_def=dataset_version,
        group_name="policies",
        kinds={"json"},
        hooks=MLFLOW_HOOKS,
        **kw,
    )


class CalibratorConfig(dg.Config):
    methods: list[str] = Field(
        ["temperature", "beta", "isotonic", "histogram"], description="candidates; chosen by held-out NLL"
    )
    holdout_fraction: float = Field(0.3, gt=0, lt=1, description="share of val_calib that ranks the methods")
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        known = (
            "temperature",
            "beta",
            "isotonic",
            "histogram",
        )  # roadwork_core.calibration.CALIBRATION_METHODS
        unknown = [m for m in methods if m not in known]
        if unknown or not methods:
            raise ValueError(f"unknown calibration methods {unknown or methods}; choose among {list(known)}")
        return methods


@_policy_asset(
    description="Probability calibration map fitted on val_calib (temperature default; netcal methods)."
)
def calibrator(
    context: dg.AssetExecutionContext,
    mlflow: MlflowParam,
    config: CalibratorConfig,
    splits: pd.DataFrame,
    calib_predictions: pd.DataFrame,
):
    from roadwork_core.calibration.calibrators import fit_calibrator

    require_green_splits(context)
    reader = SplitReader("calibrator", splits)
    calib = reader.restrict(Split.VAL_CALIB, calib_predictions)
    cal, report = fit_calibrator(
        calib["logit"].to_numpy(float),
        calib["label"].to_numpy(int),
        methods=tuple(config.methods),
        holdout_fraction=config.holdout_fraction,
        seed=config.seed,
    )
    log_metrics(mlflow, {f"calibration_{k}": v for k, v in report.items() if isinstance(v, int | float)})
    for warning in report["warnings"]:
        context.log.warning(f"calibrator: {warning}")
    return dg.Output(
        cal,
        metadata={
            "method": cal.method,
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in report["warnings"]) or "none"),
            "ece_before": float(report["ece_before"]),
            "ece_after": float(report["ece_after"]),
            "report": json_meta(report),
            **reader_metadata(reader),
        },
    )


class RiskTargets(dg.Config):
    target_fnr: float = Field(
        0.02, gt=0, lt=1, description="false-negative rate target (roadwork decided no_roadwork)"
    )
    target_fpr: float | None = Field(None, gt=0, lt=1, description="optional false-positive rate target")


@_policy_asset(
    description='Policy "threshold": two empirical thresholds on the calibrated probability (no guarantee).'
)
def threshold_policy(
    context: dg.AssetExecutionContext,
    config: RiskTargets,
    splits: pd.DataFrame,
    calib_predictions: pd.DataFrame,
    calibrator,
):
    from roadwork_core.calibration.threshold import fit_threshold_policy

    require_green_splits(context)
    calib = calib_set(SplitReader("threshold_policy", splits), calib_predictions, calibrator)
    policy = fit_threshold_policy(
        calib.p, calib.labels, target_fnr=config.target_fnr, target_fpr=config.target_fpr
    )
    return _policy_output(policy, calib)


@_policy_asset(description='Policy "gate": failure predictor fitted on val_select, thresholded on val_calib.')
def gate_policy(
    context: dg.AssetExecutionContext,
    config: RiskTargets,
    splits: pd.DataFrame,
    select_predictions: pd.DataFrame,
    calib_predictions: pd.DataFrame,
    calibrator,
):
    from roadwork_core.calibration.gate import fit_gate_policy

    require_green_splits(context)
    reader = SplitReader("gate_policy", splits)
    select = reader.restrict(Split.VAL_SELECT, select_predictions)  # fits the failure predictor
    calib = calib_set(reader, calib_predictions, calibrator)  # sets its threshold
    policy = fit_gate_policy(
        calibrator.transform(select["logit"].to_numpy(float)),
        _features(select),
        select["label"].to_numpy(int),
        calib.p,
        calib.feats,
        calib.labels,
        target_fnr=config.target_fnr,
        target_fpr=config.target_fpr,
    )
    return _policy_output(policy, calib)


class ScrcConfig(dg.Config):
    alpha: float = Field(0.05, gt=0, lt=1, description="FNR bound among accepted images")
    delta: float = Field(
        0.1, gt=0, lt=1, description="ltt mode: the bound holds with probability >= 1 - delta"
    )
    mode: Literal["crc", "ltt"] = Field(
        "crc", description="crc (in expectation) | ltt (with high probability)"
    )
    bound: Literal["binomial", "hoeffding_bentkus"] = Field(
        "binomial", description="ltt p-value: binomial | hoeffding_bentkus"
    )
    target_coverage: float = Field(
        0.9, gt=0, le=1, description="fraction of images accepted (lambda1 quantile)"
    )
    confidence_feature: str = Field(
        "max_prob", description="uncertainty feature used as the confidence score"
    )

    @field_validator("confidence_feature")
    @classmethod
    def _known_feature(cls, name: str) -> str:
        if name not in UNCERTAINTY_FEATURES:
            raise ValueError(f"confidence_feature {name!r} is not one of {list(UNCERTAINTY_FEATURES)}")
        return name


@_policy_asset(
    description='Policy "scrc": selective conformal risk control with a finite-sample FNR guarantee.'
)
def scrc_policy(
    context: dg.AssetExecutionContext,
    config: ScrcConfig,
    splits: pd.DataFrame,
    calib_predictions: pd.DataFrame,
    calibrator,
):
    from roadwork_core.calibration.scrc import fit_scrc_policy, tie_warning

    require_green_splits(context)
    calib = calib_set(SplitReader("scrc_policy", splits), calib_predictions, calibrator)
    if config.confidence_feature not in calib.feats:
        raise ValueError(
            f"scrc_policy.confidence_feature={config.confidence_feature!r} is not an uncertainty feature; "
            f"use one of {list(UNCERTAINTY_FEATURES)}"
        )
    policy = fit_scrc_policy(
        calib.p,
        calib.feats[config.confidence_feature],
        calib.labels,
        alpha=config.alpha,
        delta=config.delta,
        mode=config.mode,
        target_coverage=config.target_coverage,
        bound=config.bound,
        confidence_feature=config.confidence_feature,
    )
    if warning := tie_warning(policy):
        context.log.warning(f"scrc_policy: {warning}")
    return _policy_output(policy, calib, guarantee=policy.guarantee)
