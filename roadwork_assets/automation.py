"""Automation: the retrain job, the new-drop sensor, the weekly schedule, the drift sensors (drift_sensor
launches roadwork_assets.monitoring.drift_job; drift_retrain_sensor turns a significant drift into a
retrain), the MLflow run closer and the dead-run slot reaper. The new-drop and drift sensors and the schedule are
off by default; turn them on in the UI (Automation tab) or with `dagster sensor start new_drop_sensor`."""

import hashlib
import json
import os
from pathlib import Path
from typing import TypeVar

import dagster as dg
import yaml

from roadwork_assets._util import held_drops, late_version_message, late_versions
from roadwork_assets.monitoring import (
    DRIFT_REPORT,
    drift_job,
    monitor_files,
    monitor_fingerprint,
    release_to_compare,
)
from roadwork_assets.partitions import dataset_version
from roadwork_resources.dataset import DatasetSource
from roadwork_resources.settings import DriftSettings, RetrainSettings

ResourceT = TypeVar("ResourceT", bound=dg.ConfigurableResource)

# Every retrain run carries this tag; dagster.yaml's `concurrency.runs.tag_concurrency_limits` lets one
# such run out of the queue at a time (by default), so a burst of drops does not thrash a small machine.
RETRAIN_QUEUE_TAG = {"roadwork/queue": "retrain"}

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.all(),
    partitions_def=dataset_version,
    tags=RETRAIN_QUEUE_TAG,
    description="Every asset of one dataset version, from image_table to evaluation_report. Each tracked "
    "asset carries the MLflow step hooks (roadwork_resources.mlflow_tracking), so the MLflow run ends FINISHED "
    "or FAILED with the Dagster run. Runs queue one at a time (tag roadwork/queue=retrain, dagster.yaml).",
)


def _interval_seconds(variable: str, default: int) -> int:
    raw = os.environ.get(variable, str(default))
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{variable}={raw!r} must be a whole number of seconds >= 1 (default {default})")
    return seconds


def _nothing_new(inbox: Path, seen: int) -> str:
    """The skip reason of a tick that found no new drop; a missing inbox is named (a typo in ROADWORK_INBOX
    or dataset.inbox looked like an empty inbox, tick after tick)."""
    if not inbox.exists():
        return f"the inbox {inbox} does not exist: check ROADWORK_INBOX / resources.dataset.config.inbox"
    if not inbox.is_dir():
        return f"the inbox {inbox} is not a folder: check ROADWORK_INBOX / resources.dataset.config.inbox"
    return f"no new complete drop in {inbox} ({seen} seen)"


def retrain_cron() -> str:
    """The weekly_retrain schedule: ROADWORK_RETRAIN_CRON (default Mondays 03:00). An invalid one is named
    here; Dagster's own error named the schedule, not the variable, and stopped the code location loading."""
    from dagster._utils.schedules import is_valid_cron_schedule

    cron = os.environ.get("ROADWORK_RETRAIN_CRON", "").strip() or "0 3 * * 1"
    if not is_valid_cron_schedule(cron):
        raise ValueError(
            f"ROADWORK_RETRAIN_CRON={cron!r} is not a cron schedule; write five fields, e.g. '0 3 * * 1' "
            "(Mondays 03:00), or unset it"
        )
    return cron


def drop_sensor_interval_seconds() -> int:
    """How often new_drop_sensor looks at the inbox: ROADWORK_DROP_SENSOR_INTERVAL seconds (default 30).
    Read when the code location loads, so set it where `dagster dev` / `dagster-daemon` start."""
    return _interval_seconds("ROADWORK_DROP_SENSOR_INTERVAL", 30)


def slot_reaper_interval_seconds() -> int:
    """How often dead_run_slot_reaper looks for pool slots held by dead runs:
    ROADWORK_SLOT_REAPER_INTERVAL seconds (default 20), read where the code location loads. Each tick
    reads the claimed slots and checks the holders' processes: a few milliseconds with nothing held."""
    return _interval_seconds("ROADWORK_SLOT_REAPER_INTERVAL", 20)


