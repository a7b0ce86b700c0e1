"""Drift monitoring as a run: `drift_job` embeds the monitored images with the released bundle.

A sensor tick must stay short (Dagster stops a sensor evaluation after 60 s by default), and embedding 256
monitored plus 256 training images in 10 views each with a ViT-B takes minutes on a code server's CPU. So
`drift_sensor` only notices that the monitoring folder changed and launches `drift_job`; the job runs on
the `gpu` resource's device, records its figures as an observation of `drift_report` (the UI's asset
catalog shows each one), and `drift_retrain_sensor` turns a significant one into a retrain request.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg

from roadwork_resources.gpu import GPUResource
from roadwork_resources.settings import DriftSettings

DRIFT_REPORT = dg.AssetKey("drift_report")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def monitor_files(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if folder.is_dir()
        else []
    )


def monitor_fingerprint(files: list[Path]) -> str:
    """Which files the folder holds and when each last changed (no content read)."""
    return hashlib.sha256("\n".join(f"{p}:{p.stat().st_mtime_ns}" for p in files).encode()).hexdigest()[:16]


def release_to_compare(instance: dg.DagsterInstance):
    """(the release, its `splits` artifact path or None, why not) of the model in production: the newest
    version's release, not that version's latest bundle (a retrain still queued, running or failed has none,
    and a bundle whose checks failed is no release), with the splits it was made from."""
    from roadwork_assets.lineage import materialization_metadata, walk_lineage
    from roadwork_assets.released import BUNDLE_KEY, released_bundle

    released = released_bundle(instance)
    if released is None:
        return None, None, "no released bundle yet: nothing to compare with"
    splits_path = materialization_metadata(
        instance, walk_lineage(instance, {BUNDLE_KEY: released.storage_id}, released.partition), "splits"
    ).get("path")
    if not splits_path:
        return (
            released,
            None,
            f"the release of {released.partition} (run {released.run_id[:8]}) has no recorded `splits` "
            "materialization to take its training images from; materialize the graph for that version again",
        )
    return released, splits_path, ""


@dg.op(
    description="Embeds the monitored images and a sample of the released bundle's training images with "
    "that bundle (on the gpu resource's device) and tests for drift: MMD permutation test on embeddings, PSI "
    "and KS on prediction scores. Records the figures as an observation of drift_report.",
)
def drift_check(context: dg.OpExecutionContext, drift: DriftSettings, gpu: GPUResource) -> None:
    from roadwork_core.workflows.drift_check import compare_with_training
    from roadwork_resources.io_manager import read_artifact
    from roadwork_resources.paths import state_root

    gpu.setup()
    files = monitor_files(drift.monitor_path)
    if len(files) < drift.min_images:
        raise dg.Failure(
            f"{len(files)} images in {drift.monitor_path}; the drift tests need {drift.min_images} "
            "(drift.min_images)"
        )
    released, splits_path, why = release_to_compare(context.instance)
    if splits_path is None:
        raise dg.Failure(why)
    from roadwork_core.bundle.verify import verify_bundle

    try:  # the release itself: a directory that now holds another bundle must not stand in for it
        found = verify_bundle(released.path).content_sha256
    except Exception as err:  # noqa: BLE001  whatever is wrong with it, it is named
        raise dg.Failure(
            f"the release of {released.partition} at {released.path} cannot be read: {err}"
        ) from err
    if found != released.bundle_id:
        raise dg.Failure(
            f"{released.path} holds bundle {found[:12]}, not the release of {released.partition} "
            f"({released.bundle_id[:12]}, run {released.run_id[:8]}): it was replaced after release. Materialize "
            f"`bundle` for {released.partition} again with its checks"
        )
    result = compare_with_training(
        released.path,
        read_artifact(Path(splits_path)),
        [str(p) for p in files],
        sample=drift.sample,
        alpha=drift.alpha,
        psi_threshold=drift.psi_threshold,
        n_permutations=drift.n_permutations,
        cache_dir=state_root() / "drift_cache",
        device=gpu.torch_device(),
    )
    summary = (
        f"{'significant drift' if result.drifted else 'no significant drift'} against the release of "
        f"{released.partition} (run {released.run_id[:8]}): MMD p={result.mmd_pvalue:.3g}, "
        f"PSI={result.psi:.3g}, KS p={result.ks_pvalue:.3g}"
    )
    context.log.info(summary)
    context.log_event(
        dg.AssetObservation(
            asset_key=DRIFT_REPORT,
            description=summary,
            metadata={
                "drifted": bool(result.drifted),
                "mmd_pvalue": float(result.mmd_pvalue),
                "psi": float(result.psi),
                "ks_pvalue": float(result.ks_pvalue),
                "release": f"{released.partition} (run {released.run_id})",
                "monitor_dir": str(drift.monitor_path),
                "monitored_images": len(files),
                "monitor_fingerprint": monitor_fingerprint(files),
                "tags": json.dumps(result.as_tags()),
            },
        )
    )


@dg.job(
    tags={"roadwork/queue": "drift"},
    description="One drift check of the monitoring folder against the released bundle (drift_sensor launches "
    "it when the folder changes); drift_retrain_sensor reads its drift_report observation.",
)
def drift_job() -> None:
    drift_check()
