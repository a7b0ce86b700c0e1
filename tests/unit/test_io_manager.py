"""ArtifactIOManager storage: typed round trips, sha256 recorded, atomic replacement, no pickle."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from roadwork_core.calibration.calibrators import Calibrator
from roadwork_core.io import atomic_dir, atomic_write_bytes, sha256_file
from roadwork_resources.io_manager import (
    RECORD_FILE,
    ArtifactTypeError,
    new_artifact_dir,
    read_artifact,
    write_artifact,
)


def test_dataframe_round_trip_keeps_list_columns(tmp_path):
    df = pd.DataFrame({"image_id": ["a", "b"], "view_probs": [[0.1, 0.2], [0.3, 0.4]], "label": [0, 1]})
    record = write_artifact(tmp_path / "t", df)
    assert record["kind"] == "dataframe"
    back = read_artifact(tmp_path / "t")
    assert back["image_id"].tolist() == ["a", "b"]
    assert [list(v) for v in back["view_probs"]] == [[0.1, 0.2], [0.3, 0.4]]


def test_pydantic_round_trip_and_checksums(tmp_path):
    cal = Calibrator(method="temperature", params={"temperature": 2.0})
    record = write_artifact(tmp_path / "c", cal)
    back = read_artifact(tmp_path / "c")
    assert isinstance(back, Calibrator) and back == cal
    for name, meta in record["files"].items():
        assert sha256_file(tmp_path / "c" / name) == meta["sha256"], f"{name} checksum not recorded"


def test_tensor_dict_and_json_round_trip(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    write_artifact(tmp_path / "w", tensors)
    assert torch.equal(read_artifact(tmp_path / "w")["w"], tensors["w"])
    write_artifact(tmp_path / "j", {"a": [1, 2], "b": "x"})
    assert read_artifact(tmp_path / "j") == {"a": [1, 2], "b": "x"}


def test_directory_artifact_is_moved_when_scratch_and_copied_otherwise(tmp_path):
    scratch = new_artifact_dir("bundle")
    (scratch / "model.safetensors").write_bytes(b"abc")
    write_artifact(tmp_path / "b", scratch)
    assert not scratch.exists(), "a scratch directory must be moved, not left behind"
    assert (read_artifact(tmp_path / "b") / "model.safetensors").read_bytes() == b"abc"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f.txt").write_text("x")
    write_artifact(tmp_path / "k", keep)
    assert keep.exists() and (read_artifact(tmp_path / "k") / "f.txt").read_text() == "x"


def test_scratch_a_failed_step_never_returned_is_removed_when_the_process_exits(tmp_path):
    import subprocess
    import sys

    code = (
        "from roadwork_resources.io_manager import new_artifact_dir, write_artifact\n"
        "import pathlib, sys\n"
        "stored = new_artifact_dir('bundle'); (stored / 'f').write_text('x')\n"
        "write_artifact(pathlib.Path(sys.argv[1]) / 'stored', stored)\n"
        "failed = new_artifact_dir('classifier'); (failed / 'half.bin').write_bytes(b'0')\n"
        "print(failed, flush=True)\n"
        "raise RuntimeError('the step failed before returning its directory')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1 and "the step failed" in proc.stderr, proc.stderr
    failed = Path(proc.stdout.strip())
    assert failed.name.startswith("roadwork-artifact-classifier-") and not failed.exists()
    assert (read_artifact(tmp_path / "stored") / "f").read_text() == "x", "a stored artifact is untouched"


def test_scratch_of_a_killed_process_is_swept_and_a_live_ones_is_kept(tmp_path):
    import os
    import subprocess
    import sys

    from roadwork_resources.io_manager import _sweep_dead_scratch

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    live = (
        "from roadwork_resources.io_manager import new_artifact_dir\n"
        "import sys\n"
        "d = new_artifact_dir('bundle'); (d / 'w.bin').write_bytes(b'0' * 1000)\n"
        "print(d, flush=True); sys.stdin.read()\n"  # alive until the test closes stdin
    )
    killed = live.replace("sys.stdin.read()", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.Popen(
        [sys.executable, "-c", live], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        kept = Path(holder.stdout.readline().strip())
        dead = subprocess.run(
            [sys.executable, "-c", killed], env=env, capture_output=True, text=True, check=False
        )
        assert dead.returncode == -9, dead.stderr
        left = Path(dead.stdout.strip())
        assert (left / "w.bin").is_file(), "SIGKILL runs no exit handler: the scratch is still there"
        assert _sweep_dead_scratch(tmp_path) == [left]
        assert not left.exists() and not Path(f"{left}.owner").exists()
        assert (kept / "w.bin").is_file(), "the scratch of a live process must never be swept"
    finally:
        holder.communicate("")
    assert not kept.exists() and not list(tmp_path.iterdir()), "the live process cleans up at exit"


def test_refuses_to_pickle_arbitrary_objects(tmp_path):
    class Thing:
        pass

    with pytest.raises(ArtifactTypeError, match="never pickles"):
        write_artifact(tmp_path / "x", Thing())
    assert not (tmp_path / "x").exists()


def test_refuses_to_load_classes_outside_roadwork(tmp_path):
    write_artifact(tmp_path / "c", Calibrator(method="temperature", params={"temperature": 1.5}))
    record = json.loads((tmp_path / "c" / RECORD_FILE).read_text())
    record["class"] = "os.system"
    (tmp_path / "c" / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(ArtifactTypeError, match="only roadwork_core"):
        read_artifact(tmp_path / "c")


def test_missing_artifact_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize the upstream asset"):
        read_artifact(tmp_path / "nothing")


def test_failed_write_leaves_previous_artifact_intact(tmp_path):
    dest = tmp_path / "a"
    write_artifact(dest, {"version": 1})

    bad = {"version": 2, "bad": object()}  # not JSON: fails half-way through writing
    with pytest.raises(ArtifactTypeError):
        write_artifact(dest, bad)
    assert read_artifact(dest) == {"version": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "temporary folder left behind"


def test_atomic_helpers_replace_whole_files_and_dirs(tmp_path):
    path = atomic_write_bytes(tmp_path / "f.bin", b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("crash while building")
    assert not (tmp_path / "d").exists()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("complete")
    assert (tmp_path / "d" / "x").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"]


def _flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "obj, file",
    [
        (Calibrator(method="temperature", params={"temperature": 12.73}), "artifact.json"),
        (pd.DataFrame({"image_id": ["a", "b"], "logit": [0.5, -1.0]}), "data.parquet"),
        ({"w": torch.arange(64, dtype=torch.float32)}, "tensors.safetensors"),
        ({"threshold": 0.42}, "value.json"),
        ("directory", "dir/model.safetensors"),
    ],
)
def test_an_artifact_changed_at_rest_is_refused_naming_the_file_and_the_fix(tmp_path, obj, file):
    """A bit flipped in a calibrator's JSON or a classifier's weights was read back silently: the bundle made
    from it passed every check and shipped (found by a corruption audit)."""
    from roadwork_resources.io_manager import ArtifactCorruptError

    if isinstance(obj, str):  # "directory"
        src = tmp_path / "model"
        src.mkdir()
        (src / "model.safetensors").write_bytes(bytes(range(256)) * 8)
        obj = src
    dest = tmp_path / "artifacts" / "calibrator" / "v0001"
    write_artifact(dest, obj)
    read_artifact(dest)  # verified once: the process remembers the file by its stat
    _flip(dest / file)
    with pytest.raises(ArtifactCorruptError) as err:
        read_artifact(dest)
    message = str(err.value)
    assert str(dest / file) in message and "sha256" in message, message
    assert "materialize `calibrator` for v0001 again" in message, message
    (dest / file).write_bytes((dest / file).read_bytes()[:-10])  # truncated: named by its size
    with pytest.raises(ArtifactCorruptError, match="bytes, its record"):
        read_artifact(dest)


def test_an_unreadable_record_or_undecodable_file_names_the_artifact(tmp_path):
    from roadwork_resources.io_manager import ArtifactCorruptError

    dest = tmp_path / "splits" / "v0002"
    write_artifact(dest, pd.DataFrame({"image_id": ["a"]}))
    (dest / RECORD_FILE).write_text("")
    with pytest.raises(ArtifactCorruptError, match=r"record .*_artifact.json is unreadable") as err:
        read_artifact(dest)
    assert "materialize `splits` for v0002 again" in str(err.value)
    write_artifact(dest, pd.DataFrame({"image_id": ["a"]}))
    (dest / "data.parquet").write_bytes(b"not parquet")
    with pytest.raises(ArtifactCorruptError, match="cannot be decoded"):
        read_artifact(dest, verify=False)  # what verification would have caught, decoded anyway


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from roadwork_core.io import atomic
folder = Path(sys.argv[1])
with atomic._tmp_sibling(folder / "last.safetensors") as tmp, atomic.atomic_dir(folder / "artifact") as d:
    tmp.write_bytes(b"x" * 1000)
    (d / "half.json").write_text("{")
    print("WRITING", flush=True)
    time.sleep(120)
"""


