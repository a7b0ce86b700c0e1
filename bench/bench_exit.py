"""Process exit: a fresh interpreter that has imported the training and orchestration stack (torch,
torchmetrics, timm, dagster, mlflow) and then exits, without (A) and with (B) roadwork_core imported,
whose atexit hook freezes the heap (`gc.freeze`) so that CPython's exit-time collections skip it.

The time is from the child's last statement (it prints time.time()) to the parent seeing it exit, i.e.
the interpreter's finalization; every run worker, CLI call, code server and torchrun rank pays it.
A and B alternate. Ratio = seconds(A) / seconds(B).

    python -m bench.bench_exit [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine_facts, write_result

REPO = Path(__file__).resolve().parent.parent
STACK = "import torch, torchmetrics, timm, dagster, mlflow"


def exit_seconds(with_roadwork: bool) -> float:
    code = (
        f"import time\n{STACK}\n"
        + ("import roadwork_core\n" if with_roadwork else "")
        + ("print(f'{time.time():.6f}', flush=True)\n")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    last = float(proc.stdout.readline())
    proc.wait()
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"[bench_exit] the child failed (exit {proc.returncode})")
    return ended - last


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    a, b = [], []
    for i in range(args.repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_roadwork in order:
            (b if with_roadwork else a).append(exit_seconds(with_roadwork))
        print(f"[bench_exit] repeat {i}: without {a[-1]:.2f} s, with roadwork_core {b[-1]:.2f} s")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    result = {
        "benchmark": "process_exit",
        "what": f"interpreter exit after `{STACK}`: without (A) vs with (B) roadwork_core's gc.freeze atexit hook",
        "repeats": args.repeats,
        "a_seconds": [round(x, 3) for x in a],
        "b_seconds": [round(x, 3) for x in b],
        "median_a_seconds": round(statistics.median(a), 3),
        "median_b_seconds": round(statistics.median(b), 3),
        "median_ratio_a_over_b": round(statistics.median(ratios), 3),
        "machine": machine_facts(),
    }
    print(
        f"[bench_exit] exit {result['median_a_seconds']:.2f} s -> {result['median_b_seconds']:.2f} s "
        f"({result['median_ratio_a_over_b']:.2f}x, n={args.repeats})"
    )
    write_result("exit", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
