"""The image table's per-image work (read, sha256, decode, 16 phashes) on threads vs worker processes.

A: `build_image_table` on threads (`min(8, cores + 2)`, what it used for every drop before);
B: the same call with one spawned process per usable core (`parallel_map`, its choice from
`PROCESS_MIN_ITEMS` images up). The same drop (a synthetic demo drop of `--n` images, drawn once), the
same tables (checked). Ratio = seconds(A) / seconds(B); > 1 means the processes are faster.

    python -m bench.bench_image_table [--n 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.common import machine_facts, side_by_side, speed_reference, write_result
from roadwork_core.data import parallel
from roadwork_core.data.image_table import build_image_table
from roadwork_core.data.synthetic import make_demo_drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="synthetic images in the drop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    before = speed_reference()
    with tempfile.TemporaryDirectory(prefix="bench-image-table-") as tmp:
        drop = make_demo_drop(Path(tmp), "v0001", n=args.n, seed=0, workers=parallel.usable_cores())
        tables: dict[str, pd.DataFrame] = {}

        def build(mode: str):
            def run() -> None:
                parallel.PROCESS_MIN_ITEMS = 10**12 if mode == "threads" else 400
                tables[mode] = build_image_table([drop]).images

            return run

        timing = side_by_side(build("threads"), build("processes"), repeats=args.repeats, warmup=1)
        pd.testing.assert_frame_equal(tables["threads"], tables["processes"])
    ratios = [a / b for a, b in zip(timing.a_seconds, timing.b_seconds, strict=True)]
    result = {
        "benchmark": "image_table",
        "what": f"build_image_table on a {args.n}-image synthetic drop: threads vs one process per core",
        "n_images": args.n,
        "repeats": args.repeats,
        "threads_seconds": [round(s, 2) for s in timing.a_seconds],
        "processes_seconds": [round(s, 2) for s in timing.b_seconds],
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "machine": machine_facts(),
        "speed_reference_before": before,
        "speed_reference_after": speed_reference(),
    }
    write_result("image_table", result)
    print(
        f"[bench] image table, {args.n} images: threads {statistics.median(timing.a_seconds):.1f} s, processes "
        f"{statistics.median(timing.b_seconds):.1f} s: {result['median_ratio']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
