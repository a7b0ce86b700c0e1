"""Concurrency: two runs on different partitions at once (two run workers, one instance, one state
folder, one MLflow store) do not interfere, and the `gpu` pool runs one training step at a time. The runs
are the suite's two-partitions scenario (tests/two_partitions.py: the daemon's sensor-launched runs on the
Postgres instance)."""

from __future__ import annotations

import json
from itertools import combinations

import dagster as dg
import mlflow
import pytest
import torch

from tests.two_partitions import VERSIONS

torch.set_num_threads(1)
# the Postgres test and test_security's secrets test read the same session fixture (two_partition_runs):
# one worker builds it
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_partition_runs")]


def _step_windows(
    instance: dg.DagsterInstance, run_id: str, steps: set[str]
) -> dict[str, tuple[float, float]]:
    """step key -> (STEP_START, STEP_SUCCESS) timestamps from the run's event log."""
    start, end = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key not in steps:
            continue
        if event.event_type_value == "STEP_START":
            start[entry.step_key] = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS":
            end[entry.step_key] = entry.timestamp
    return {k: (start[k], end[k]) for k in start if k in end}


def test_two_partitions_at_once_keep_their_own_artifacts_and_mlflow_runs(two_partition_runs) -> None:
    from roadwork_core.bundle.bundle import Bundle

    runs, state = two_partition_runs, two_partition_runs["state"]
    for version in VERSIONS:
        assert runs["results"][version]["success"], (
            f"run {version} failed:\n{runs['outputs'][version][-3000:]}"
        )
    print(f"two concurrent graph runs took {runs['seconds']:.1f}s")
    instance = runs["instance"]
    spans = {}
    for version in VERSIONS:
        stats = instance.get_run_stats(runs["results"][version]["run_id"])
        spans[version] = (stats.start_time, stats.end_time)
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, (
        f"the two runs did not overlap in time, nothing concurrent was tested: {spans}"
    )

    splits = {}
    for version in VERSIONS:
        for asset in ("image_table", "splits", "classifier", "calibrator", "bundle", "evaluation_report"):
            assert (state / "artifacts" / asset / version / "_artifact.json").is_file(), (
                f"{asset}/{version} missing"
            )
        bundle_dir = state / "artifacts" / "bundle" / version / "dir"
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        assert manifest["dataset_version"] == version, (
            f"bundle of {version} names {manifest['dataset_version']}"
        )
        Bundle.load(bundle_dir)  # every checksum verifies: no write of the other run landed in it
        from roadwork_resources.io_manager import read_artifact

        splits[version] = read_artifact(state / "artifacts" / "splits" / version)
        assert (state / "checkpoints" / "classifier" / version / "state.json").is_file()
    n1, n2 = len(splits["v0001"]), len(splits["v0002"])
    assert n2 > n1, f"v0002 accumulates v0001 + the new drop: {n1} vs {n2} images"
    sticky = splits["v0002"].set_index("image_id")["split"]
    old = splits["v0001"].set_index("image_id")["split"]
    assert (sticky.loc[old.index] == old).all(), "an image changed split between the concurrent versions"

    mlflow.set_tracking_uri(runs["mlflow_uri"])
    found = mlflow.search_runs(experiment_names=["roadwork"], output_format="list")
    by_dagster = {r.data.tags.get("dagster_run_id"): r for r in found}
    for version in VERSIONS:
        run = by_dagster.get(runs["results"][version]["run_id"])
        assert run is not None, f"no MLflow run for the Dagster run of {version}"
        assert run.info.status == "FINISHED", f"MLflow run of {version} is {run.info.status}"
        assert "classifier.mode" in run.data.params and any(k.startswith("test_") for k in run.data.metrics)
    ids = {by_dagster[runs["results"][v]["run_id"]].info.run_id for v in VERSIONS}
    assert len(ids) == 2, "the two Dagster runs share an MLflow run"


def test_feature_cache_is_shared_and_complete_for_both_partitions(two_partition_runs) -> None:
    from roadwork_core.models.serialization import load_classifier
    from roadwork_core.training.feature_cache import FeatureCache
    from roadwork_resources.io_manager import read_artifact

    state = two_partition_runs["state"]
    cache = FeatureCache(state / "feature_cache")
    assert not list(cache.root.rglob(".tmp-*")), "a partial cache entry is visible"
    needed = {}
    for version in VERSIONS:
        splits = read_artifact(state / "artifacts" / "splits" / version)
        ids = splits.loc[splits["split"].isin(["train", "val_select"]), "image_id"].tolist()
        model = load_classifier(read_artifact(state / "artifacts" / "classifier" / version))
        paths = [cache.path_for(k) for k in cache.keys_for(model, ids)]
        missing = [p for p in paths if not p.is_file()]
        assert not missing, (
            f"{len(missing)} of {len(paths)} cache entries of {version} missing, e.g. {missing[:2]}"
        )
        for path in paths[:5]:
            assert cache._read(path) is not None, f"cache entry {path} is unreadable"
        needed[version] = set(paths)
    shared = needed["v0001"] & needed["v0002"]
    assert shared, "the two partitions used no common cache entry although v0002 contains v0001's images"
    on_disk = set(cache.root.rglob("*.safetensors"))
    assert on_disk == needed["v0001"] | needed["v0002"], (
        f"{len(on_disk)} entries on disk vs {len(needed['v0001'] | needed['v0002'])} needed: "
        "entries were duplicated or orphaned by the concurrent runs"
    )


def test_gpu_pool_serializes_training_steps(two_partition_runs) -> None:
    from roadwork_assets.training import classifier, explora_backbone

    for asset in (explora_backbone, classifier):
        assert asset.op.pool == "gpu", (
            f"{asset.key.to_user_string()} must run in the `gpu` pool, not {asset.op.pool}"
        )

    instance = two_partition_runs["instance"]
    config = instance.get_concurrency_config()
    assert config.pool_config.default_pool_limit == 1, (
        "the instance file must give pools a default limit of 1"
    )
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert info.slot_count == 1, f"the gpu pool has {info.slot_count} slots, expected 1"
    assert info.active_slot_count == 0 and info.pending_step_count == 0, "slots were not released"

    training = {"explora_backbone", "classifier"}
    windows = []
    for version in VERSIONS:
        steps = _step_windows(instance, two_partition_runs["results"][version]["run_id"], training)
        assert set(steps) == training, f"run {version} lacks training step events: {steps}"
        windows += [(f"{version}:{k}", *v) for k, v in steps.items()]
    for (a, a0, a1), (b, b0, b1) in combinations(windows, 2):
        assert a1 <= b0 or b1 <= a0, (
            f"training steps overlapped although the gpu pool holds one slot: {a} [{a0:.2f}, {a1:.2f}] "
            f"and {b} [{b0:.2f}, {b1:.2f}]"
        )
