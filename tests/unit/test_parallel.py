"""parallel_map: large batches of per-image work on worker processes, with a plain loop's results."""

from __future__ import annotations

import logging
import os

import pandas as pd
import pytest

from roadwork_core.data import parallel
from roadwork_core.data.image_table import build_image_table
from roadwork_core.data.parallel import parallel_map


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _die_outside(parent: int, x: int) -> int:
    """Kills the worker process it runs in (as the OOM killer would); returns x in the parent's threads."""
    if os.getpid() != parent:
        os._exit(3)
    return x


def test_a_large_batch_runs_in_worker_processes_and_keeps_the_input_order():
    out = parallel_map(_pid_and_square, range(40), workers=2, min_for_processes=10)
    assert [sq for _, sq in out] == [x * x for x in range(40)]
    pids = {pid for pid, _ in out}
    assert os.getpid() not in pids and len(pids) >= 1, f"ran in {pids}, the test process is {os.getpid()}"


def test_a_small_batch_stays_in_this_process():
    out = parallel_map(_pid_and_square, range(5), min_for_processes=10)
    assert {pid for pid, _ in out} == {os.getpid()}
    assert [sq for _, sq in out] == [0, 1, 4, 9, 16]


def test_a_worker_killed_mid_batch_loses_no_result(caplog):
    with caplog.at_level(logging.WARNING, logger=parallel.__name__):
        out = parallel_map(_die_outside, [os.getpid()] * 12, range(12), workers=2, min_for_processes=4)
    assert out == list(range(12))
    assert "BrokenProcessPool" in caplog.text, caplog.text


def test_the_image_table_is_the_same_built_on_processes_or_one_thread(demo_drop, monkeypatch):
    one_thread = build_image_table([demo_drop], workers=1)
    monkeypatch.setattr(parallel, "PROCESS_MIN_ITEMS", 8)
    on_processes = build_image_table([demo_drop], workers=2)
    assert len(one_thread.images) > 8
    pd.testing.assert_frame_equal(on_processes.images, one_thread.images)
    pd.testing.assert_frame_equal(on_processes.rejects, one_thread.rejects)


def _stat_size(path: str) -> int:
    return os.stat(path).st_size


def test_an_error_of_the_work_itself_is_raised_as_is_not_taken_for_a_pool_failure(tmp_path, caplog):
    files = []
    for i in range(12):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"x" * i)
    paths = [str(p) for p in files] + [str(tmp_path / "missing")]
    with caplog.at_level(logging.WARNING, logger=parallel.__name__), pytest.raises(FileNotFoundError):
        parallel_map(_stat_size, paths, workers=2, min_for_processes=4)
    assert "worker processes failed" not in caplog.text, "the work's own error was retried on threads"


def test_a_caller_script_without_a_main_guard_runs_once(tmp_path):
    """Spawned workers import the parent's main module again: a script without `if __name__ == "__main__"`
    ran its top level once per worker (and the dagster CLI's imports cost each worker a second)."""
    import subprocess
    import sys
    from pathlib import Path

    marker = tmp_path / "runs.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os\n"
        f"open({str(marker)!r}, 'a').write('x')\n"
        "from roadwork_core.data.parallel import parallel_map\n"
        "from tests.unit.test_parallel import _pid_and_square\n"
        "out = parallel_map(_pid_and_square, range(20), workers=2, min_for_processes=4)\n"
        "assert [sq for _, sq in out] == [x * x for x in range(20)]\n"
        "assert os.getpid() not in {pid for pid, _ in out}\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "x", f"the script's top level ran {len(marker.read_text())} times"
    assert "bootstrapping" not in proc.stderr, proc.stderr[-2000:]