def automation_run_config() -> dict:
    """Run config for runs that sensors and the schedule launch: the YAML at ROADWORK_RUN_CONFIG
    (for example configs/demo.yaml), or the assets' defaults."""
    path = os.environ.get("ROADWORK_RUN_CONFIG")
    if not path:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(
            f"ROADWORK_RUN_CONFIG={path}: cannot read it ({exc.strerror}); point it at a run config YAML "
            "(e.g. configs/demo.yaml) or unset it for the assets' defaults"
        ) from None
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"ROADWORK_RUN_CONFIG={path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"ROADWORK_RUN_CONFIG={path} must hold a YAML mapping (ops:, resources:)")
    return config


def as_runs_see_it(resource: ResourceT, key: str) -> ResourceT:
    """`resource` as the runs a sensor launches will have it: when ROADWORK_RUN_CONFIG configures
    `resources.<key>`, Dagster builds that resource from the run config alone (its other fields take their
    defaults; an empty path field, the Definitions' folder), so the sensor watches the same inbox and applies
    the same settings as the runs it requests."""
    import pydantic

    from roadwork_resources.paths import resolve_env_values

    section = (automation_run_config().get("resources") or {}).get(key)
    if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
        return resource
    try:
        return type(resource)(**resolve_env_values(section["config"]))
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(
            f"ROADWORK_RUN_CONFIG={os.environ.get('ROADWORK_RUN_CONFIG')}: resources.{key}.config is not valid "
            f"({problems}); fix it there, it is what the sensor's runs would use"
        ) from None


def resources_run_config() -> dict:
    """Only the `resources:` of ROADWORK_RUN_CONFIG: for drift_job, whose one op is not in a retrain config."""
    resources = automation_run_config().get("resources")
    return {"resources": resources} if resources else {}


