"""The split contract: readers hand out only allowed splits, violations name asset, split and rule."""

from __future__ import annotations

import pandas as pd
import pytest

from roadwork_core.contracts import (
    SPLIT_CONTRACT,
    Split,
    SplitContractViolation,
    SplitReader,
    allowed_splits,
    audit_splits_read,
)


@pytest.fixture
def table() -> pd.DataFrame:
    splits = [s.value for s in Split]
    return pd.DataFrame(
        {
            "image_id": [f"id{k:02d}" for k in range(12)],
            "split": [splits[k % 4] for k in range(12)],
            "label": [k % 2 for k in range(12)],
        }
    )


def test_calibrator_asking_for_val_test_is_refused(table: pd.DataFrame) -> None:
    reader = SplitReader("calibrator", table)
    with pytest.raises(SplitContractViolation) as info:
        reader.read(Split.VAL_TEST)
    err = info.value
    msg = str(err)
    assert "'calibrator'" in msg and "'val_test'" in msg, msg
    assert "[val_calib]" in msg and "val_calib only" in msg, f"message must state the rule: {msg}"
    assert err.asset == "calibrator" and err.split == "val_test"
    assert err.rule is SPLIT_CONTRACT["calibrator"]
    assert isinstance(err, PermissionError)
    assert reader.splits_read == [], "a refused read is not recorded as read"


def test_allowed_read_returns_only_that_split_and_is_recorded(table: pd.DataFrame) -> None:
    reader = SplitReader("classifier", table)
    train = reader.read("train")
    assert set(train["split"]) == {"train"} and len(train) == 3
    assert list(train.index) == [0, 1, 2], "rows come back with a fresh index"
    train.loc[0, "label"] = 99
    assert 99 not in table["label"].tolist(), "read returns a copy"
    reader.read(Split.VAL_SELECT)
    reader.read(Split.TRAIN)
    assert reader.splits_read == ["train", "val_select"], "each split recorded once, in read order"
    with pytest.raises(SplitContractViolation, match="val_calib"):
        reader.read(Split.VAL_CALIB)


def test_restrict_filters_derived_tables(table: pd.DataFrame) -> None:
    preds = pd.DataFrame({"image_id": table["image_id"], "logit": range(12)})
    reader = SplitReader("test_predictions", table)
    kept = reader.restrict(Split.VAL_TEST, preds)
    expected = set(table.loc[table["split"] == "val_test", "image_id"])
    assert set(kept["image_id"]) == expected and len(kept) == len(expected)
    with pytest.raises(SplitContractViolation):
        reader.restrict(Split.TRAIN, preds)
    assert reader.splits_read == ["val_test"]


def test_unknown_asset_and_unknown_split(table: pd.DataFrame) -> None:
    reader = SplitReader("mystery_asset", table)
    with pytest.raises(SplitContractViolation, match="no entry in the split contract"):
        reader.read(Split.TRAIN)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        SplitReader("classifier", table).read("holdout")
    with pytest.raises(ValueError, match="'image_id' and 'split'"):
        SplitReader("classifier", table.drop(columns="split"))


@pytest.mark.parametrize("asset", sorted(SPLIT_CONTRACT))
def test_every_asset_reads_exactly_its_allowed_splits(asset: str, table: pd.DataFrame) -> None:
    allowed = allowed_splits(asset)
    assert allowed, f"{asset} has an empty rule"
    reader = SplitReader(asset, table)
    for split in Split:
        if split in allowed:
            assert set(reader.read(split)["split"]) == {split.value}
        else:
            with pytest.raises(SplitContractViolation):
                reader.read(split)
    assert sorted(reader.splits_read) == sorted(s.value for s in allowed)
    assert audit_splits_read(asset, reader.splits_read) == []


def test_val_test_is_reserved_for_final_evaluation() -> None:
    readers = {a for a in SPLIT_CONTRACT if Split.VAL_TEST in allowed_splits(a)}
    assert readers == {"test_predictions", "evaluation_report"}, readers
    trainers = {a for a in SPLIT_CONTRACT if Split.TRAIN in allowed_splits(a)}
    assert trainers == {"explora_backbone", "classifier"}, trainers


def test_audit_flags_reads_outside_the_contract() -> None:
    assert audit_splits_read("calibrator", ["val_calib", "val_test", "train"]) == ["train", "val_test"]
    assert audit_splits_read("unknown", ["train"]) == ["train"]
    assert allowed_splits("unknown") == frozenset()