def test_temporaries_of_a_killed_writer_are_swept_and_a_live_writers_kept(tmp_path):
    """kill -9 mid-write left `.tmp-last.safetensors.*` (14 MB in the audit, GBs for a real checkpoint) and
    `.tmp-<version>.*` folders for ever; only the IO manager's scratch in $TMPDIR was swept."""
    import os
    import signal
    import subprocess
    import sys

    from roadwork_core.io import atomic

    repo = Path(__file__).resolve().parents[2]

    def writer() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], cwd=repo, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )  # fmt: skip
        assert proc.stdout.readline().strip() == "WRITING"
        return proc

    dead = writer()
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    left = sorted(p.name.split(".")[1] for p in tmp_path.glob(".tmp-*"))
    assert left == ["tmp-artifact", "tmp-last"], left  # `.tmp-<name>.<random>`
    live = writer()
    try:
        atomic._SWEPT_DIRS.discard(tmp_path)  # as a new process: the first write into the folder sweeps it
        atomic_write_bytes(tmp_path / "state.json", b"{}")
        names = sorted(p.name for p in tmp_path.glob(".tmp-*"))
        assert len(names) == 2, f"the dead writer's temporaries must go, the live one's stay: {names}"
        assert all(os.path.exists(tmp_path / n) for n in names)
    finally:
        live.kill()
        live.wait(timeout=30)
    atomic._SWEPT_DIRS.discard(tmp_path)
    with atomic_dir(tmp_path / "other") as d:
        (d / "a").write_text("a")
    assert not list(tmp_path.glob(".tmp-*")), list(tmp_path.glob(".tmp-*"))


