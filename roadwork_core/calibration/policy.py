"""Decisions, the policy base model, decision summaries and JSON dispatch over the three policies.

A policy maps a calibrated probability `p` (plus, for some policies, the per-image uncertainty
features of `roadwork_core.contracts.predictions`) to one decision per image: "roadwork",
"no_roadwork" or "defer". Risk is the false-negative rate over ALL roadwork images (a deferred
roadwork image is not a false negative) and the false-positive rate over all no_roadwork images;
coverage is the fraction not deferred.

Policies are pydantic v2 models that round-trip through JSON exactly. Each concrete policy registers
itself under its `policy` literal with `@register_policy`; `policy_from_json` dispatches on it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

POLICY_SCHEMA_VERSION = 1

# A probability threshold no probability reaches: `p >= NEVER` is always False.
NEVER = float(np.nextafter(1.0, 2.0))


class Decision(StrEnum):
    ROADWORK = "roadwork"
    NO_ROADWORK = "no_roadwork"
    DEFER = "defer"


DECISIONS: tuple[str, ...] = tuple(d.value for d in Decision)
DECISION_DTYPE = np.dtype("<U11")  # fits the longest decision, "no_roadwork"


class BasePolicy(BaseModel, ABC):
    """Common fields of every policy; subclasses fix `policy` to a Literal and implement `decide`.
    NaN and infinity are refused in every field: JSON cannot hold them (pydantic would write null, which
    then fails to load), and no threshold of a shipped policy may be one."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = POLICY_SCHEMA_VERSION
    policy: str
    guarantee: str

    @field_validator("policy", mode="before")
    @classmethod
    def _current_name(cls, value: Any) -> Any:
        return policy_name(value)  # a policy.json written under an old name (OLD_POLICY_NAMES) still reads

    @abstractmethod
    def decide(self, p: np.ndarray, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """(N,) calibrated probabilities (+ (N,) feature columns) -> (N,) decision strings."""


_POLICIES: dict[str, type[BasePolicy]] = {}
P = TypeVar("P", bound=type[BasePolicy])

# Policy names that earlier roadwork wrote (policy.json, the bundle manifest, run config's
# `release_policy`); still read, as the policy they were renamed to.
OLD_POLICY_NAMES: dict[str, str] = {"softmax": "threshold"}


def policy_name(name: Any) -> Any:
    """The current name of policy `name` (`softmax` -> `threshold`); anything else unchanged."""
    return OLD_POLICY_NAMES.get(name, name) if isinstance(name, str) else name


def register_policy(cls: P) -> P:
    """Class decorator: make `policy_from_json` dispatch the class's `policy` literal to it."""
    name = cls.model_fields["policy"].default
    if not isinstance(name, str) or name in _POLICIES:
        raise ValueError(
            f"policy class {cls.__name__} needs a unique string default for `policy`, got {name!r}"
        )
    _POLICIES[name] = cls
    return cls


def registered_policies() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


def policy_to_json(policy: BasePolicy) -> str:
    return policy.model_dump_json(indent=2)


def policy_from_json(text: str | bytes) -> BasePolicy:
    """Parse a policy JSON document into its concrete class, chosen by the `policy` field."""
    valid = registered_policies()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"policy JSON is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            f"expected an object with a 'policy' field, one of {valid}"
        ) from err
    if not isinstance(raw, dict) or "policy" not in raw:
        raise ValueError(
            f"policy JSON must be an object with a 'policy' field, one of {valid}; got {str(raw)[:80]!r}"
        )
    cls = _POLICIES.get(policy_name(raw["policy"]))
    if cls is None:
        raise ValueError(f"unknown policy {raw['policy']!r} in policy JSON; valid policies are {valid}")
    try:
        return cls.model_validate_json(text)
    except ValidationError as err:
        raise ValueError(
            f"policy JSON for policy {raw['policy']!r} does not match its schema: {err}"
        ) from err


# ---------------------------------------------------------------------------------------------------
# Input checks shared by the policies: errors name the array, the first bad row and its value.


def check_probabilities(p: np.ndarray, name: str = "p") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of probabilities, got shape {p.shape}")
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}[{i}] = {p[i].item()!r} is not a probability in [0, 1]; pass calibrated probabilities "
            f"(Calibrator.transform(logits)), not logits"
        )
    return p


def check_labels(labels: np.ndarray, n: int, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{name} has shape {y.shape}, expected ({n},) to match the probabilities")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}] = {y[i].item()!r}; labels must be 0 (no_roadwork) or 1 (roadwork)")
    return y.astype(np.int64)


def feature_column(features: Mapping[str, np.ndarray] | None, name: str, n: int) -> np.ndarray:
    if features is None or name not in features:
        have = sorted(features) if features is not None else []
        raise KeyError(
            f"feature {name!r} is required by this policy but missing (have {have}); pass the "
            f"predictions table's uncertainty feature columns"
        )
    col = np.asarray(features[name], dtype=np.float64)
    if col.shape != (n,):
        raise ValueError(f"feature {name!r} has shape {col.shape}, expected ({n},) to match p")
    bad = ~np.isfinite(col)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"feature {name!r}[{i}] = {col[i].item()!r} is not finite")
    return col


def decisions_from_masks(roadwork: np.ndarray, defer: np.ndarray) -> np.ndarray:
    """(N,) bool masks -> (N,) decisions; `defer` wins over `roadwork`, the rest is no_roadwork."""
    out = np.where(roadwork, Decision.ROADWORK.value, Decision.NO_ROADWORK.value).astype(DECISION_DTYPE)
    out[defer] = Decision.DEFER.value
    return out


def summarize_decisions(decisions: np.ndarray, labels: np.ndarray) -> dict[str, float | int | None]:
    """Coverage, FNR, FPR and selective accuracy of decisions against 0/1 labels.

    fnr = roadwork images decided no_roadwork / all roadwork images (deferred ones are not false
    negatives); fpr = no_roadwork images decided roadwork / all no_roadwork images; coverage =
    fraction not deferred; selective_accuracy = accuracy among the images not deferred. A rate whose
    denominator is zero is None (JSON null), never NaN.
    """
    d = np.asarray(decisions).astype(str)
    if d.ndim != 1:
        raise ValueError(f"decisions must be 1-D, got shape {d.shape}")
    bad = ~np.isin(d, DECISIONS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"decisions[{i}] = {d[i].item()!r}; valid decisions are {DECISIONS}")
    y = check_labels(labels, d.shape[0])
    n, n_pos = int(d.shape[0]), int(y.sum())
    n_neg = n - n_pos
    accepted = d != Decision.DEFER.value
    said_roadwork = d == Decision.ROADWORK.value
    said_no = d == Decision.NO_ROADWORK.value
    n_fn = int((said_no & (y == 1)).sum())
    n_fp = int((said_roadwork & (y == 0)).sum())
    n_acc = int(accepted.sum())
    n_correct = int((said_roadwork & (y == 1)).sum() + (said_no & (y == 0)).sum())
    return {
        "coverage": n_acc / n if n else None,
        "fnr": n_fn / n_pos if n_pos else None,
        "fpr": n_fp / n_neg if n_neg else None,
        "selective_accuracy": n_correct / n_acc if n_acc else None,
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }
