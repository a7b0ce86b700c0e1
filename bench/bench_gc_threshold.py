"""Import cost under CPython's default garbage-collector thresholds (A: 700, 10, 10) and roadwork's
(B: what roadwork_core sets on import, the youngest generation's raised to 7,000).

Each repeat starts two fresh interpreters, A and B alternating first, that set the thresholds and then
import what a run worker or torchrun rank imports: torch, torchvision, timm, torchmetrics, dagster,
mlflow, pandas, the definitions and the classifier's training module. The figure is the child's own
user + system CPU seconds for those imports (os.times), so start-up and exit are left out.
Ratio = seconds(A) / seconds(B).

    python -m bench.bench_gc_threshold [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import machine_facts, write_result

REPO = Path(__file__).resolve().parent.parent
STACK = (
    "import torch, torchvision, timm, torchmetrics, dagster, mlflow, pandas\n"
    "import roadwork_assets.definitions, roadwork_core.training.supervised"
)


def import_cpu_seconds(threshold: tuple[int, int, int]) -> float:
    code = (
        "import gc, os\n"
        "import roadwork_core\n"  # first (it is light), so that its own setting is overridden here
        f"gc.set_threshold(*{threshold!r})\n"
        "t = os.times()\n"
        f"{STACK}\n"
        "u = os.times()\n"
        "assert gc.get_threshold() == " + repr(threshold) + ", gc.get_threshold()\n"
        "print(u.user - t.user + u.system - t.system)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"[bench_gc_threshold] the child failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    return float(proc.stdout.split()[-1])


def main() -> int:
    from roadwork_core import _DEFAULT_GC_THRESHOLD, YOUNG_GC_THRESHOLD

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    default = _DEFAULT_GC_THRESHOLD
    raised = (YOUNG_GC_THRESHOLD, *default[1:])
    a, b = [], []
    for i in range(args.repeats):
        for threshold in (default, raised) if i % 2 == 0 else (raised, default):
            (a if threshold == default else b).append(import_cpu_seconds(threshold))
        print(f"[bench_gc_threshold] repeat {i}: {default} {a[-1]:.2f} s, {raised} {b[-1]:.2f} s")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    result = {
        "benchmark": "gc_threshold",
        "what": f"CPU seconds of a fresh interpreter's imports ({STACK!r}) at gc thresholds {default} (A) vs {raised} (B)",
        "repeats": args.repeats,
        "a_seconds": [round(x, 3) for x in a],
        "b_seconds": [round(x, 3) for x in b],
        "median_a_seconds": round(statistics.median(a), 3),
        "median_b_seconds": round(statistics.median(b), 3),
        "median_ratio_a_over_b": round(statistics.median(ratios), 3),
        "machine": machine_facts(),
    }
    print(
        f"[bench_gc_threshold] imports {result['median_a_seconds']:.2f} -> {result['median_b_seconds']:.2f} CPU-s "
        f"({result['median_ratio_a_over_b']:.2f}x, n={args.repeats})"
    )
    write_result("gc_threshold", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
