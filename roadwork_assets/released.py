"""The released bundle: the `bundle` asset's latest materialization whose blocking checks passed.

Read from the Dagster instance's event log (the source of truth), never by scanning the artifact
folder for the newest directory. A materialization counts as released when every blocking check of
`bundle` evaluated in the same run, for the same partition, passed. `roadwork serve --latest` follows it
(`latest_release_candidate`, polled in a background thread) and `new_drop_sensor` asks whether a
partition already has one built from the same files (`released_bundle`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

BUNDLE_KEY = dg.AssetKey("bundle")


@functools.cache
def blocking_checks() -> frozenset[str]:
    """Every blocking check on `bundle` (release, split contract): a bundle is released once all passed."""
    from roadwork_assets.definitions import (
        ASSET_CHECKS,
    )  # here: definitions imports the sensors that use this

    return frozenset(
        spec.name
        for checks in ASSET_CHECKS
        for spec in checks.check_specs
        if spec.asset_key == BUNDLE_KEY and spec.blocking
    )


@dataclass(frozen=True)
class ReleasedBundle:
    partition: str
    path: Path  # the bundle directory: its own copy under releases/bundle/<version>/<bundle id>/
    bundle_id: str  # the manifest content_sha256 recorded at release
    source_fingerprint: str  # the image_table's drop fingerprint it was built from ("" if unknown)
    run_id: str
    storage_id: int


def _passed_checks(instance: dg.DagsterInstance, run_id: str, partition: str | None) -> dict[str, bool]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    results: dict[str, bool] = {}
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.asset_key == BUNDLE_KEY and evaluation.partition in (None, partition):
            results[evaluation.check_name] = results.get(evaluation.check_name, True) and evaluation.passed
    return results


def _check_outcomes(instance: dg.DagsterInstance, record) -> dict[str, bool]:
    """Blocking check -> passed, for this bundle materialization: the newest evaluation targeting it, from any
    run (the UI's re-execution from failure, or the check executed alone, after the cause was fixed, or a
    re-run that now fails); its own run's evaluation where none is found among the recent ones."""
    from dagster._core.event_api import PartitionKeyFilter  # the storage's own filter (no public alias yet)

    results = _passed_checks(instance, record.run_id, record.partition_key)
    for name in sorted(blocking_checks()):
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(BUNDLE_KEY, name),
            limit=20,
            partition_filter=PartitionKeyFilter(key=record.partition_key) if record.partition_key else None,
        )  # newest first
        for execution in history:
            evaluation = (
                execution.event.dagster_event.event_specific_data
                if execution.event and execution.event.dagster_event
                else None
            )
            target = getattr(evaluation, "target_materialization_data", None)
            if (
                isinstance(evaluation, dg.AssetCheckEvaluation)
                and target
                and target.storage_id == record.storage_id
            ):
                results[name] = bool(evaluation.passed)
                break
    return results


def _as_released(instance: dg.DagsterInstance, record) -> ReleasedBundle | None:
    mat = record.asset_materialization
    meta = {k: v.value for k, v in (mat.metadata or {}).items()} if mat else {}
    if not record.run_id or not meta.get("path") or not meta.get("bundle_id"):
        return None  # runless, or written before releases recorded their identity
    passed = _check_outcomes(instance, record)
    required = blocking_checks()
    if not required <= passed.keys() or not all(passed[name] for name in required):
        return None
    return ReleasedBundle(
        partition=record.partition_key,
        path=_release_path(meta, record.partition_key),
        bundle_id=str(meta["bundle_id"]),
        source_fingerprint=str(meta.get("source_fingerprint") or ""),
        run_id=record.run_id,
        storage_id=record.storage_id,
    )


def _release_path(meta: dict, partition: str) -> Path:
    """The bundle's own copy (`bundle_path`), which a later bundle of the partition cannot overwrite. A release
    recorded before copies existed: the copy the next bundle of its version made of it
    (`<state>/releases/bundle/<version>/<bundle id>`, beside `<state>/artifacts/bundle/<version>`), else the IO
    manager's directory (`dir`: its directory kind)."""
    from roadwork_resources.paths import state_root

    if meta.get("bundle_path"):
        return Path(meta["bundle_path"])
    artifact = Path(meta["path"])
    for root in (
        state_root(),
        artifact.parents[2],
    ):  # the store's root (ROADWORK_ARTIFACTS may lie elsewhere)
        copy = root / "releases" / "bundle" / partition / str(meta["bundle_id"])
        if copy.is_dir():
            return copy
    return artifact / "dir"


