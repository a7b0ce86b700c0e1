"""Data stage: image_table -> splits, with the split contracts as blocking checks."""

import dagster as dg
import pandas as pd
from pydantic import Field

from roadwork_assets._util import (
    held_drops,
    late_version_message,
    late_versions,
    later_split_placements,
    latest_materialization_metadata,
    md_table,
    own_split_history,
    previous_split_history,
)
from roadwork_assets.partitions import dataset_version
from roadwork_assets.types import ImageTable, SplitsTable
from roadwork_core.io import atomic_write_bytes
from roadwork_resources.artifact_store import ArtifactStore
from roadwork_resources.dataset import DatasetSource
from roadwork_resources.settings import SplitSettings


class ImageTableConfig(dg.Config):
    min_size: int = Field(32, ge=1, description="images smaller than this on either side are rejected")
    max_reject_fraction: float = Field(
        0.05, ge=0, le=1, description="fail the run when more candidates than this are rejected"
    )
    allow_withdrawn_drops: bool = Field(
        False,
        description="build the table although a drop an earlier image table held is gone or no longer ready "
        "(its images then vanish; their splits still anchor near-copies)",
    )


def _why_not_ready(folder) -> str:
    from roadwork_core.data.drops import READY, version_name_problem

    if not folder.is_dir():
        return "its folder is gone"
    if not (folder / READY).is_file():
        return f"its {READY} marker is missing"
    problem = version_name_problem(folder.name)
    return f"its name {problem}" if problem else "not listed as ready"


def withdrawn_drops(instance: dg.DagsterInstance, version: str, drops: list[str]) -> dict[str, str]:
    """Drops (sorting at or before `version`) that this version's last image table, or that of the newest
    earlier version that was split, held but that are not among `drops` now: drop -> the version whose table
    held it. A drop whose `_READY` went missing (a re-upload in progress) would otherwise silently shrink the
    version. (A version whose splits never succeeded, a late drop refused and moved away, does not count.)"""
    from roadwork_core.data.drops import version_key

    key = dg.AssetKey("image_table")
    split = instance.get_materialized_partitions(dg.AssetKey("splits"))
    earlier = [v for v in split if version_key(v) < version_key(version)]
    sources = [version, *([max(earlier, key=version_key)] if earlier else [])]
    gone: dict[str, str] = {}
    for source in sources:
        for drop in latest_materialization_metadata(instance, key, source).get("drops") or []:
            if drop not in drops and version_key(drop) <= version_key(version):
                gone.setdefault(drop, source)
    return gone


def earlier_image_facts(
    instance: dg.DagsterInstance, version: str, facts_version: str | None
) -> tuple[pd.DataFrame | None, list[str], list[str]]:
    """(facts rows, the versions they came from, why other tables were not used) of this version's last
    image table and of the newest earlier version's, each only when its facts were computed under
    `facts_version`: a new version of a growing inbox then decodes and hashes only its new images, and the
    table is the same as when every image is hashed again. A table that cannot be read, or whose folder no
    longer holds what that materialization wrote (a later run of its version replaced it), is passed over."""
    from pathlib import Path

    from roadwork_core.data.drops import version_key
    from roadwork_core.data.image_table import FACT_COLUMNS
    from roadwork_resources.io_manager import artifact_digest, read_artifact

    if facts_version is None:
        return None, [], ["every table (the hashing code cannot be fingerprinted here)"]
    key = dg.AssetKey("image_table")
    built = instance.get_materialized_partitions(key)
    earlier = [v for v in built if version_key(v) < version_key(version)]
    sources = [
        v
        for v in (version if version in built else None, max(earlier, key=version_key) if earlier else None)
        if v
    ]
    frames, used, skipped = [], [], []
    for source in sources:
        meta = latest_materialization_metadata(instance, key, source)
        if meta.get("image_facts_version") != facts_version or not meta.get("path"):
            skipped.append(f"{source} (hashed by other code or libraries)")
            continue
        path = Path(meta["path"])
        if artifact_digest(path) != meta.get("sha256"):
            skipped.append(f"{source} (its folder holds another table than the one recorded)")
            continue
        try:
            table = read_artifact(path)
        except Exception as exc:  # noqa: BLE001 - a cache: the images are hashed again instead
            skipped.append(f"{source} ({type(exc).__name__}: {exc})")
            continue
        if artifact_digest(path) != meta.get("sha256"):  # replaced while it was read
            skipped.append(f"{source} (replaced while it was read)")
            continue
        if isinstance(table, pd.DataFrame) and set(FACT_COLUMNS) <= set(table.columns):
            frames.append(table[FACT_COLUMNS])
            used.append(source)
    return (pd.concat(frames, ignore_index=True) if frames else None), used, skipped


