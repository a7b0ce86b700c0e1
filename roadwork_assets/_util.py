"""Small helpers shared by the asset modules (orchestration only, no ML logic)."""

import json
from typing import Any

import dagster as dg
import pandas as pd

from roadwork_assets.partitions import dataset_version
from roadwork_core.contracts import SplitReader


def md_table(df: pd.DataFrame, max_rows: int = 20) -> dg.MetadataValue:
    if df.empty:
        return dg.MetadataValue.md("_(none)_")
    shown = df.head(max_rows)
    more = f"\n\n_{len(df) - max_rows} more rows not shown_" if len(df) > max_rows else ""
    return dg.MetadataValue.md(shown.to_markdown(index=False) + more)


def json_meta(value: Any) -> dg.MetadataValue:
    return dg.MetadataValue.json(json.loads(json.dumps(value, default=str)))


def reader_metadata(reader: SplitReader) -> dict[str, Any]:
    """Every asset that reads splits records them, for the contract audit check."""
    meta = {"splits_read": dg.MetadataValue.json(reader.splits_read)}
    if reader.rule is not None and reader.rule.hashes_of:
        meta["hashes_read"] = dg.MetadataValue.json(reader.hashes_read)
    return meta


def load_previous_version(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, current: str
) -> tuple[str | None, Any]:
    """The artifact of `asset_key` for the latest dataset version sorting (`version_key`) before `current`
    that has one.

    Read through the materialization event's recorded path (the event log is the source of truth),
    never by scanning the disk for the newest file.
    """
    from pathlib import Path

    from roadwork_core.data.drops import version_key
    from roadwork_resources.io_manager import read_artifact

    versions = sorted(
        (
            v
            for v in instance.get_dynamic_partitions(dataset_version.name)
            if version_key(v) < version_key(current)
        ),
        key=version_key,
    )
    for version in reversed(versions):
        path = latest_materialization_metadata(instance, asset_key, version).get("path")
        if path:
            return version, read_artifact(Path(path))
    return None, None


def latest_materialization_metadata(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str
) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return {}
    mat = records[0].asset_materialization
    return {k: v.value for k, v in (mat.metadata or {}).items()} if mat else {}
