"""Shared pieces of the reliability suite: a tiny exported bundle, a child-process runner, a tiny tmpfs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import rw_home, tiny_inbox  # noqa: F401  (fixtures for the graph tests)

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def python_child(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Start `python -c code args...` from the repo root (so `roadwork_*` and `tests` import)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `predicate()` every 10 ms until true; fail naming `what` if the child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited (rc {proc.returncode}) before {what}:\n{out}\n{err[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def sigkill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no finally blocks, no atexit, no cleanup
    proc.wait(timeout=30)
    assert proc.returncode == -9, f"the child should have died of SIGKILL, got rc {proc.returncode}"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An exported bundle (random-init vit_test_tiny, temperature calibrator, threshold policy)
    plus two good JPEGs. Returns {bundle_dir, images, policy, root}."""
    import PIL.Image

    from roadwork_core.bundle import export_bundle
    from roadwork_core.calibration import fit_calibrator, fit_threshold_policy
    from roadwork_core.models.backbone import BackboneConfig
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.serialization import save_classifier

    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name="vit_test_tiny")).eval()
    root = tmp_path_factory.mktemp("bundle")
    save_classifier(root / "classifier", model, extra={"epochs": 1})
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 300)
    labels = (rng.uniform(size=300) < 1 / (1 + np.exp(-logits / 2))).astype(int)
    calibrator, _ = fit_calibrator(logits, labels, methods=("temperature",))
    policy = fit_threshold_policy(np.linspace(0, 1, 60), (np.arange(60) >= 30).astype(int))
    bundle_dir = export_bundle(
        root / "release",
        classifier_dir=root / "classifier",
        calibrator=calibrator,
        policy=policy,
        dataset_version="v0001",
        upstream_versions={"image_table": "abc", "splits": "def"},
        metrics_summary={"val_calib": {"coverage": 0.9}},
        code_version=None,
    )
    images = []
    for i, size in enumerate([(224, 224), (96, 128)]):
        path = root / f"good{i}.jpg"
        PIL.Image.new("RGB", size, (40 * i + 60, 120, 30)).save(path, quality=90)
        images.append(path)
    return {"bundle_dir": Path(bundle_dir), "images": images, "policy": policy, "root": root}


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs mounted at tmp_path/full; skipped where mounting is not permitted."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); ENOSPC is still "
                    "covered by the patched-writer tests")  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


_GRAPH_CHILD = """
import json, sys
from pathlib import Path
import dagster as dg
import torch
torch.set_num_threads(1)
from roadwork_assets.definitions import build_resources
from tests.integration.conftest import materialize, tiny_run_config

version, state, inbox = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
config = tiny_run_config()
# the base backbone for both partitions: their feature-cache entries are then shareable
config["ops"]["explora_backbone"]["config"]["enabled"] = False
resources = build_resources(state=state, inbox=inbox)  # MLflow URI from MLFLOW_TRACKING_URI
result = materialize("*", instance=dg.DagsterInstance.get(), partition=version, resources=resources,
                     run_config=config)
print("RESULT " + json.dumps({"version": version, "run_id": result.run_id, "success": result.success}))
"""

# Credential-looking values that only the environment holds; no file, log or metadata may show them.
SECRET_TOKEN = "tok-9f3c1e7a-SECRET"  # a path component of the MLflow URI (production: user:password@host)
SECRET_PASSWORD = "pw-4be1d2c0-hunter2"


@pytest.fixture(scope="session")
def two_partition_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two processes materialize the whole graph at the same time, on partitions v0001 and v0002
    (v0002 = v0001 + 48 new images), against one Dagster instance, one state folder (artifacts,
    feature cache, checkpoints) and one MLflow store whose URI comes only from MLFLOW_TRACKING_URI."""
    import shutil

    import dagster as dg

    from roadwork_assets.partitions import dataset_version
    from roadwork_core.data.synthetic import make_demo_drop

    root = tmp_path_factory.mktemp("concurrent")
    inbox, state, home = root / "inbox", root / "state", root / "dagster_home"
    make_demo_drop(inbox, "v0001", n=120, seed=7, n_unlabelled=8)
    make_demo_drop(inbox, "v0002", n=48, seed=21)
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    (state / SECRET_TOKEN).mkdir(parents=True)
    uri = f"sqlite:///{state / SECRET_TOKEN / 'mlflow.db'}"
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(dataset_version.name, ["v0001", "v0002"])
    env = {
        "DAGSTER_HOME": str(home),
        "ROADWORK_STATE": str(state),
        "MLFLOW_TRACKING_URI": uri,
        "DAGSTER_PG_PASSWORD": SECRET_PASSWORD,
        "ROADWORK_API_TOKEN": SECRET_PASSWORD,
    }
    t0 = time.monotonic()
    children = {v: python_child(_GRAPH_CHILD, v, str(state), str(inbox), env=env) for v in ("v0001", "v0002")}
    results, outputs = {}, {}
    for version, child in children.items():
        out, err = child.communicate(timeout=540)
        outputs[version] = out + err
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert child.returncode == 0 and lines, (
            f"run {version} crashed (rc {child.returncode}):\n{err[-4000:]}"
        )
        results[version] = json.loads(lines[-1].removeprefix("RESULT "))
    return {
        "results": results,
        "outputs": outputs,
        "seconds": time.monotonic() - t0,
        "instance": instance,
        "state": state,
        "inbox": inbox,
        "mlflow_uri": uri,
        "secrets": {SECRET_TOKEN: "the MLflow tracking URI", SECRET_PASSWORD: "a credential env var"},
    }
