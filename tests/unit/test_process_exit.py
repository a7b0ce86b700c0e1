"""roadwork_core's exit hook: the heap is frozen before CPython's exit-time collections, after every
handler registered later, and the process keeps its exit status and output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import atexit, gc, sys

def last():  # registered before roadwork_core is imported: runs after its handler (atexit is LIFO)
    print("frozen at exit:", gc.get_freeze_count() > 0, flush=True)

atexit.register(last)
print("frozen before exit:", gc.get_freeze_count() > 0, flush=True)
import roadwork_core
from roadwork_core.io import atomic_write_bytes

atexit.register(lambda: atomic_write_bytes(sys.argv[1] + ".atexit", b"handler ran"))
atomic_write_bytes(sys.argv[1], b"body ran")
sys.exit(3)
"""


def test_exit_freezes_the_heap_last_and_keeps_status_output_and_handlers(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["frozen before exit: False", "frozen at exit: True"], proc.stdout
    assert out.read_bytes() == b"body ran"
    assert Path(f"{out}.atexit").read_bytes() == b"handler ran", (
        "an atexit handler registered later did not run"
    )


GC_CHILD = """
import gc, json, sys
if sys.argv[1] == "custom":
    gc.set_threshold(500, 5, 5)  # a program's own setting, made before roadwork is imported
before = gc.get_threshold()
import roadwork_assets  # what `python -m roadwork_assets.torchrun_worker` imports before torch
after_package = gc.get_threshold()
import torch  # noqa: F401
print(json.dumps([before, after_package, gc.get_threshold(), "roadwork_core" in sys.modules]))
"""


def test_roadwork_raises_the_young_generation_threshold_before_torch_and_keeps_a_programs_own() -> None:
    import json

    def child(mode: str) -> list:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(GC_CHILD), mode],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.splitlines()[-1])

    before, after_package, after_torch, core_loaded = child("default")
    assert before == [700, 10, 10], (
        f"CPython's default changed ({before}): re-measure bench.bench_gc_threshold"
    )
    assert after_package == after_torch == [7000, 10, 10], (after_package, after_torch)
    assert core_loaded
    assert child("custom")[1:3] == [[500, 5, 5], [500, 5, 5]], "a program's own thresholds were overridden"