def _already_released(instance: dg.DagsterInstance, dataset: DatasetSource, versions: list[str]) -> list[str]:
    """The versions whose partition has a released bundle built from exactly the files there now."""
    from roadwork_assets.released import released_bundle
    from roadwork_core.data.fingerprint import version_fingerprint

    existing = set(instance.get_dynamic_partitions(dataset_version.name))
    done = []
    for version in versions:
        released = released_bundle(instance, partition=version) if version in existing else None
        if released and released.source_fingerprint == version_fingerprint(
            dataset.drops_for_version(version)
        ):
            done.append(version)
    return done


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=drop_sensor_interval_seconds(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="A new complete drop (<inbox>/<version>/_READY) adds a dataset_version partition and a retrain "
    "run, unless that partition already has a released bundle built from the same files.",
)
def new_drop_sensor(
    context: dg.SensorEvaluationContext, dataset: DatasetSource, retrain: RetrainSettings
) -> dg.SensorResult | dg.SkipReason:
    from roadwork_core.data.drops import version_key
    from roadwork_core.data.fingerprint import drop_signature

    dataset, retrain = as_runs_see_it(dataset, "dataset"), as_runs_see_it(retrain, "retrain")
    launched, settling = _read_cursor(context.cursor)  # drop -> its signature when its run was requested
    ready = dataset.ready_drops()
    signatures = {v: drop_signature(dataset.inbox_path / v) for v in ready}
    seen = set(launched)
    new = [v for v in ready if v not in seen]
    # A launched drop whose files changed since (its _READY was copied before the rest, a file replaced) is
    # read again once the change has settled (the same signature on two ticks in a row): the newest version,
    # which holds it, is trained again, once per settled change.
    changed = [v for v in ready if launched.get(v) not in (None, signatures[v])]
    settled = [v for v in changed if settling.get(v) == signatures[v]]
    settling = {v: signatures[v] for v in changed if v not in settled}
    # A changed drop whose partition was deleted since its run (a drop withdrawn, then delivered again) is a
    # new drop again: its partition is added back and it is trained (the newest other version holds none of it)
    again = [v for v in settled if not context.instance.has_dynamic_partition(dataset_version.name, v)]
    settled = [v for v in settled if v not in again]
    new = sorted([*new, *again], key=version_key)
    # A drop folder whose name cannot be a partition key, or that sorts before a version already split (a late
    # drop: splitting it would let that version's splits move), is named on every tick until it is renamed.
    # a drop without a partition of its own that a split version's image table holds is trained with that
    # version: not new, not late
    held = held_drops(context.instance)
    new = [v for v in new if v not in held or context.instance.has_dynamic_partition(dataset_version.name, v)]
    late = late_versions(context.instance, new)
    new = [v for v in new if v not in late]
    problems = [f"drop folder '{name}' {why}" for name, why in dataset.unusable_drops().items()]
    problems += [late_version_message(v, newest, held_by=held.get(v)) for v, newest in late.items()]
    unusable = "; ".join(problems)
    if unusable:
        context.log.warning(unusable)
    recorded = {v: launched.get(v) for v in sorted(seen, key=version_key)}
    recorded.update({v: signatures[v] for v in [*new, *settled] if v in signatures})
    recorded.update({v: signatures[v] for v in seen if v in signatures and recorded[v] is None})
    cursor = _write_cursor(recorded, settling)
    waiting = (
        f"drop(s) {', '.join(sorted(settling, key=version_key))} changed since their run was requested; "
        "retrained once they stay unchanged for one tick"
        if settling
        else ""
    )
    partitions = [v for v in ready if context.instance.has_dynamic_partition(dataset_version.name, v)]
    if settled and not new and partitions:
        newest = max(partitions, key=version_key)
        if not retrain.force_retrain and _already_released(context.instance, dataset, [newest]):
            context.update_cursor(cursor)
            return dg.SkipReason(
                f"drop(s) {', '.join(settled)} changed, but {newest} already has a released bundle built from "
                "exactly these files; not retrained"
            )
        key = hashlib.sha256("".join(signatures[v] for v in sorted(settled)).encode()).hexdigest()[:12]
        context.log.info(
            f"drop(s) {', '.join(settled)} changed since their run was requested: retraining {newest}"
        )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    partition_key=newest,
                    run_key=f"drop-{newest}-changed-{key}",
                    run_config=automation_run_config(),
                    tags={"roadwork/trigger": "changed_drop", "roadwork/changed_drops": ",".join(settled)},
                )
            ],
            cursor=cursor,
        )
    if not new:
        if cursor != (context.cursor or ""):
            context.update_cursor(cursor)  # signatures recorded, or a change waiting to settle
        return dg.SkipReason(
            (waiting or _nothing_new(dataset.inbox_path, len(ready))) + (f". {unusable}" if unusable else "")
        )
    released = [] if retrain.force_retrain else _already_released(context.instance, dataset, new)
    skipped = (
        f"drop(s) {', '.join(released)} already have a released bundle built from the same files; not retrained "
        "(ROADWORK_FORCE_RETRAIN=1 or the `retrain` resource's force_retrain retrains them)"
        if released
        else ""
    )
    to_train = [v for v in new if v not in released]
    if not to_train:
        context.update_cursor(cursor)
        return dg.SkipReason(skipped)
    if skipped:
        context.log.info(skipped)
    existing = set(context.instance.get_dynamic_partitions(dataset_version.name))
    to_add = [v for v in to_train if v not in existing]
    run_config = automation_run_config()
    tags = {
        "roadwork/trigger": "new_drop",
        **({"roadwork/force_retrain": "true"} if retrain.force_retrain else {}),
    }
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                partition_key=v,
                run_key=_new_drop_run_key(context.instance, v, v in again, signatures, retrain.force_retrain),
                run_config=run_config,
                tags=tags,
            )
            for v in to_train
        ],
        dynamic_partitions_requests=[dataset_version.build_add_request(to_add)] if to_add else [],
        cursor=cursor,
    )


