"""One hard label everywhere: p = 0.5 is no_roadwork (torchmetrics' `>` and the validator's np.round)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roadwork_core.calibration import fit_gate_policy
from roadwork_core.contracts.labels import hard_label
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
from roadwork_core.metrics import classification_metrics, point_metrics
from roadwork_core.models.multiview import MultiViewConfig
from roadwork_core.models.predict import uncertainty_features

# The example: two roadwork images at exactly 0.5.
P = np.array([0.5, 0.5, 0.9, 0.1])
Y = np.array([1, 1, 1, 0])


def test_hard_label_is_the_validators_round():
    p = np.array([0.0, 0.25, 0.4999999, 0.5, 0.5000001, 0.75, 1.0])
    assert (hard_label(p) == np.round(p).astype(bool)).all(), hard_label(p)
    assert not hard_label(np.array([0.5]))[0] and not bool(hard_label(torch.tensor([0.5]))[0])


def test_a_tie_at_one_half_counts_as_no_roadwork_in_every_metric():
    m = classification_metrics(P, Y)
    assert m["accuracy"] == pytest.approx(0.5), m
    assert m["f1"] == pytest.approx(0.5), m  # one true positive, two misses: precision 1, recall 1/3
    pm = point_metrics(P, Y, np.array(["roadwork"] * 4), np.maximum(P, 1 - P))
    assert pm["error_rate"] == pytest.approx(1.0 - m["accuracy"]), (
        f"error rate {pm['error_rate']} must be 1 - accuracy {m['accuracy']} (ties included)"
    )
    assert pm["augrc_optimal"] == pytest.approx(0.5 * 0.5**2), pm
    # F1 is undefined with no positive label and no positive prediction; 0.5 predicts no positive
    assert math.isnan(classification_metrics(np.array([0.5, 0.2]), np.array([0, 0]))["f1"])


def test_view_disagreement_and_the_gate_use_the_same_tie():
    mv = MultiViewConfig(grid=1, include_global=False)
    prob = torch.tensor([0.5, 0.7])
    feats = uncertainty_features(prob, torch.tensor([[0.5], [0.4]]), mv)
    assert feats["view_disagreement"].tolist() == [0.0, 1.0], feats["view_disagreement"]

    rng = np.random.default_rng(0)
    sp, cp = rng.uniform(0.0, 1.0, 200), rng.uniform(0.0, 1.0, 200)
    sy, cy = (rng.random(200) < sp).astype(np.int64), (rng.random(200) < cp).astype(np.int64)
    feats_of = lambda p: {k: np.abs(2 * p - 1) for k in UNCERTAINTY_FEATURES}  # noqa: E731
    gate = fit_gate_policy(sp, feats_of(sp), sy, cp, feats_of(cp), cy, target_fnr=0.99)
    never_defer = gate.model_copy(update={"gate_threshold": 2.0})  # failure scores are <= 1
    p = np.array([0.5, 0.5000001])
    d = never_defer.decide(p, feats_of(p))
    assert d.tolist() == ["no_roadwork", "roadwork"], f"the gate's label at p = 0.5 must be no_roadwork: {d}"