@dg.asset(
    partitions_def=dataset_version,
    group_name="data",
    kinds={"pandas", "parquet"},
    dagster_type=ImageTable,
    description="One row per accepted image of every drop up to this version; rejects listed with reasons.",
)
def image_table(
    context: dg.AssetExecutionContext, config: ImageTableConfig, dataset: DatasetSource, store: ArtifactStore
) -> dg.Output:
    from roadwork_core.data.fingerprint import version_fingerprint
    from roadwork_core.data.image_table import TooManyRejects, build_image_table, facts_version

    drops = dataset.drops_for_version(context.partition_key)
    # a late drop (it sorts before a version that already has splits, and has none) is left out of every
    # version until it is renamed, as the sensor's message says: a later version that took it in made the
    # advised rename fail as a withdrawn drop
    held = held_drops(
        context.instance
    )  # a drop a split version's table already holds is part of it, not late
    candidates = [p.name for p in drops if p.name != context.partition_key and p.name not in held]
    late = late_versions(context.instance, candidates)
    if late:
        context.log.warning(
            "late drops left out (rename each so it sorts after the newest split version): "
            + "; ".join(f"{v} (arrived after {newest} was split)" for v, newest in sorted(late.items()))
        )
        drops = [p for p in drops if p.name not in late]
    gone = withdrawn_drops(context.instance, context.partition_key, [p.name for p in drops])
    if gone and not config.allow_withdrawn_drops:
        named = ", ".join(
            f"{d} (in {v}'s image table; {_why_not_ready(dataset.inbox_path / d)})"
            for d, v in sorted(gone.items())
        )
        raise dg.Failure(
            description=f"drops an earlier image table held are gone or not ready: {named}. Restore them (a drop "
            f"counts once `{dataset.inbox_path}/<drop>/_READY` exists; a re-upload should write `_READY` last), "
            f"or set ops.image_table.config.allow_withdrawn_drops: true to build version "
            f"{context.partition_key} without them",
            metadata={"withdrawn_drops": sorted(gone)},
        )
    if gone:
        context.log.warning(f"building without withdrawn drops {sorted(gone)} (allow_withdrawn_drops)")
    fingerprint = version_fingerprint(drops)  # before reading: a file changed meanwhile changes the next one
    side = store.side_dir("image_table", context.partition_key)
    known, known_from, not_reused = earlier_image_facts(
        context.instance, context.partition_key, facts_version()
    )
    if not_reused:
        context.log.info(
            f"image facts not reused from {'; '.join(not_reused)}: those images are hashed again"
        )
    try:
        result = build_image_table(
            drops,
            fmt=dataset.format,
            class_names=dataset.class_names,
            box_classes=dataset.box_classes or None,
            min_size=config.min_size,
            max_reject_fraction=config.max_reject_fraction,
            known=known,
        )
    except TooManyRejects as exc:  # the message names the first few; the file holds every one
        path = side / "rejects.parquet"
        atomic_write_bytes(path, exc.rejects.to_parquet(index=False))
        raise dg.Failure(
            description=f"{exc}\nAll {len(exc.rejects)} rejects (file, source, reason, detail): {path}",
            metadata={"rejects_path": dg.MetadataValue.path(str(path)), "rejects": md_table(exc.rejects)},
        ) from exc
    images, rejects = result.images, result.rejects
    atomic_write_bytes(side / "rejects.parquet", rejects.to_parquet(index=False))
    atomic_write_bytes(side / "duplicates.parquet", result.duplicates.to_parquet(index=False))
    if len(rejects):
        context.log.warning(f"{len(rejects)} files rejected; see {side / 'rejects.parquet'}")
    return dg.Output(
        images,
        metadata={
            "drops": [p.name for p in drops],
            "withdrawn_drops": sorted(gone),
            "late_drops_left_out": sorted(late),
            "source_fingerprint": fingerprint,
            "num_images": len(images),
            "num_positive": int(images["label"].sum()) if len(images) else 0,
            "num_rejected": len(rejects),
            "rejects": md_table(rejects),
            "rejects_path": dg.MetadataValue.path(str(side / "rejects.parquet")),
            "num_exact_duplicates": len(result.duplicates),
            "image_facts_version": facts_version() or "",
            "num_facts_reused": result.n_reused,
            "facts_reused_from": known_from,
            "dagster/row_count": len(images),
        },
    )


