"""Shared pieces of the reliability suite: a tiny exported bundle, a child-process runner, a tiny tmpfs."""

from __future__ import annotations

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
