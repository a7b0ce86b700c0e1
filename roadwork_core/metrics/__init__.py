"""Evaluation metrics: classification and calibration, selective prediction, bootstrap CIs, slices,
plots, and the val_test evaluation report."""

import importlib

# Names re-exported from the submodules, imported on first use (PEP 562): `import roadwork_core.metrics.x`
# must not pull in torchmetrics (seconds of imports) for every Dagster code server, sensor and CLI.
_EXPORTS = {
    "bootstrap_ci": "bootstrap",
    **dict.fromkeys(("METRIC_NAMES", "classification_metrics", "reward_proxy"), "classification"),
    **dict.fromkeys(
        ("reliability_diagram", "risk_coverage_plot", "robustness_plot", "save_png", "slice_bars"), "plots"
    ),
    **dict.fromkeys(
        (
            "EvaluationReport",
            "build_evaluation_report",
            "check_guarantee",
            "distorted_predictions",
            "point_metrics",
            "read_report",
            "write_report",
        ),
        "report",
    ),
    **dict.fromkeys(
        (
            "augrc",
            "augrc_optimal",
            "aurc",
            "optimal_generalized_risk",
            "risk_coverage_curve",
            "risk_coverage_table",
            "selective_summary",
        ),
        "selective",
    ),
    **dict.fromkeys(("metadata_columns", "slice_metrics"), "slices"),
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
