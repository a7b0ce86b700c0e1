"""Faults: a training process SIGKILLed mid-epoch, an artifact writer SIGKILLed mid-write, a full disk.

The kills are real (a child process, SIGKILL: no finally blocks, no atexit). Deterministic pause
points (a sleeping hook, a patched step) are used only to know *when* to kill, never to change
what the code under test does.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

from roadwork_core.io import atomic_write_bytes
from roadwork_resources.io_manager import read_artifact, write_artifact
from tests.reliability.conftest import python_child, sigkill, wait_for

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------------
# training: helpers shared with the child process (which imports this module)


def training_rows(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """16 train + 8 select 48x48 JPEGs; label 1 = an orange cone-like triangle on the road grey."""
    out = []
    for split, n, seed in (("train", 16, 0), ("select", 8, 1)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(n):
            img = PIL.Image.new("RGB", (48, 48), tuple(int(c) for c in rng.integers(70, 150, 3)))
            if i % 2:
                x = int(rng.integers(4, 28))
                PIL.ImageDraw.Draw(img).polygon([(x, 40), (x + 8, 20), (x + 16, 40)], fill=(255, 120, 0))
            path = folder / f"{split}{i:02d}.jpg"
            if not path.exists():
                img.save(path, quality=90)
            rows.append({"image_id": f"{split}-{i:02d}", "uri": str(path), "label": i % 2})
        out.append(pd.DataFrame(rows))
    return out[0], out[1]


def tiny_model():
    from roadwork_core.models.backbone import BackboneConfig
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.multiview import MultiViewConfig

    torch.manual_seed(0)
    return build_classifier(BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32, grid=2))


def train_config():
    from roadwork_core.training.supervised import TrainConfig

    return TrainConfig(mode="head", epochs=3, batch_size=4, lr=1e-3, ema_decay=0.9, patience=5)


_TRAIN_CHILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from roadwork_core.training.supervised import train_classifier
from tests.reliability.test_faults import tiny_model, train_config, training_rows

ckpt, images, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
train, select = training_rows(images)
model = tiny_model()
epoch = {"now": 1}

def slow_in_epoch_2(*_):  # only tells the parent when to kill; the numbers are untouched
    if epoch["now"] == 2:
        marker.write_text("in epoch 2")
        time.sleep(0.5)

model.head.register_forward_hook(slow_in_epoch_2)
train_classifier(model, train, select, train_config(), checkpoint_dir=ckpt,
                 on_epoch=lambda record: epoch.update(now=record["epoch"] + 1))
print("finished without being killed")
"""


@pytest.mark.slow
def test_sigkilled_training_resumes_and_matches_uninterrupted_run(tmp_path: Path) -> None:
    from roadwork_core.training.supervised import train_classifier

    images, ckpt, marker = tmp_path / "images", tmp_path / "killed", tmp_path / "in_epoch_2"
    train, select = training_rows(images)
    child = python_child(_TRAIN_CHILD, str(ckpt), str(images), str(marker))
    wait_for(marker.exists, child, timeout=120, what="the child training to reach epoch 2")
    sigkill(child)

    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 1, (
        f"killed in epoch 2, the checkpoint must hold finished epoch 1: {state['epoch']}"
    )
    assert not list(ckpt.glob(".tmp-*")), "the kill landed outside a write; no temp file expected"

    resumed = train_classifier(tiny_model(), train, select, train_config(), checkpoint_dir=ckpt)
    straight = train_classifier(
        tiny_model(), train, select, train_config(), checkpoint_dir=tmp_path / "clean"
    )
    assert resumed.resumed_from_epoch == 1, (
        f"expected a resume from epoch 1, got {resumed.resumed_from_epoch}"
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3], "every epoch exactly once in the history"
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), f"epoch {a['epoch']} loss differs"
    assert resumed.best_epoch == straight.best_epoch
    for key, value in straight.state_dict.items():
        assert torch.allclose(value.float(), resumed.state_dict[key].float(), atol=1e-5), (
            f"{key} differs between the killed+resumed and the uninterrupted run"
        )


# ---------------------------------------------------------------------------------------------------
# artifact writes

_WRITE_CHILD = """
import os, sys, time
from pathlib import Path
import torch
from roadwork_resources import io_manager

dest, mode, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def pause(what):
    marker.write_text(what)
    time.sleep(120)

if mode == "files_written":  # every file of the new artifact is in the temp dir; not yet swapped in
    real_sha = io_manager.sha256_file
    io_manager.sha256_file = lambda path, *a, **k: pause(str(path)) or real_sha(path, *a, **k)
elif mode == "old_moved_aside":  # right after the previous artifact, if ever, leaves `dest`
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if Path(src) == dest:
            pause(str(dst))
    os.replace = replace
io_manager.write_artifact(dest, {"weights": torch.full((2_000_000,), 2.0)})
print("written")
"""


def _assert_previous_or_new(dest: Path) -> float:
    """`dest` reads as a complete artifact, the previous one (1.0) or the new one (2.0); returns which."""
    value = read_artifact(dest)
    weights = value["weights"]
    assert len(weights) in (1000, 2_000_000) and torch.all(weights == weights[0]), "a mixed artifact"
    assert float(weights[0]) in (1.0, 2.0)
    assert not [p for p in dest.iterdir() if p.name.startswith(".tmp-")], "temp files inside the artifact"
    return float(weights[0])