def released_bundles(
    instance: dg.DagsterInstance, partition: str | None = None, scan: int = 50
) -> list[ReleasedBundle]:
    """Released bundles (of `partition`, or of any) among the last `scan` materializations: the newest dataset
    version first (`version_key`), and within a version the newest release first. Materializing an older
    version's bundle again (a re-run for a report, a backfill) therefore never makes it the release that
    `serve --latest` swaps in over a model trained on more data; serve that bundle's path to choose it."""
    live = _live_versions(instance)
    if partition is not None and partition not in live:
        return []  # a deleted version's bundle is no release: it must not serve or be the production model
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=BUNDLE_KEY, asset_partitions=[partition] if partition else None),
        limit=scan,
    ).records  # newest first
    return newest_version_first(
        [
            released
            for record in records
            if record.partition_key in live and (released := _as_released(instance, record)) is not None
        ]
    )


def _live_versions(instance: dg.DagsterInstance) -> set[str]:
    """The dataset versions that still exist: Dagster keeps a deleted dynamic partition's materializations."""
    from roadwork_assets.partitions import dataset_version

    return set(instance.get_dynamic_partitions(dataset_version.name))


def newest_version_first(found: list[ReleasedBundle]) -> list[ReleasedBundle]:
    """Releases ordered by dataset version (`version_key`, newest first), then by recency."""
    from roadwork_core.data.drops import version_key

    return sorted(found, key=lambda r: (version_key(r.partition or ""), r.storage_id), reverse=True)


def released_bundle(instance: dg.DagsterInstance, partition: str | None = None) -> ReleasedBundle | None:
    """The release of the newest dataset version (of `partition`, or of any), its newest one. Without a
    partition, each version's own recent materializations are read, newest version first: 50 backfilled
    materializations of an old version's bundle cannot push the newest version's release out of view."""
    if partition is not None:
        found = released_bundles(instance, partition)
        return found[0] if found else None
    for version in _bundle_versions_newest_first(instance):
        found = released_bundles(instance, version)
        if found:
            return found[0]
    return None


def _bundle_versions_newest_first(instance: dg.DagsterInstance) -> list[str]:
    from roadwork_core.data.drops import version_key

    live = _live_versions(instance)
    versions = [v for v in instance.get_materialized_partitions(BUNDLE_KEY) if v in live]
    return sorted(versions, key=version_key, reverse=True)


def _candidate(released: ReleasedBundle):
    from roadwork_core.serving.slot import Candidate

    return Candidate(
        path=released.path,
        expected_id=released.bundle_id,
        release=f"bundle {released.partition}, run {released.run_id[:8]}",
    )


def latest_release_candidate():
    """The release of the newest dataset version as a serving Candidate (roadwork_core.serving), or None;
    `serve --latest` polls it."""
    with dg.DagsterInstance.get() as instance:
        released = released_bundle(instance)
    return _candidate(released) if released else None


def release_candidates() -> list:
    """Every release still worth trying, newest first, one per bundle directory that still exists (each
    version keeps the copy of its newest release and of its latest bundle; older copies are removed)."""
    with dg.DagsterInstance.get() as instance:
        found = [
            r for v in _bundle_versions_newest_first(instance) for r in released_bundles(instance, v, scan=5)
        ]
    newest_per_path: dict[Path, ReleasedBundle] = {}
    for released in found:
        if released.path.is_dir():
            newest_per_path.setdefault(released.path, released)
    return [_candidate(r) for r in newest_per_path.values()]


def require_released_bundle(context: dg.AssetExecutionContext) -> None:
    """`evaluation_report` reports on releases only: the bundle it loads (the partition's latest) must have
    passed every blocking check of `bundle`. A blocking check stops downstream steps in its own run, but a
    later run selecting `evaluation_report` alone would otherwise evaluate, and register in MLflow, a bundle
    that failed `check_bundle_reproduces_predictions`."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=BUNDLE_KEY, asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records or _as_released(context.instance, records[0]) is not None:
        return  # no bundle: the IO manager names the missing input
    record = records[0]
    passed = _check_outcomes(context.instance, record)
    failed = sorted(name for name in blocking_checks() if not passed.get(name, False))
    if not failed:  # checks fine: a bundle materialized before releases recorded their identity, or runless
        return
    raise dg.Failure(
        description=(
            f"the bundle of {context.partition_key} (run {record.run_id[:8]}) is not released: its blocking "
            f"check(s) {failed} failed or did not run with it, so it may not be evaluated or registered. "
            f"Materialize `bundle` again with its checks (--select 'bundle*' --partition {context.partition_key}), "
            "or the assets it is made from first when the check says they do not match"
        )
    )
