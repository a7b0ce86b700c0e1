"""Probability calibration and the three decision policies (threshold, gate, SCRC)."""

from roadwork_core.calibration.calibrators import (
    CALIBRATION_METHODS,
    Calibrator,
    binary_nll,
    expected_calibration_error,
    fit_calibrator,
)
from roadwork_core.calibration.gate import GATE_FEATURES, GatePolicy, fit_gate_policy
from roadwork_core.calibration.policy import (
    DECISIONS,
    BasePolicy,
    Decision,
    policy_from_json,
    policy_to_json,
    registered_policies,
    summarize_decisions,
)
from roadwork_core.calibration.scrc import (
    CONFIDENCE_DIRECTION,
    ScrcPolicy,
    crc_threshold,
    fit_scrc_policy,
    ltt_threshold,
    selection_key,
)
from roadwork_core.calibration.threshold import ThresholdPolicy, fit_threshold_policy

Policy = ThresholdPolicy | GatePolicy | ScrcPolicy

__all__ = [
    "CALIBRATION_METHODS",
    "CONFIDENCE_DIRECTION",
    "DECISIONS",
    "GATE_FEATURES",
    "BasePolicy",
    "Calibrator",
    "Decision",
    "GatePolicy",
    "Policy",
    "ScrcPolicy",
    "ThresholdPolicy",
    "binary_nll",
    "crc_threshold",
    "expected_calibration_error",
    "fit_calibrator",
    "fit_gate_policy",
    "fit_scrc_policy",
    "fit_threshold_policy",
    "ltt_threshold",
    "policy_from_json",
    "policy_to_json",
    "registered_policies",
    "selection_key",
    "summarize_decisions",
]