@pytest.mark.parametrize("mode", ["files_written", "old_moved_aside"])
def test_sigkill_during_artifact_write_leaves_previous_readable(tmp_path: Path, mode: str) -> None:
    dest = tmp_path / "store" / "classifier" / "v0001"
    write_artifact(dest, {"weights": torch.full((1000,), 1.0)})
    marker = tmp_path / "paused"
    child = python_child(_WRITE_CHILD, str(dest), mode, str(marker))
    wait_for(lambda: marker.exists() or child.poll() is not None, child, 60, f"the writer to reach {mode}")
    if child.poll() is None:
        sigkill(child)
        assert _assert_previous_or_new(dest) == 1.0, f"killed at {mode}: the previous artifact must remain"
    else:  # the writer never passes through this point (e.g. an atomic swap): it finished
        assert child.returncode == 0, child.communicate()[1][-2000:]
        assert _assert_previous_or_new(dest) == 2.0
    leftovers = [p.name for p in dest.parent.iterdir() if p.name != dest.name]
    assert all(name.startswith(".tmp-") for name in leftovers), f"a partial artifact is visible: {leftovers}"


def test_sigkill_racing_a_large_atomic_write(tmp_path: Path) -> None:
    """Kill as soon as the temp file appears, i.e. while the 48 MB are being written."""
    target = tmp_path / "blob.bin"
    atomic_write_bytes(target, b"old" * 1000)
    code = """
import sys
from roadwork_core.io import atomic_write_bytes
atomic_write_bytes(sys.argv[1], b"\\x07" * (48 << 20))
"""
    child = python_child(code, str(target))
    wait_for(lambda: any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()), child, 60, "the temp file")
    sigkill(child)
    assert target.read_bytes() == b"old" * 1000, "the previous file must be intact after a kill mid-write"
    names = {p.name for p in tmp_path.iterdir()}
    assert names - {"blob.bin"} and all(n.startswith(".tmp-") for n in names - {"blob.bin"}), names
    from roadwork_core.io import atomic

    atomic._SWEPT_DIRS.discard(tmp_path)  # as the next process: this one swept the folder at its first write
    atomic_write_bytes(target, b"new")  # the next write into the folder removes the dead writer's temporary
    assert {p.name for p in tmp_path.iterdir()} == {"blob.bin"}, sorted(p.name for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# full disk


def _raise_enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_from_a_patched_writer_names_the_path_and_keeps_previous(tmp_path, monkeypatch) -> None:
    import roadwork_core.io.atomic as atomic

    target = tmp_path / "policy.json"
    atomic_write_bytes(target, b'{"old": true}')
    monkeypatch.setattr(atomic.os, "fsync", _raise_enospc)  # delayed allocation failing at fsync
    with pytest.raises(OSError, match=str(target)) as info:
        atomic_write_bytes(target, b'{"new": true}')
    assert info.value.errno == errno.ENOSPC, f"errno must stay ENOSPC so callers can tell: {info.value!r}"
    monkeypatch.undo()
    assert target.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["policy.json"], "the temp file must be removed"


def test_enospc_inside_write_artifact_names_the_artifact(tmp_path, monkeypatch) -> None:
    dest = tmp_path / "calibrator" / "v0001"
    write_artifact(dest, {"kind": "temperature", "t": 1.5})
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _raise_enospc)
    with pytest.raises(OSError, match=str(dest)) as info:
        write_artifact(dest, pd.DataFrame({"x": [1, 2, 3]}))
    assert info.value.errno == errno.ENOSPC and "Fix: free space under" in str(info.value)
    assert read_artifact(dest) == {"kind": "temperature", "t": 1.5}, "previous artifact changed"
    assert [p.name for p in dest.parent.iterdir()] == ["v0001"], "temp dir left behind"


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.EROFS, "writable by the user"),
        (errno.EACCES, "writable by the user"),
        (errno.EFBIG, "ulimit -f"),
    ],
)
def test_a_failed_artifact_write_gives_the_fix_for_its_cause(tmp_path, monkeypatch, code, fix) -> None:
    """A read-only folder was told to free space (an audit with a read-only bind mount)."""

    def fail(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    with pytest.raises(OSError) as info:
        write_artifact(tmp_path / "calibrator" / "v0001", pd.DataFrame({"x": [1]}))
    assert info.value.errno == code and fix in str(info.value) and "free space" not in str(info.value), (
        info.value
    )


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"weights": torch.zeros(1_000_000)}, id="safetensors"),
        pytest.param(pd.DataFrame({"x": np.random.default_rng(0).random(400_000)}), id="parquet"),
        pytest.param({"notes": "x" * 2_000_000}, id="json"),
    ],
)
def test_real_full_tmpfs_write_artifact(tiny_tmpfs: Path, value) -> None:
    dest = tiny_tmpfs / "artifacts" / "thing" / "v0001"
    write_artifact(dest, {"weights": torch.ones(10)})
    with pytest.raises(OSError, match=str(dest)) as info:
        write_artifact(dest, value)
    assert info.value.errno == errno.ENOSPC, f"expected ENOSPC, got {info.value!r}"
    assert "No space left" in str(info.value)
    assert torch.equal(read_artifact(dest)["weights"], torch.ones(10)), "previous artifact corrupted"
    assert [p.name for p in dest.parent.iterdir()] == ["v0001"], "a partial artifact is left behind"


def test_real_full_tmpfs_atomic_write(tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "manifest.json"
    atomic_write_bytes(target, b"{}")
    with pytest.raises(OSError, match=str(target)) as info:
        atomic_write_bytes(target, b" " * (2 << 20))
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"{}" and [p.name for p in tiny_tmpfs.iterdir()] == ["manifest.json"]
