"""Evaluation metrics: classification and calibration, selective prediction, bootstrap CIs, slices,
plots, and the val_test evaluation report."""

from roadwork_core.metrics.bootstrap import bootstrap_ci
from roadwork_core.metrics.classification import METRIC_NAMES, classification_metrics, reward_proxy
from roadwork_core.metrics.plots import (
    reliability_diagram,
    risk_coverage_plot,
    robustness_plot,
    save_png,
    slice_bars,
)
from roadwork_core.metrics.report import (
    EvaluationReport,
    build_evaluation_report,
    check_guarantee,
    distorted_predictions,
    point_metrics,
    read_report,
    write_report,
)
from roadwork_core.metrics.selective import (
    augrc,
    augrc_optimal,
    aurc,
    optimal_generalized_risk,
    risk_coverage_curve,
    risk_coverage_table,
    selective_summary,
)
from roadwork_core.metrics.slices import metadata_columns, slice_metrics

__all__ = [
    "METRIC_NAMES",
    "EvaluationReport",
    "aurc",
    "augrc",
    "augrc_optimal",
    "bootstrap_ci",
    "build_evaluation_report",
    "check_guarantee",
    "classification_metrics",
    "distorted_predictions",
    "metadata_columns",
    "optimal_generalized_risk",
    "point_metrics",
    "read_report",
    "reliability_diagram",
    "reward_proxy",
    "risk_coverage_curve",
    "risk_coverage_plot",
    "risk_coverage_table",
    "robustness_plot",
    "save_png",
    "selective_summary",
    "slice_bars",
    "slice_metrics",
    "write_report",
]