def _new_drop_run_key(
    instance: dg.DagsterInstance,
    version: str,
    delivered_again: bool,
    signatures: dict[str, str],
    forced: bool,
) -> str:
    """`drop-<version>`. Dagster skips a run request whose key it has seen, so a drop delivered again after its
    partition was deleted gets a key of its own (`drop-<version>-again-<hash>`), and so does a forced retrain
    (`drop-<version>-forced-<n>`, n counting the forced runs of that version): forcing drops the sensor has
    already run, after its cursor was reset, would otherwise be skipped without a word."""
    if forced:
        earlier = instance.get_runs_count(
            dg.RunsFilter(tags={"dagster/partition": version, "roadwork/force_retrain": "true"})
        )
        return f"drop-{version}-forced-{earlier + 1}"
    if not delivered_again:
        return f"drop-{version}"
    return f"drop-{version}-again-{hashlib.sha256(signatures[version].encode()).hexdigest()[:12]}"


def _read_cursor(cursor: str | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """The new-drop sensor's cursor: ({drop: the signature (`drop_signature`) its files had when its run was
    requested}, {drop: the signature of a change not yet settled}). A cursor of an earlier release (a JSON
    list of drop names) reads with no signatures: those drops are not launched again, and the next tick
    records their signatures."""
    if not cursor:
        return {}, {}
    value = json.loads(cursor)
    if isinstance(value, list):
        return {str(v): None for v in value}, {}
    launched = value.get("launched", {})
    return {str(k): (str(v) if v else None) for k, v in launched.items()}, dict(value.get("settling", {}))


def _write_cursor(launched: dict[str, str | None], settling: dict[str, str]) -> str:
    return json.dumps({"launched": launched, "settling": settling})


def _latest_version(instance: dg.DagsterInstance) -> str | None:
    """The newest dataset version to retrain, passing over a partition whose drop folder is still being
    uploaded (there, but without `_READY`: added from the UI early). Its run could only fail ('not a ready
    drop'), and the schedule and drift retrains never reached the real newest version while it stood."""
    from roadwork_core.data.drops import READY, version_key

    inbox = as_runs_see_it(DatasetSource(), "dataset").inbox_path
    versions = [
        v
        for v in instance.get_dynamic_partitions(dataset_version.name)
        if not ((inbox / v).is_dir() and not (inbox / v / READY).is_file())
    ]
    return max(versions, key=version_key) if versions else None


@dg.schedule(
    job=retrain_job,
    cron_schedule=retrain_cron(),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain the latest dataset version (weekly by default; ROADWORK_RETRAIN_CRON changes it).",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext):
    latest = _latest_version(context.instance)
    if latest is None:
        return dg.SkipReason("no dataset_version partition yet")
    return dg.RunRequest(
        partition_key=latest,
        run_config=automation_run_config(),
        tags={"roadwork/trigger": "schedule"},
    )


@dg.sensor(
    job=drift_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="When the monitoring folder (drift.monitor_dir) changed, launches drift_job: it embeds the "
    "monitored and the released bundle's training images and tests for drift (MMD on embeddings, PSI and KS on "
    "scores); drift_retrain_sensor requests a retrain of the latest version when the drift is significant.",
)
def drift_sensor(context: dg.SensorEvaluationContext, drift: DriftSettings) -> dg.RunRequest | dg.SkipReason:
    """Cheap on purpose (a listing and two event-log reads): the embedding runs in drift_job, not in the tick."""
    drift = as_runs_see_it(drift, "drift")
    files = monitor_files(drift.monitor_path)
    if len(files) < drift.min_images:
        return dg.SkipReason(f"{len(files)} images in {drift.monitor_path}; need {drift.min_images}")
    fingerprint = monitor_fingerprint(files)
    earlier = context.instance.get_runs(
        dg.RunsFilter(job_name=drift_job.name, tags={"roadwork/monitor_fingerprint": fingerprint})
    )  # newest first
    if context.cursor == fingerprint and not (
        earlier and earlier[0].status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    ):
        return dg.SkipReason("monitoring folder unchanged since the last evaluation")
    released, splits_path, why = release_to_compare(context.instance)
    if splits_path is None:
        return dg.SkipReason(why)
    context.update_cursor(fingerprint)
    return (
        dg.RunRequest(  # a check of this folder that failed is tried again (a new run key) on the next tick
            run_key=f"drift-check-{fingerprint}-{len(earlier)}",
            run_config=resources_run_config(),
            tags={
                "roadwork/trigger": "drift_check",
                "roadwork/monitor_fingerprint": fingerprint,
                "roadwork/release": f"{released.partition}:{released.run_id}",
            },
        )
    )


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reads each new drift_report observation (written by drift_job); a significant drift requests a "
    "retrain of the latest dataset version with the figures as run tags roadwork/drift_*.",
)
def drift_retrain_sensor(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=DRIFT_REPORT, after_storage_id=after), limit=100
    ).records  # newest first: every check since the last tick counts, a drifted one first
    if not records:
        return dg.SkipReason(
            "no drift check since the last evaluation"
            if after
            else "no drift check has run yet (drift_sensor launches drift_job)"
        )
    context.update_cursor(str(records[0].storage_id))
    metas = [{k: v.value for k, v in (r.asset_observation.metadata or {}).items()} for r in records]
    meta = next((m for m in metas if m.get("drifted")), metas[0])
    figures = f"MMD p={meta.get('mmd_pvalue', float('nan')):.3g}, PSI={meta.get('psi', float('nan')):.3g}, KS p={meta.get('ks_pvalue', float('nan')):.3g}"
    if not meta.get("drifted"):
        return dg.SkipReason(f"no significant drift ({figures}; release {meta.get('release')})")
    version = _latest_version(context.instance)
    if version is None:
        return dg.SkipReason(f"significant drift ({figures}) but no dataset_version partition to retrain")
    return dg.RunRequest(
        partition_key=version,
        run_key=f"drift-{version}-{meta.get('monitor_fingerprint')}",
        run_config=automation_run_config(),
        tags={"roadwork/trigger": "drift", **json.loads(meta.get("tags") or "{}")},
    )


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks the MLflow run of a failed Dagster run FAILED (covers failures in steps without hooks, "
    "such as blocking asset checks).",
)
def mlflow_failed_run_closer(context: dg.RunFailureSensorContext) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from roadwork_resources.paths import default_mlflow_uri

    # the store the failed run logged to: its run config's (resources.mlflow.config), else the Definitions'
    config = ((context.dagster_run.run_config or {}).get("resources") or {}).get("mlflow") or {}
    uri = (config.get("config") or {}).get("mlflow_tracking_uri")
    if isinstance(uri, dict):  # {"env": "VAR"}, as Dagster's StringSource reads it
        uri = os.environ.get(str(uri.get("env")))
    mlflow.set_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri())
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]  # any experiment_name it was given
    if not experiments:
        return
    runs = client.search_runs(
        experiments, filter_string=f"tags.dagster_run_id = '{context.dagster_run.run_id}'"
    )
    for run in runs:
        if run.info.status != "FAILED":
            client.set_terminated(run.info.run_id, status="FAILED")


@dg.sensor(
    minimum_interval_seconds=slot_reaper_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Frees pool slots (pool gpu) held by runs whose process was killed (SIGKILL, OOM, reboot): marks "
    "such a run FAILED and frees its slots, so the next training step runs and resumes from the checkpoint. A "
    "STARTED run of this host whose process is gone is marked FAILED too, slot or none (then its MLflow run).",
)
def dead_run_slot_reaper(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    from roadwork_resources.pool_slots import free_slots_of_dead_runs

    lines: list[str] = []
    freed = free_slots_of_dead_runs(context.instance, "sensor dead_run_slot_reaper", log=lines.append)
    for line in lines:  # runs of other hosts only in the tick's text: they may well be alive
        if line.startswith("freed "):
            context.log.warning(line)
    if not lines:
        return dg.SkipReason("no pool slot is held by a dead run, and no run of this host is dead")
    return dg.SkipReason(f"freed {len(freed)} run(s): " + " | ".join(lines))
