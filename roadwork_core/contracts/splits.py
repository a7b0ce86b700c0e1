"""Split contracts: which asset may read which split, written once, here.

Every asset that touches labelled images gets a `SplitReader` built for its own name. The reader
hands out only the splits the contract allows; asking for another raises `SplitContractViolation`.
The splits actually read are recorded (`reader.splits_read`) so that an asset check can audit them.

A rule may also grant `hashes_of`: splits whose perceptual hashes (and image ids), never images or
labels, the asset may read, to keep near-copies of them out of data it trains on (ExPLoRA filters its
unlabelled pool against the evaluation splits). `reader.read_phashes` hands those out and records
them as `hashes_read`, audited the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import pandas as pd


class Split(StrEnum):
    TRAIN = "train"
    VAL_SELECT = "val_select"
    VAL_CALIB = "val_calib"
    VAL_TEST = "val_test"


@dataclass(frozen=True)
class SplitRule:
    allowed: frozenset[Split]
    why: str
    hashes_of: frozenset[Split] = frozenset()  # perceptual hashes only, for near-duplicate filtering


# The one contract table. Keys are asset names (the Dagster asset keys).
SPLIT_CONTRACT: dict[str, SplitRule] = {
    "explora_backbone": SplitRule(
        frozenset({Split.TRAIN}),
        "extended pretraining sees training images (and the unlabelled pool) only; the pool is filtered "
        "by perceptual hash against the other splits",
        hashes_of=frozenset({Split.VAL_SELECT, Split.VAL_CALIB, Split.VAL_TEST}),
    ),
    "classifier": SplitRule(
        frozenset({Split.TRAIN, Split.VAL_SELECT}),
        "training reads train; early stopping and checkpoint choice read val_select",
    ),
    "select_predictions": SplitRule(
        frozenset({Split.VAL_SELECT}), "predictions read exactly their own split"
    ),
    "calib_predictions": SplitRule(frozenset({Split.VAL_CALIB}), "predictions read exactly their own split"),
    "test_predictions": SplitRule(frozenset({Split.VAL_TEST}), "predictions read exactly their own split"),
    "calibrator": SplitRule(frozenset({Split.VAL_CALIB}), "calibration is fitted on val_calib only"),
    "threshold_policy": SplitRule(
        frozenset({Split.VAL_CALIB}), "policy thresholds are set on val_calib only"
    ),
    "gate_policy": SplitRule(
        frozenset({Split.VAL_SELECT, Split.VAL_CALIB}),
        "the failure predictor is fitted on val_select and thresholded on val_calib",
    ),
    "scrc_policy": SplitRule(frozenset({Split.VAL_CALIB}), "conformal calibration uses val_calib only"),
    "bundle": SplitRule(
        frozenset({Split.VAL_CALIB}), "the bundle's decision summary is measured on val_calib"
    ),
    "evaluation_report": SplitRule(frozenset({Split.VAL_TEST}), "final evaluation reads val_test only"),
}


class SplitContractViolation(PermissionError):
    """An asset asked for a split its role does not allow."""

    def __init__(self, asset: str, split: Split | str, rule: SplitRule | None):
        self.asset, self.split, self.rule = asset, str(split), rule
        if rule is None:
            msg = (
                f"asset '{asset}' has no entry in the split contract (roadwork_core.contracts.splits."
                f"SPLIT_CONTRACT) and may read no split; add a rule there if it needs one"
            )
        else:
            allowed = ", ".join(sorted(s.value for s in rule.allowed))
            msg = (
                f"asset '{asset}' asked for split '{split}', but its contract allows only [{allowed}] "
                f"({rule.why}). Read one of the allowed splits instead."
            )
        super().__init__(msg)


def allowed_splits(asset: str) -> frozenset[Split]:
    rule = SPLIT_CONTRACT.get(asset)
    return rule.allowed if rule else frozenset()


def audit_splits_read(asset: str, splits_read: Iterable[str]) -> list[str]:
    """Return the splits in `splits_read` that the contract does not allow `asset` (empty = clean)."""
    allowed = {s.value for s in allowed_splits(asset)}
    return sorted(set(splits_read) - allowed)


def audit_hashes_read(asset: str, hashes_read: Iterable[str] | None) -> list[str]:
    """Problems with the perceptual hashes `asset` read (empty = clean): a split outside its rule's
    `hashes_of`, or (when the rule has `hashes_of`) a split it should have filtered against but did not
    (`hashes_read` None means the asset recorded nothing)."""
    rule = SPLIT_CONTRACT.get(asset)
    expected = {s.value for s in rule.hashes_of} if rule else set()
    read = set(hashes_read or [])
    problems = [f"read the hashes of {s}, which its contract does not grant" for s in sorted(read - expected)]
    problems += [f"did not filter against {s} (no hashes of it read)" for s in sorted(expected - read)]
    return problems


class SplitReader:
    """Hands an asset the rows of the splits it may read, and remembers what it read.

    `table` is the splits table (one row per image, with at least `image_id` and `split`), usually
    joined with the image table so that rows carry `uri`, `label` and metadata.
    """

    def __init__(self, asset: str, table: pd.DataFrame):
        if "split" not in table.columns or "image_id" not in table.columns:
            raise ValueError("SplitReader needs a table with 'image_id' and 'split' columns")
        self.asset = asset
        self.rule = SPLIT_CONTRACT.get(asset)
        self._table = table
        self._read: list[str] = []
        self._hashes_read: list[str] = []

    def _check(self, split: Split | str) -> Split:
        try:
            split = Split(split)
        except ValueError as exc:
            valid = ", ".join(s.value for s in Split)
            raise ValueError(f"unknown split '{split}'; valid splits are {valid}") from exc
        if self.rule is None or split not in self.rule.allowed:
            raise SplitContractViolation(self.asset, split, self.rule)
        if split.value not in self._read:
            self._read.append(split.value)
        return split

    def read(self, split: Split | str) -> pd.DataFrame:
        """Rows of the splits table that belong to `split` (a copy, index reset)."""
        split = self._check(split)
        return self._table[self._table["split"] == split.value].reset_index(drop=True).copy()

    def restrict(self, split: Split | str, rows: pd.DataFrame) -> pd.DataFrame:
        """Keep only rows of `rows` (any table with `image_id`) whose image belongs to `split`.

        Used for tables derived per image (predictions, features) so that they too pass the contract.
        """
        split = self._check(split)
        ids = set(self._table.loc[self._table["split"] == split.value, "image_id"])
        return rows[rows["image_id"].isin(ids)].reset_index(drop=True).copy()

    def read_phashes(self, split: Split | str) -> pd.DataFrame:
        """`image_id, split, phash` (+ `phash_dihedral`, `file` if present) of `split`: no uri, no label, no image.

        Only for splits in the rule's `hashes_of`; recorded in `hashes_read`.
        """
        split = Split(split)
        if self.rule is None or split not in self.rule.hashes_of:
            raise SplitContractViolation(self.asset, split, self.rule)
        if split.value not in self._hashes_read:
            self._hashes_read.append(split.value)
        cols = ["image_id", "split", "phash"] + [
            c for c in ("phash_dihedral", "file") if c in self._table.columns
        ]
        return self._table.loc[self._table["split"] == split.value, cols].reset_index(drop=True).copy()

    @property
    def splits_read(self) -> list[str]:
        return list(self._read)

    @property
    def hashes_read(self) -> list[str]:
        return list(self._hashes_read)
