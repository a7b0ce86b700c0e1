"""Small helpers shared by the asset modules (orchestration only, no ML logic)."""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

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


def previous_split_history(
    instance: dg.DagsterInstance, current: str
) -> tuple[str | None, pd.DataFrame | None]:
    """(version, split history) of the latest dataset version sorting before `current` that has `splits`:
    every image that version or an earlier one assigned, vanished ones included (`split_history`), read
    from the path its materialization recorded; its splits table when it was written before histories. The
    latest histories of the older versions are added for images the newest one never saw (an older version
    split again after it, its drop grown in place).
    A version whose partition was deleted counts too: its splits were made, later versions may have been
    built on them, and deleting the partition must not let its images move (as `late_versions` does)."""
    from roadwork_core.data.drops import version_key

    key = dg.AssetKey("splits")
    versions = sorted(
        (v for v in instance.get_materialized_partitions(key) if version_key(v) < version_key(current)),
        key=version_key,
    )
    newest, union = None, None
    for version in reversed(versions):
        meta = latest_materialization_metadata(instance, key, version)
        if not meta.get("path"):
            continue
        history = _history_or_table(meta)
        if union is None:
            newest, union = version, history
        else:  # an older version split again later may have placed images the newer ones never saw
            extra = history[~history["image_id"].isin(union["image_id"])]
            if len(extra):
                union = pd.concat([union, extra.reindex(columns=union.columns)], ignore_index=True)
    return newest, union


def later_split_placements(
    instance: dg.DagsterInstance, current: str, image_ids: pd.Series
) -> pd.DataFrame | None:
    """The splits that versions sorting after `current` gave to `image_ids` (their latest histories, the newest
    version first), or None. An earlier version split again (its drop gained images, edited in place) follows
    them: the same image kept train in v0001 and went to val_test in v0003, every check green."""
    from roadwork_core.data.drops import version_key

    key = dg.AssetKey("splits")
    versions = sorted(
        (v for v in instance.get_materialized_partitions(key) if version_key(v) > version_key(current)),
        key=version_key,
        reverse=True,
    )
    found = None
    for version in versions:
        meta = latest_materialization_metadata(instance, key, version)
        if not meta.get("path"):
            continue
        history = _history_or_table(meta)
        history = history[history["image_id"].isin(image_ids)]
        if found is not None:
            history = history[~history["image_id"].isin(found["image_id"])]
        found = history if found is None else pd.concat([found, history], ignore_index=True)
    return found if found is not None and len(found) else None


def own_split_history(instance: dg.DagsterInstance, version: str) -> pd.DataFrame | None:
    """The split history the last materialization of `splits` for `version` itself wrote (None before the
    first): a version materialized again keeps every split it gave, whatever changed meanwhile."""
    meta = latest_materialization_metadata(instance, dg.AssetKey("splits"), version)
    if not meta.get("path"):
        return None
    return _history_or_table(meta)


def _history_or_table(meta: dict) -> pd.DataFrame:
    """The split history a `splits` materialization recorded, or its table (written before histories)."""
    from roadwork_resources.io_manager import read_artifact

    if meta.get("history_path"):
        history = Path(meta["history_path"])
        if not history.is_file():
            raise FileNotFoundError(
                f"{history} (the split history the splits materialization recorded) is missing, so the splits "
                "cannot stay sticky to it. Restore the artifact store (ROADWORK_STATE) it was written "
                "to"
            )
        return pd.read_parquet(history)
    return read_artifact(Path(meta["path"]))


def late_versions(instance: dg.DagsterInstance, versions: list[str]) -> dict[str, str]:
    """version -> the newest later version with splits, for each of `versions` that has no splits yet
    although a version sorting after it has. Such a late drop cannot be split stickily: the later
    version's splits were made without its images, and materializing the later one again would then build
    on it and reassign images that version already placed (val_test images into train)."""
    from roadwork_core.data.drops import version_key

    done = instance.get_materialized_partitions(dg.AssetKey("splits"))
    if not done:
        return {}
    newest = max(done, key=version_key)
    return {v: newest for v in versions if v not in done and version_key(v) < version_key(newest)}


def held_drops(instance: dg.DagsterInstance) -> dict[str, str]:
    """drop -> the newest split version whose latest image table holds it. A drop without a partition of its
    own (v0002 never added, v0003 split) is part of that version, not late: leaving it out of v0004 made v0004
    fail with v0002 'withdrawn' from v0003, and the advised rename would have withdrawn it for good."""
    from roadwork_core.data.drops import version_key

    held: dict[str, str] = {}
    split = instance.get_materialized_partitions(dg.AssetKey("splits"))
    for version in sorted(split, key=version_key):
        for drop in (
            latest_materialization_metadata(instance, dg.AssetKey("image_table"), version).get("drops") or []
        ):
            if (
                drop not in split
            ):  # a version split in its own right (its partition deleted since) is not held
                held[str(drop)] = version
    return held


def late_version_message(version: str, newest: str, held_by: str | None = None) -> str:
    if held_by is not None:
        return (
            f"dataset version {version} cannot be split on its own: its drop is already part of {held_by}'s "
            f"image table, which was split (its images have their splits there, and in every later version). "
            f"Delete the partition: python -m roadwork_commands.partitions delete {version}; materialize "
            f"{held_by} or a later version to train on it"
        )
    return (
        f"dataset version {version} arrived after {newest}, which sorts after it, was already split: splitting it "
        f"now would let {newest}'s splits be rebuilt on it and move images that {newest} already placed. Rename "
        f"the drop folder so it sorts after {newest} (for example to the next free version name); if partition "
        f"{version} was added, delete it: python -m roadwork_commands.partitions delete {version}. (A version "
        f"whose partition was deleted still counts: its splits were made and later versions stay sticky to them.)"
    )
