"""Dagster types of the tables the graph passes around: column contracts checked at every output."""

from collections.abc import Callable, Sequence

import dagster as dg
import pandas as pd

from roadwork_core.contracts import Split
from roadwork_core.contracts.predictions import PREDICTION_COLUMNS


def _table_type(
    name: str,
    required: Sequence[str],
    description: str,
    extra: Callable[[pd.DataFrame], str | None] | None = None,
) -> dg.DagsterType:
    def check(_context, value) -> dg.TypeCheck:
        if not isinstance(value, pd.DataFrame):
            return dg.TypeCheck(
                False, description=f"{name} must be a pandas DataFrame, got {type(value).__name__}"
            )
        missing = [c for c in required if c not in value.columns]
        if missing:
            return dg.TypeCheck(
                False, description=f"{name} lacks columns {missing}; it has {list(value.columns)}"
            )
        problem = extra(value) if extra else None
        if problem:
            return dg.TypeCheck(False, description=f"{name}: {problem}")
        return dg.TypeCheck(
            True, metadata={"rows": len(value), "columns": ", ".join(map(str, value.columns))}
        )

    return dg.DagsterType(name=name, type_check_fn=check, description=description, typing_type=pd.DataFrame)


def _image_table_problem(df: pd.DataFrame) -> str | None:
    if df["image_id"].duplicated().any():
        return f"{int(df['image_id'].duplicated().sum())} duplicate image_id rows"
    bad = df.loc[~df["label"].isin([0, 1]), "file"].head(5).tolist()
    return f"labels outside {{0, 1}} for {bad}" if bad else None


def _splits_problem(df: pd.DataFrame) -> str | None:
    valid = {s.value for s in Split}
    bad = sorted(set(df["split"]) - valid)
    return f"unknown split values {bad}; valid: {sorted(valid)}" if bad else None


def _predictions_problem(df: pd.DataFrame) -> str | None:
    outside = df.loc[(df["p_raw"] < 0) | (df["p_raw"] > 1) | df["p_raw"].isna(), "image_id"].head(5).tolist()
    return f"p_raw outside [0, 1] for images {outside}" if outside else None


ImageTable = _table_type(
    "ImageTable",
    ["image_id", "uri", "file", "label", "phash", "phash_dihedral", "width", "height", "source"],
    "One row per accepted image: sha256 image_id, uri, 0/1 label, perceptual hashes (upright and flipped/rotated), size, source drop, metadata.",
    _image_table_problem,
)
SplitsTable = _table_type(
    "SplitsTable",
    ["image_id", "split", "group_id", "label", "uri"],
    "image_id -> split (train / val_select / val_calib / val_test) with its near-duplicate group.",
    _splits_problem,
)
PredictionsTable = _table_type(
    "PredictionsTable",
    list(PREDICTION_COLUMNS),
    "Per image: aggregated logit, p_raw, per-view probabilities and the uncertainty features.",
    _predictions_problem,
)