@dg.asset(
    partitions_def=dataset_version,
    group_name="data",
    kinds={"pandas"},
    dagster_type=SplitsTable,
    description="image_id -> split (train / val_select / val_calib / val_test), near-duplicate groups kept together, "
    "sticky across versions.",
)
def splits(
    context: dg.AssetExecutionContext,
    split_settings: SplitSettings,
    image_table: pd.DataFrame,
    store: ArtifactStore,
) -> dg.Output:
    from roadwork_core.data.splits import (
        QUARANTINE_COLUMNS,
        SplitConfig,
        assign_splits,
        missing_group_column,
        split_history,
    )
    from roadwork_core.metrics.embed import markdown_images
    from roadwork_core.metrics.stage_plots import split_composition

    version = context.partition_key
    prev_version, previous = previous_split_history(context.instance, version)
    _require_earlier_splits(context, prev_version)
    refuse_late_version(context.instance, version)
    # Sticky to every image an earlier version assigned (vanished ones too), and to this version's own
    # last splits: materializing a version again never moves an image, whatever settings changed.
    reference = _with_own_history(previous, own_split_history(context.instance, version))
    # images a later version already placed (this older version split again, its drop grown in place) follow it
    later = later_split_placements(context.instance, version, image_table["image_id"])
    if later is not None:
        known = reference["image_id"] if reference is not None else pd.Series([], dtype=str)
        later = later[~later["image_id"].isin(known)]
        if len(later):
            base = reference if reference is not None else later.iloc[:0]
            reference = pd.concat([base, later.reindex(columns=base.columns)], ignore_index=True)
    group_warning = missing_group_column(image_table, split_settings.group_column or None)
    if group_warning:
        context.log.warning(group_warning)
    table = assign_splits(
        image_table,
        SplitConfig(
            ratios=split_settings.ratios(),
            radius=split_settings.radius,
            group_column=split_settings.group_column or None,
        ),
        previous=reference,
    )
    history = split_history(table, reference, version, group_column=split_settings.group_column or None)
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    # quarantined images (they bridge near-duplicates in two splits) form this asset's rejects table
    rejects = pd.DataFrame(table.attrs.get("quarantined", []), columns=QUARANTINE_COLUMNS)
    side = store.side_dir("splits", context.partition_key)
    atomic_write_bytes(side / "rejects.parquet", rejects.to_parquet(index=False))
    atomic_write_bytes(side / "history.parquet", history.to_parquet(index=False))
    if len(rejects):
        context.log.warning(
            f"{len(rejects)} images quarantined (bridge two splits); see {side / 'rejects.parquet'}"
        )
    relabelled = relabelled_images(table, reference)
    atomic_write_bytes(side / "relabelled.parquet", relabelled.to_parquet(index=False))
    if len(relabelled):
        context.log.warning(
            f"{len(relabelled)} images carry another label than an earlier version gave them (a labels.csv "
            f"edited in place?): they keep their split and take the new label; see {side / 'relabelled.parquet'}"
        )
    return dg.Output(
        table,
        metadata={
            "num_relabelled": len(relabelled),
            "relabelled": md_table(relabelled),
            "num_quarantined": len(rejects),
            "quarantined": md_table(rejects),
            "rejects_path": dg.MetadataValue.path(str(side / "rejects.parquet")),
            "previous_version": prev_version or "(none)",
            "group_column_missing": group_warning or "no",
            # every image assigned up to this version, vanished ones included: the next version's reference
            "history_path": dg.MetadataValue.path(str(side / "history.parquet")),
            "num_vanished_anchors": len(history) - len(table),
            "counts": md_table(counts.reset_index()),
            "num_groups": int(table["group_id"].nunique()),
            "composition": dg.MetadataValue.md(
                markdown_images([("split composition", split_composition(table))])
            ),
            "dagster/row_count": len(table),
        },
    )


