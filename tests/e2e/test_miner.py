"""A miner that stays up, and automation that respects what exists, on one released instance (the tiny
graph materialized up to `bundle` once for the module):

- `roadwork serve --latest` as a miner runs it: a real uvicorn process follows the Dagster instance's
  released bundle while a client sends requests without pause. A new release (the `bundle` asset
  materialized again, blocking checks green) is swapped in with zero failed requests; a bundle whose
  blocking check fails is never served and the released one keeps serving.
- new_drop_sensor under the real dagster-daemon (the suite's one daemon session with sensor-launched
  graph runs): a drop whose partition already has a released bundle built from the same files is
  skipped (the tick's reason names it); new drops copied into the inbox get their partitions and
  retrain runs, which leave the queue one at a time (dagster.yaml's tag concurrency limit on
  roadwork/queue=retrain); a complete drop's run materializes the whole graph and ends its MLflow run
  FINISHED, a broken drop's fails in image_table and ends it FAILED.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from roadwork_assets.definitions import build_resources
from roadwork_assets.partitions import dataset_version
from roadwork_assets.released import released_bundle
from roadwork_core.bundle.verify import verify_bundle
from tests.e2e.conftest import (
    REPO,
    RUN_TIMEOUT,
    TINY_CONFIG,
    UNSET_FOR_TESTS,
    dagster_bin,
    e2e_environment,
    free_port,
    mlflow_statuses,
    stop_process,
    tiny_run_config,
    wait_for,
)
from tests.integration.conftest import materialize

pytestmark = pytest.mark.slow


def _config(ops: set[str], **extra_ops) -> dict:
    """tests/configs/tiny.yaml restricted to the ops being materialized (Dagster refuses the others)."""
    config = tiny_run_config()
    config["ops"] = {k: v for k, v in config["ops"].items() if k in ops} | extra_ops
    return config


UP_TO_BUNDLE = {"explora_backbone", "classifier", "select_predictions", "calib_predictions", "scrc_policy"}


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_drop_source, mlflow_store_template):
    """An instance (env as tests/e2e/conftest.py's e2e_home) with v0001 materialized up to a released bundle."""
    tmp = tmp_path_factory.mktemp("miner")
    env = {**e2e_environment(tmp, mlflow_store_template), "PYTHONPATH": str(REPO)}
    state, inbox = tmp / "state", tmp / "inbox"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in UNSET_FOR_TESTS:
            mp.delenv(key, raising=False)
        shutil.copytree(tiny_drop_source, inbox / "v0001")
        instance = dg.DagsterInstance.get()
        instance.add_dynamic_partitions(dataset_version.name, ["v0001"])
        resources = build_resources(state=state, inbox=inbox)
        result = materialize(
            "*bundle",
            instance=instance,
            partition="v0001",
            resources=resources,
            run_config=_config(UP_TO_BUNDLE),
        )
        assert result.success, "the tiny graph up to the bundle failed"
        yield {"instance": instance, "resources": resources, "inbox": inbox, "tmp": tmp, "state": state}


@contextlib.contextmanager
def _calib_image_replaced(state: Path):
    """The first val_calib image (the reproduction check's sample) inverted in place, then put back as it was."""
    from roadwork_resources.io_manager import read_artifact

    splits = read_artifact(state / "artifacts" / "splits" / "v0001")
    path = Path(splits[splits["split"] == "val_calib"].sort_values("image_id")["uri"].iloc[0])
    before, stat = path.read_bytes(), path.stat()
    with PIL.Image.open(io.BytesIO(before)) as image:
        fmt, inverted = image.format, PIL.ImageOps.invert(image.convert("RGB"))
    buf = io.BytesIO()
    inverted.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    try:
        yield
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _validator_image(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


class _Client(threading.Thread):
    """Sends /predict requests back to back; records every outcome."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop_event = url, threading.Event()
        self.ids: Counter = Counter()
        self.failures: list[str] = []
        self.images = [_validator_image(i) for i in range(4)]

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not self.stop_event.is_set():
                try:
                    r = client.post(f"{self.url}/predict", json={"image": self.images[i % 4]})
                    if r.status_code == 200 and 0.0 <= r.json()["answer"] <= 1.0:
                        self.ids[r.json()["bundle_id"]] += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))
                i += 1


def test_serve_latest_hot_swaps_a_new_release_with_zero_failed_requests(released):
    instance, resources = released["instance"], released["resources"]
    release_1 = released_bundle(instance)
    assert release_1 is not None and release_1.partition == "v0001", "a green bundle must count as released"

    port = free_port()
    log = released["tmp"] / "serve.log"
    env = os.environ.copy()
    server = subprocess.Popen(
        [dagster_bin("roadwork"), "serve", "--latest", "--port", str(port), "--poll-seconds", "1"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def health() -> dict | None:
        try:
            return httpx.get(f"{url}/healthz", timeout=10).json()
        except httpx.HTTPError:
            assert server.poll() is None, f"roadwork serve exited:\n{log.read_text()[-3000:]}"
            return None

    client = _Client(url)
    try:
        assert (
            wait_for(health, 180, "roadwork serve --latest to answer /healthz")["bundle_id"]
            == release_1.bundle_id
        )
        client.start()
        wait_for(lambda: client.ids[release_1.bundle_id] >= 3, 60, "requests served by the first release")

        # a new release of the same partition: bundle (+ its checks) materialized again
        second = materialize(
            "bundle", instance=instance, partition="v0001", resources=resources, run_config=_config(set())
        )
        assert second.success, "re-materializing the bundle failed"
        release_2 = released_bundle(instance)
        assert release_2.bundle_id != release_1.bundle_id, "the second release must be a different bundle"
        wait_for(
            lambda: (h := health()) and h["bundle_id"] == release_2.bundle_id, 120, "the swap to release 2"
        )
        wait_for(lambda: client.ids[release_2.bundle_id] >= 3, 60, "requests served by the second release")

        # a bundle whose blocking check fails is materialized but not released: release 2 keeps serving
        with _calib_image_replaced(released["state"]):  # the bundle no longer reproduces calib_predictions
            third = materialize(
                "bundle", instance=instance, partition="v0001", resources=resources, run_config=_config(set())
            )
        assert not third.success, "a failing blocking check must fail the run"
        evaluations = third.get_asset_check_evaluations()
        assert [e.check_name for e in evaluations if not e.passed] == ["check_bundle_reproduces_predictions"]
        assert released_bundle(instance).bundle_id == release_2.bundle_id
        # the failed bundle replaced the partition's artifact directory, not the release's own copy (which
        # serve --latest after a restart, drift_job and predict read); the first release's copy is removed
        kept = released_bundle(instance).path
        assert verify_bundle(kept).content_sha256 == release_2.bundle_id, kept
        assert not release_1.path.exists() and kept.parent == release_1.path.parent, release_1.path
        served_before = client.ids[release_2.bundle_id]
        wait_for(
            lambda: client.ids[release_2.bundle_id] >= served_before + 10,
            60,
            "requests after the failed release",
        )
        final = health()
        client.stop_event.set()
        client.join(timeout=90)
    finally:
        client.stop_event.set()
        server_log = stop_process(server, log)
    assert client.failures == [], (
        f"{len(client.failures)} failed requests: {client.failures[:5]}\n{server_log}"
    )
    assert final["bundle_id"] == release_2.bundle_id and final["swaps"] == 1, final
    assert set(client.ids) == {release_1.bundle_id, release_2.bundle_id}, client.ids
    print(f"requests per bundle: {dict(client.ids)}; swaps: {final['swaps']}")


def _broken_drop(inbox: Path, version: str) -> None:
    """A drop whose labels.csv lists images that are not there: its retrain run fails fast in image_table."""
    folder = inbox / version
    (folder / "images").mkdir(parents=True)
    rows = "".join(f"images/missing_{i}.jpg,{i % 2}\n" for i in range(40))
    (folder / "labels.csv").write_text("file,label\n" + rows)
    (folder / "_READY").write_text(f"{version}\n")


def _sensor_runs(instance: dg.DagsterInstance) -> list:
    return [
        r.dagster_run for r in instance.get_run_records(dg.RunsFilter(tags={"roadwork/trigger": "new_drop"}))
    ]


def test_daemon_skips_a_released_drop_and_queues_retrains_one_at_a_time(released):
    """One daemon session (the only one of the suite that launches whole-graph runs from a sensor tick):
    the released v0001 is skipped; then, with nothing else done, a complete drop v0002 and a broken
    drop v0003 land in the inbox. The sensor adds both partitions and launches two retrain runs, which
    leave the queue one at a time: v0002's materializes the whole graph (tests/configs/tiny.yaml through
    ROADWORK_RUN_CONFIG) and ends its MLflow run FINISHED; v0003's fails fast in image_table."""
    from roadwork_assets.automation import new_drop_sensor
    from roadwork_core.data.synthetic import make_demo_drop
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import RetrainSettings

    instance, inbox = released["instance"], released["inbox"]
    env = {**os.environ, "ROADWORK_RUN_CONFIG": str(TINY_CONFIG)}
    start = subprocess.run(
        [dagster_bin("dagster"), "sensor", "start", "new_drop_sensor", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, f"dagster sensor start failed:\n{start.stderr[-3000:]}"
    log = released["tmp"] / "daemon.log"
    daemon = subprocess.Popen(
        [dagster_bin("dagster-daemon"), "run", "-m", "roadwork_assets.definitions"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        [state] = [s for s in instance.all_instigator_state() if s.name == "new_drop_sensor"]

        def finished_ticks():
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=5)
            return [t for t in ticks if t.status.value != "STARTED"]  # newest first

        first = wait_for(finished_ticks, 180, "the daemon's first finished new_drop_sensor tick")[-1]
        assert first.status.value == "SKIPPED", (first.status, first.error, log.read_text()[-3000:])
        assert "v0001" in first.skip_reason and "released bundle" in first.skip_reason, first.skip_reason
        assert _sensor_runs(instance) == [], "a drop with a released bundle from the same files was retrained"

        # a burst of two new drops (the acceptance: copy them in, do nothing else): two retrain runs,
        # which must not run at the same time
        make_demo_drop(inbox, "v0002", n=48, seed=21, scale=0.5)  # writes _READY last
        _broken_drop(inbox, "v0003")
        runs = wait_for(lambda: len(r := _sensor_runs(instance)) == 2 and r, 120, "two retrain runs")
        assert {r.tags["dagster/partition"] for r in runs} == {"v0002", "v0003"}
        assert all(r.tags.get("roadwork/queue") == "retrain" for r in runs), [r.tags for r in runs]
        assert sorted(instance.get_dynamic_partitions("dataset_version")) == ["v0001", "v0002", "v0003"]

        def all_finished():
            now = [instance.get_run_by_id(r.run_id) for r in runs]
            return now if all(r.is_finished for r in now) else None

        finished = wait_for(all_finished, RUN_TIMEOUT, "both retrain runs to finish", interval=2.0)
    finally:
        stop_process(daemon, log)
    by_partition = {r.tags["dagster/partition"]: r for r in finished}
    good, broken = by_partition["v0002"], by_partition["v0003"]
    assert good.status == dg.DagsterRunStatus.SUCCESS, (
        f"the v0002 retrain ended {good.status}; daemon log:\n{log.read_text()[-3000:]}"
    )
    report = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation_report"), asset_partitions=["v0002"]), limit=1
    ).records
    assert report and report[0].run_id == good.run_id, (
        "the sensor-launched run did not materialize the report"
    )
    assert mlflow_statuses(released["state"], good.run_id) == ["FINISHED"], "MLflow run of the v0002 retrain"
    assert broken.status == dg.DagsterRunStatus.FAILURE, broken.status
    failed_steps = [
        e.step_key for e in instance.all_logs(broken.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    ]
    assert failed_steps == ["image_table"], failed_steps
    assert mlflow_statuses(released["state"], broken.run_id) == ["FAILED"], "MLflow run of the v0003 retrain"

    records = {
        r.dagster_run.run_id: r
        for r in instance.get_run_records(dg.RunsFilter(run_ids=[r.run_id for r in finished]))
    }
    spans = sorted((rec.start_time, rec.end_time) for rec in records.values())
    assert all(s is not None and e is not None for s, e in spans), f"runs never started: {spans}"
    assert spans[0][1] <= spans[1][0], f"retrain runs overlapped (the queue let two out at once): {spans}"

    # forcing: the sensor's config retrains the released drop too (a direct evaluation on the same instance)
    context = dg.build_sensor_context(
        instance=instance,
        resources={
            "dataset": DatasetSource(inbox=str(inbox)),
            "retrain": RetrainSettings(force_retrain=True),
        },
    )
    forced = new_drop_sensor(context)
    assert sorted(r.partition_key for r in forced.run_requests) == ["v0001", "v0002", "v0003"], forced
    assert all(r.tags["roadwork/force_retrain"] == "true" for r in forced.run_requests)
    # Dagster skips a request whose run key it has seen: a forced drop the sensor ran before needs a new key
    used = {r.tags.get("dagster/run_key") for r in instance.get_runs()} - {None}
    assert "drop-v0002" in used, used
    assert not used & {r.run_key for r in forced.run_requests}, (used, forced.run_requests)
    unforced = new_drop_sensor(
        dg.build_sensor_context(
            instance=instance,
            resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
        )
    )
    assert "v0001" not in [r.partition_key for r in unforced.run_requests], unforced
