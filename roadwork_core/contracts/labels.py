"""The one hard label: roadwork iff p > 0.5.

The network's validator rounds the miner's answer with `np.round`, which sends 0.5 to 0 (round half
to even), and torchmetrics' binary metrics threshold with `preds > threshold`: at exactly 0.5 both say
no_roadwork. Every place that turns a probability into the classifier's label (accuracy, MCC, F1, the
error rate and AUGRC's "correct", view disagreement, the gate policy's label) calls `hard_label`, so a
tie (a histogram calibrator outputs exactly 0.5 for a whole bin) means the same everywhere.

Fitted decision thresholds (SCRC's lambda2, the threshold policy's t_pos / t_neg) are not hard labels:
they keep `p >= threshold` because their fit counts a score equal to the threshold that way.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

HARD_LABEL_THRESHOLD = 0.5

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")


def hard_label(p: ArrayT, threshold: float = HARD_LABEL_THRESHOLD) -> ArrayT:
    """Boolean roadwork label of probabilities `p` (numpy array or torch tensor): p > threshold.
    (torch is not imported here: the Dagster definitions import this module, and code servers,
    sensors and the CLI should not pay for torch. A tensor can only exist once torch is imported.)"""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(p, torch.Tensor):
        return p > threshold
    return np.asarray(p) > threshold