# `splits` of a later version waits for an earlier version being split by another run: while that run is
# started, up to _MAX_WAITS x _WAIT_SECONDS; while it is only queued, _QUEUED_WAITS times (it may be queued
# behind this very run: the retrain queue runs one at a time, so it would start only once this one ends).
_WAIT_SECONDS = 10
_MAX_WAITS = 60
_QUEUED_WAITS = 3
_STARTED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
_QUEUED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]


def relabelled_images(table: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """Images of `table` whose label differs from the one the split history (`reference`) recorded:
    image_id, file, split, label_before, label_now. An edit in place of an earlier drop's labels.csv is
    otherwise silent (a new copy of the same bytes with the other label is a `label_conflict` reject)."""
    columns = ["image_id", "file", "split", "label_before", "label_now"]
    if reference is None or "label" not in reference.columns or not len(table):
        return pd.DataFrame(columns=columns)
    before = pd.to_numeric(
        reference.drop_duplicates("image_id", keep="last").set_index("image_id")["label"], errors="coerce"
    )
    now = table.set_index("image_id")
    common = now.index.intersection(before.index[before.notna()])
    changed = common[before.loc[common].to_numpy() != pd.to_numeric(now.loc[common, "label"]).to_numpy()]
    out = now.loc[changed].reset_index()
    return pd.DataFrame(
        {
            "image_id": out["image_id"],
            "file": out["file"] if "file" in out else "",
            "split": out["split"],
            "label_before": before.loc[changed].astype(int).to_numpy(),
            "label_now": out["label"].astype(int).to_numpy(),
        },
        columns=columns,
    )


def _with_own_history(previous: pd.DataFrame | None, own: pd.DataFrame | None) -> pd.DataFrame | None:
    """This version's own last history, plus the images only the earlier versions' history holds. Where
    the two disagree (an earlier version's splits made again after this one was split), this version's
    own splits win: materializing a version again never moves an image it placed."""
    if own is None or len(own) == 0:
        return previous
    if previous is None or len(previous) == 0:
        return own
    extra = previous[~previous["image_id"].isin(own["image_id"])]
    return pd.concat([own, extra.reindex(columns=own.columns)], ignore_index=True)


def refuse_late_version(instance: dg.DagsterInstance, version: str) -> None:
    late = late_versions(instance, [version])
    if late:
        holder = held_drops(instance).get(version)
        raise dg.Failure(description=late_version_message(version, late[version], held_by=holder))


def _require_earlier_splits(context: dg.AssetExecutionContext, prev_version: str | None) -> None:
    """Sticky splits need every earlier version's splits first: an earlier version still without
    them would later be assigned without knowing this one, and an image could differ between the two.
    Wait (retry) while such a version is being materialized by another run; otherwise fail, saying what to do."""
    current = context.partition_key
    from roadwork_core.data.drops import version_key  # natural order: v2 < v10

    missing = [
        v
        for v in sorted(context.instance.get_dynamic_partitions(dataset_version.name), key=version_key)
        if version_key(prev_version or "") < version_key(v) < version_key(current)
    ]
    if not missing:
        return

    def runs_of(statuses: list[dg.DagsterRunStatus]) -> dict[str, list[str]]:
        found = {
            v: [
                r.run_id
                for r in context.instance.get_runs(
                    dg.RunsFilter(statuses=statuses, tags={"dagster/partition": v})
                )
            ]
            for v in missing
        }
        return {v: ids for v, ids in found.items() if ids}

    attempt = getattr(context, "retry_number", 0)
    started = runs_of(_STARTED)
    queued = {} if started else runs_of(_QUEUED)
    if started and attempt < _MAX_WAITS:
        context.log.info(
            f"waiting for the splits of earlier version(s) {sorted(started)}, being materialized by other runs"
        )
        raise dg.RetryRequested(max_retries=_MAX_WAITS, seconds_to_wait=_WAIT_SECONDS)
    if queued and attempt < _QUEUED_WAITS:  # a run about to start; one queued behind this run never will
        context.log.info(f"waiting for the queued run(s) of earlier version(s) {sorted(queued)} to start")
        raise dg.RetryRequested(max_retries=_MAX_WAITS, seconds_to_wait=_WAIT_SECONDS)
    if started or queued:
        what = (
            "still running"
            if started
            else "still queued (perhaps behind this run: retrain runs go one at a time)"
        )
        ids = {v: [i[:8] for i in ids] for v, ids in (started or queued).items()}
        raise dg.Failure(
            description=(
                f"splits for {current} must be made after the splits of the earlier dataset version(s) "
                f"{sorted(ids)}, whose run(s) {ids} are {what} after {attempt * _WAIT_SECONDS} s of waiting. This run "
                f"stops so that they can go on; materialize {current} again once they have finished (runs for "
                "several versions are best launched oldest first, or as one backfill)"
            )
        )
    raise dg.Failure(
        description=(
            f"splits for {current} must stay sticky to the earlier dataset version(s) {missing}, whose splits were "
            f"never materialized. Materialize `splits` for {missing} first (oldest first), or delete those "
            f"partitions if the drops are gone."
        )
    )


def _result(outcome, **extra) -> dg.AssetCheckResult:
    metadata = {**outcome.metadata, **extra}
    return dg.AssetCheckResult(
        passed=bool(outcome.passed),
        severity=dg.AssetCheckSeverity.ERROR,
        description=outcome.message,
        metadata={
            k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v for k, v in metadata.items()
        },
    )


def _split_check(description: str):
    return dg.asset_check(
        asset=splits, blocking=True, partitions_def=dataset_version, description=description
    )


@_split_check("no image (by content hash) in two splits")
def check_no_shared_images(splits: pd.DataFrame) -> dg.AssetCheckResult:
    from roadwork_core.data import split_checks

    return _result(split_checks.check_no_shared_images(splits))


@_split_check(
    "no near-duplicate pair (phash within the radius, flips and quarter turns included) across splits, "
    "nor with a previous version's image that is no longer in the table"
)
def check_no_near_duplicates_across_splits(
    context: dg.AssetCheckExecutionContext, split_settings: SplitSettings, splits: pd.DataFrame
) -> dg.AssetCheckResult:
    from roadwork_core.data import split_checks

    _, previous = previous_split_history(context.instance, context.partition_key)
    return _result(
        split_checks.check_no_near_duplicates_across_splits(
            splits,
            radius=split_settings.radius,
            previous=previous,
            group_column=split_settings.group_column or None,
        )
    )


@dg.asset_check(
    asset=splits,
    blocking=False,
    partitions_def=dataset_version,
    description=(
        "near-identical pairs (within half the near-duplicate radius) carry the same label "
        "(a warning: a person has to look at each pair)"
    ),
)
def check_near_duplicate_labels_agree(
    split_settings: SplitSettings, splits: pd.DataFrame
) -> dg.AssetCheckResult:
    from roadwork_core.data import split_checks

    outcome = split_checks.check_near_duplicate_labels_agree(splits, radius=split_settings.radius // 2)
    result = _result(outcome)
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=result.description,
        metadata=result.metadata,
    )


@_split_check("each split's positive rate within the tolerance of the overall rate")
def check_label_balance(split_settings: SplitSettings, splits: pd.DataFrame) -> dg.AssetCheckResult:
    from roadwork_core.data import split_checks

    return _result(split_checks.check_label_balance(splits, tolerance=split_settings.balance_tolerance))


@_split_check("at least min_per_class images of each class in each split")
def check_min_per_class(split_settings: SplitSettings, splits: pd.DataFrame) -> dg.AssetCheckResult:
    from roadwork_core.data import split_checks

    return _result(split_checks.check_min_per_class(splits, min_count=split_settings.min_per_class))


@_split_check("no image moved split since the previous dataset version")
def check_sticky_splits(context: dg.AssetCheckExecutionContext, splits: pd.DataFrame) -> dg.AssetCheckResult:
    from roadwork_core.data import split_checks

    prev_version, previous = previous_split_history(context.instance, context.partition_key)
    later = later_split_placements(context.instance, context.partition_key, splits["image_id"])
    if later is not None:  # a later version's placements bind an earlier version split again too
        later = later[~later["image_id"].isin(previous["image_id"])] if previous is not None else later
        previous = (
            later if previous is None else pd.concat([previous, later.reindex(columns=previous.columns)])
        )
    if previous is None:
        return dg.AssetCheckResult(passed=True, description="first dataset version: nothing to compare with")
    return _result(
        split_checks.check_sticky(splits, previous), previous_version=prev_version or "(later only)"
    )


SPLIT_CHECKS = [
    check_no_shared_images,
    check_no_near_duplicates_across_splits,
    check_label_balance,
    check_min_per_class,
    check_sticky_splits,
    check_near_duplicate_labels_agree,
]


def failed_split_checks(
    instance: dg.DagsterInstance, partition: str
) -> tuple[str | None, list[str], list[str]]:
    """(run id, failed, not run): the blocking checks of `splits` whose latest evaluation on the latest
    `splits` materialization of `partition` failed, and those never evaluated on it (a run that selected
    `splits` without its checks: a GraphQL launch with no check selected, `.without_checks()`, a step subset).
    The latest counts: a check executed again later (from the UI, after a split setting changed) and passing
    clears it."""
    from dagster._core.event_api import PartitionKeyFilter  # the storage's own filter (no public alias yet)

    key = dg.AssetKey("splits")
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return None, [], []
    materialization = records[0]
    blocking = sorted({spec.name for checks in SPLIT_CHECKS for spec in checks.check_specs if spec.blocking})
    failed, failed_in, evaluated = [], materialization.run_id, set()
    for name in blocking:
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(key, name), limit=20, partition_filter=PartitionKeyFilter(key=partition)
        )  # newest first
        for record in history:
            evaluation = (
                record.event.dagster_event.event_specific_data
                if record.event and record.event.dagster_event
                else None
            )
            if not isinstance(evaluation, dg.AssetCheckEvaluation) or evaluation.partition not in (
                None,
                partition,
            ):
                continue  # planned, or another partition
            target = evaluation.target_materialization_data
            on_this = (
                target.storage_id == materialization.storage_id
                if target
                else record.run_id == materialization.run_id
            )
            if on_this:
                evaluated.add(name)
                if not evaluation.passed:
                    failed.append(name)
                    failed_in = record.run_id
                break
    return failed_in, failed, [name for name in blocking if name not in evaluated]


def require_green_splits(context: dg.AssetExecutionContext) -> None:
    """Every asset that reads `splits` calls this first: a blocking check stops downstream steps in the run
    that failed it, but a later run selecting only downstream assets (`--select 'classifier*'`) would
    otherwise train and release on splits the contract rejected."""
    run_id, failed, not_run = failed_split_checks(context.instance, context.partition_key)
    if failed:
        raise dg.Failure(
            description=(
                f"the splits of {context.partition_key} failed their blocking check(s) {failed} (run {run_id[:8]}); "
                "nothing may train, calibrate or release on them. Fix the drop or the split settings and "
                "materialize `splits` again (its checks run with it)"
            )
        )
    if not_run:
        raise dg.Failure(
            description=(
                f"the splits of {context.partition_key} (run {run_id[:8]}) were materialized without their blocking "
                f"check(s) {not_run}: nothing may train, calibrate or release on splits the contract has not "
                "passed. Execute them (UI: asset `splits`, Checks, Execute) or materialize `splits` again with "
                f"its checks: dagster asset materialize --select splits --partition {context.partition_key}"
            )
        )
