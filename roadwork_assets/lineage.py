"""Consistent lineage: everything a release is made of descends from the same materializations.

Dagster records, on each materialization, which materialization of every input it loaded (the tag
`dagster/input_event_pointer/<asset>`: a storage id in the event log). Walking those pointers up from an
asset's inputs reaches each upstream asset once per path; when two paths reach it at different
materializations, the asset mixes generations. `--select 'classifier+'` after a full run does exactly that
when a downstream asset is left out of the selection: `calib_predictions` and `bundle` come from the new
classifier while `calibrator` and `scrc_policy` were fitted on the old one's logits, every check passes,
and Dagster 1.13 shows `bundle` as fresh (staleness does not travel past a stale parent). `bundle` and
`evaluation_report` refuse such inputs (`require_consistent_lineage`), naming both paths and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dagster as dg

POINTER_TAG = "dagster/input_event_pointer/"


@dataclass(frozen=True)
class Lineage:
    """What the walk reached: asset -> (storage id, the path it was first reached by), and the conflicts."""

    reached: dict[dg.AssetKey, tuple[int, tuple[str, ...]]]
    conflicts: list[tuple[str, tuple[int, tuple[str, ...]], tuple[int, tuple[str, ...]]]]  # key, both hits

    def storage_id(self, key: str) -> int | None:
        hit = self.reached.get(dg.AssetKey(key))
        return hit[0] if hit else None

    def describe(self) -> list[str]:
        return [
            f"{key} at materialization {a} through {' -> '.join(reversed(pa))}, "
            f"but at materialization {b} through {' -> '.join(reversed(pb))}"
            for key, (a, pa), (b, pb) in self.conflicts
        ]

    def most_upstream_conflict(self) -> str | None:
        """The mixed asset none of whose ancestors in the asset graph is mixed too: the one to select from."""
        keys = sorted({key for key, _, _ in self.conflicts})
        if not keys:
            return None
        ancestors = _ancestors()
        top = [k for k in keys if not ancestors.get(k, set()) & set(keys)]
        return (top or keys)[0]


def _ancestors() -> dict[str, set[str]]:
    """asset -> every asset upstream of it, from the code location's asset definitions."""
    from roadwork_assets.definitions import ASSETS  # here: definitions imports the assets that import this

    parents = {
        key.to_user_string(): {dep.to_user_string() for dep in a.asset_deps[key]}
        for a in ASSETS
        for key in a.keys
    }
    out: dict[str, set[str]] = {}

    def up(key: str) -> set[str]:
        if key not in out:
            out[key] = set()
            for parent in parents.get(key, ()):
                out[key] |= {parent, *up(parent)}
        return out[key]

    for key in parents:
        up(key)
    return out


def _record(instance: dg.DagsterInstance, key: dg.AssetKey, storage_id: int, partition: str | None):
    """The materialization of `key` in `partition` that a step whose pointer says `storage_id` loaded.

    Dagster's pointer is the input asset's latest materialization over all partitions when the step ran, not
    the partition's: with a second dataset version it can name another version's. The one the IO manager
    loaded is the partition's newest at or before the pointer (storage ids only grow)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=key,
            asset_partitions=[partition] if partition is not None else None,
            before_storage_id=storage_id + 1,
        ),
        limit=1,
    ).records
    return records[0] if records else None


def _input_pointers(record) -> dict[dg.AssetKey, int]:
    tags = (record.asset_materialization.tags or {}) if record.asset_materialization else {}
    out = {}
    for tag, value in tags.items():
        if tag.startswith(POINTER_TAG):
            try:
                out[dg.AssetKey.from_user_string(tag.removeprefix(POINTER_TAG))] = int(value)
            except ValueError:  # not a storage id: nothing to follow
                continue
    return out


def walk_lineage(
    instance: dg.DagsterInstance, roots: Mapping[dg.AssetKey, int], partition: str | None
) -> Lineage:
    """Follow input pointers up from `roots` (asset -> storage id of the materialization used), within
    `partition` (every roadwork asset is partitioned by dataset version, each reading its own version)."""
    reached: dict[dg.AssetKey, tuple[int, tuple[str, ...]]] = {}
    conflicts: list = []
    reported: set[dg.AssetKey] = set()
    stack = [(key, sid, (key.to_user_string(),)) for key, sid in roots.items()]
    while stack:
        key, sid, path = stack.pop()
        record = _record(instance, key, sid, partition)
        sid = record.storage_id if record is not None else sid
        if key in reached:
            first, first_path = reached[key]
            if first != sid and key not in reported:
                reported.add(key)
                conflicts.append((key.to_user_string(), (first, first_path), (sid, path)))
            continue
        reached[key] = (sid, path)
        if record is None:  # wiped from the event log: nothing more to compare through it
            continue
        for upstream, upstream_sid in _input_pointers(record).items():
            stack.append((upstream, upstream_sid, (*path, upstream.to_user_string())))
    return Lineage(reached=reached, conflicts=conflicts)


def materialization_metadata(instance: dg.DagsterInstance, lineage: Lineage, key: str) -> dict:
    """The metadata of the materialization of `key` the walk reached ({} when not reached)."""
    storage_id = lineage.storage_id(key)
    record = _record(instance, dg.AssetKey(key), storage_id, None) if storage_id is not None else None
    mat = record.asset_materialization if record else None
    return {k: v.value for k, v in (mat.metadata or {}).items()} if mat else {}


def latest_storage_ids(
    instance: dg.DagsterInstance, keys: Iterable[str], partition: str
) -> dict[dg.AssetKey, int]:
    """The latest materialization of each asset in `partition`: what the IO manager loads as an input."""
    out = {}
    for key in keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1
        ).records
        if records:
            out[dg.AssetKey(key)] = records[0].storage_id
    return out


def require_consistent_lineage(context: dg.AssetExecutionContext, inputs: Iterable[str]) -> Lineage:
    """Refuse to run on inputs of mixed generations (module doc); return the walk for lineage metadata."""
    lineage = walk_lineage(
        context.instance,
        latest_storage_ids(context.instance, inputs, context.partition_key),
        context.partition_key,
    )
    if lineage.conflicts:
        mixed = ", ".join(key for key, _, _ in lineage.conflicts)
        first = lineage.most_upstream_conflict()
        raise dg.Failure(
            description=(
                f"the inputs of {context.asset_key.to_user_string()} for {context.partition_key} come from "
                f"different materializations of {mixed}: " + "; ".join(lineage.describe()) + ". An asset "
                f"downstream of {first} was left out when {first} was materialized again, so what was fitted "
                f"on the old one (calibration, policies, predictions) would ship or be reported with the new one. "
                f"Materialize everything downstream of it together: --select '{first}*' --partition "
                f"{context.partition_key}"
            ),
            metadata={"mixed_assets": mixed},
        )
    return lineage
