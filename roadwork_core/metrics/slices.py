"""Per-slice metrics: one row per (metadata column, value) holding at least `min_count` images.

With `columns=None` every metadata-like column is sliced: a column with at most
`MAX_SLICE_VALUES` (and at least 2) distinct values that is not an id, path, label, split or prediction column.
Missing values form their own slice, named "<missing>".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from roadwork_core.contracts.predictions import PREDICTION_COLUMNS
from roadwork_core.metrics.classification import classification_metrics
from roadwork_core.metrics.selective import selective_summary

MAX_SLICE_VALUES = 20
MISSING = "<missing>"
# Never sliced on: identity, storage, label and model-output columns.
NON_METADATA_COLUMNS: frozenset[str] = frozenset(
    {
        *PREDICTION_COLUMNS,
        "uri",
        "path",
        "file",
        "filename",
        "phash",
        "phash_dihedral",
        "sha256",
        "p_roadwork",
        "decision",
        "confidence",
        "prediction",
        "pred",
        "correct",
        "dataset_version",
    }
)
SLICE_COLUMNS: tuple[str, ...] = (
    "column",
    "value",
    "n",
    "positive_rate",
    "accuracy",
    "mcc",
    "f1",
    "auroc",
    "brier",
    "ece",
    "reward_proxy",
    "coverage",
    "fnr",
    "fnr_accepted",
    "fpr",
    "selective_accuracy",
)


def metadata_columns(df: pd.DataFrame, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Columns of `df` that look like slice-able metadata (few distinct values, not ids/predictions)."""
    out = []
    for col in df.columns:
        if col in NON_METADATA_COLUMNS or col in exclude or str(col).endswith("_id"):
            continue
        try:
            n_values = df[col].nunique(dropna=False)
        except TypeError:  # unhashable cells (lists, arrays) are not metadata
            continue
        if 2 <= n_values <= MAX_SLICE_VALUES:  # a constant column is not a slice
            out.append(str(col))
    return out


def slice_metrics(
    df: pd.DataFrame,
    p_col: str,
    label_col: str,
    decision_col: str,
    columns: list[str] | None = None,
    min_count: int = 30,
) -> pd.DataFrame:
    """Metrics per slice; columns SLICE_COLUMNS; slices with fewer than `min_count` images dropped.

    `value` is the slice value as a string. Rows are ordered by column, then descending n.
    """
    missing = [c for c in (p_col, label_col, decision_col) if c not in df.columns]
    if missing:
        raise ValueError(f"slice_metrics: columns {missing} not in the table (it has {list(df.columns)})")
    if columns is None:
        columns = metadata_columns(df, exclude={p_col, label_col, decision_col})
    unknown = [c for c in columns if c not in df.columns]
    if unknown:
        raise ValueError(
            f"slice_metrics: slice columns {unknown} not in the table (it has {list(df.columns)})"
        )

    rows = []
    for col in columns:
        values = df[col].astype(object).where(df[col].notna(), MISSING).astype(str)
        for value, idx in values.groupby(values, sort=True).groups.items():
            if len(idx) < min_count:
                continue
            part = df.loc[idx]
            labels = part[label_col].to_numpy()
            cls = classification_metrics(part[p_col].to_numpy(), labels)
            sel = selective_summary(part[decision_col].to_numpy(), labels)
            row = {"column": col, "value": value, **cls, **sel}
            rows.append({k: row[k] for k in SLICE_COLUMNS})
    out = pd.DataFrame(rows, columns=list(SLICE_COLUMNS))
    if out.empty:
        return out.astype({"column": object, "value": object, "n": np.int64})
    out["n"] = out["n"].astype(np.int64)
    return out.sort_values(["column", "n"], ascending=[True, False], kind="stable").reset_index(drop=True)
