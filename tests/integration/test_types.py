"""The table DagsterTypes reject malformed outputs with a message naming the problem."""

import dagster as dg
import pandas as pd

from roadwork_assets.types import ImageTable, PredictionsTable, SplitsTable


def test_splits_type_rejects_unknown_split_and_missing_columns():
    ok = pd.DataFrame(
        {"image_id": ["a"], "split": ["train"], "group_id": ["a"], "label": [1], "uri": ["/x.jpg"]}
    )
    assert dg.check_dagster_type(SplitsTable, ok).success
    bad = ok.assign(split=["holdout"])
    result = dg.check_dagster_type(SplitsTable, bad)
    assert not result.success and "holdout" in result.description
    result = dg.check_dagster_type(SplitsTable, ok.drop(columns=["group_id"]))
    assert not result.success and "group_id" in result.description


def test_image_table_type_rejects_duplicate_ids_and_bad_labels():
    row = {
        "image_id": "a",
        "uri": "/a.jpg",
        "file": "images/a.jpg",
        "label": 1,
        "phash": "0" * 16,
        "phash_dihedral": " ".join(["0" * 16] * 7),
        "width": 64,
        "height": 48,
        "source": "v1",
    }
    assert dg.check_dagster_type(ImageTable, pd.DataFrame([row])).success
    assert "duplicate" in dg.check_dagster_type(ImageTable, pd.DataFrame([row, row])).description
    assert (
        "images/a.jpg" in dg.check_dagster_type(ImageTable, pd.DataFrame([{**row, "label": 2}])).description
    )


def test_predictions_type_rejects_probabilities_outside_unit_interval():
    from roadwork_core.contracts.predictions import PREDICTION_COLUMNS

    row = {c: 0.5 for c in PREDICTION_COLUMNS} | {
        "image_id": "a",
        "split": "val_calib",
        "label": 1,
        "view_probs": [0.5],
    }
    assert dg.check_dagster_type(PredictionsTable, pd.DataFrame([row])).success
    result = dg.check_dagster_type(PredictionsTable, pd.DataFrame([{**row, "p_raw": 1.5}]))
    assert not result.success and "['a']" in result.description