_VERSION_HOLDER = """
import os, sys, time
from pathlib import Path
from roadwork_resources.io_manager import _lock_partition
_lock_partition(Path(sys.argv[1]), "v0001", "1234abcd")
worker = os.fork()  # as a DataLoader worker is forked by a training run
if worker == 0:
    time.sleep(120)
    os._exit(0)
print(worker, flush=True)
time.sleep(120)
"""


def test_a_second_run_of_the_same_version_fails_at_its_start_naming_the_first(tmp_path):
    """Two `--select '*'` runs of v0001 three seconds apart: one read the other's artifacts and failed late at
    `bundle` with advice that did not apply (a concurrency audit). Another version runs beside it freely, and a
    killed run's lock goes with it at once, though its forked DataLoader workers live on a moment longer."""
    import os
    import signal
    import subprocess
    import sys

    import dagster as dg

    from roadwork_resources.io_manager import ArtifactIOManager

    versions = dg.StaticPartitionsDefinition(["v0001", "v0002"])

    @dg.asset(partitions_def=versions)
    def table() -> pd.DataFrame:
        return pd.DataFrame({"a": [1]})

    root = tmp_path / "artifacts"
    io = ArtifactIOManager(root=str(root))
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.Popen(
        [sys.executable, "-c", _VERSION_HOLDER, str(root)], cwd=repo, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    worker = int(run.stdout.readline())
    try:
        busy = dg.materialize(
            [table], partition_key="v0001", resources={"io_manager": io}, raise_on_error=False
        )
        assert not busy.success
        failure = next(e for e in busy.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE")
        message = str(failure.event_specific_data.error)
        assert "run 1234abcd (pid" in message and "'v0001'" in message and "Wait for it" in message, message
        other = dg.materialize([table], partition_key="v0002", resources={"io_manager": io})
        assert other.success, "another version must not wait"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        os.kill(worker, 0)  # the forked worker still lives ...
        after = dg.materialize(
            [table], partition_key="v0001", resources={"io_manager": io}, raise_on_error=False
        )
        assert after.success, "... and the killed run's lock went with the run"
    finally:
        run.kill()
        run.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    assert dg.materialize([table], partition_key="v0001", resources={"io_manager": io}).success, "lock kept"


def test_a_sweep_in_the_moment_before_the_lock_does_not_fail_the_write(tmp_path, monkeypatch):
    """A temporary was visible and unlocked between its creation and its flock: another process's first write
    into the folder swept it, and the write failed with FileNotFoundError (1 in 40,000 feature-cache writes of
    two runs at once; a review of the sweep)."""
    import tempfile

    from roadwork_core.io import atomic

    real_mkstemp, real_mkdtemp, swept = tempfile.mkstemp, tempfile.mkdtemp, []

    def mkstemp(*a, **k):
        made = real_mkstemp(*a, **k)
        if not swept:  # another process sweeps right now, once
            swept.extend(atomic.sweep_dead_temporaries(Path(k["dir"])))
        return made

    def mkdtemp(*a, **k):
        made = real_mkdtemp(*a, **k)
        if len(swept) < 2:
            swept.extend(atomic.sweep_dead_temporaries(Path(k["dir"])))
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    atomic_write_bytes(tmp_path / "f.bin", b"data")
    with atomic_dir(tmp_path / "art") as d:
        (d / "a.json").write_text("{}")
    assert len(swept) == 2, swept  # each first temporary was removed under its writer
    assert (tmp_path / "f.bin").read_bytes() == b"data" and (tmp_path / "art" / "a.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_atomic_writes_work_where_the_file_system_has_no_flock(tmp_path, monkeypatch):
    """ENOLCK (some network mounts): every atomic write failed and left its temporary behind."""
    import errno
    import fcntl

    def no_locks(*_a, **_k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    atomic_write_bytes(tmp_path / "x.bin", b"1")
    with atomic_dir(tmp_path / "d") as d:
        (d / "a").write_text("a")
    assert (tmp_path / "x.bin").read_bytes() == b"1" and (tmp_path / "d" / "a").read_text() == "a"
    assert not list(tmp_path.glob(".tmp-*"))
