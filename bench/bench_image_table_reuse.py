"""The image table of a dataset version that grew: every image decoded and hashed again vs the facts of
the images the previous version's table already holds reused (`build_image_table(known=...)`, what the
`image_table` asset passes when that table was hashed by the same code and libraries).

A: `build_image_table([v0001, v0002])` from nothing; B: the same with `known` = v0001's table. v0001 is a
synthetic drop of `--n` images, v0002 one of `--new` images. The same tables (checked). Ratio =
seconds(A) / seconds(B); > 1 means reusing is faster. Retraining the latest version again (the weekly
schedule, a drift retrain) is the case `--new 0`.

    python -m bench.bench_image_table_reuse [--n 2000] [--new 200] [--repeats 3]
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
    parser.add_argument("--n", type=int, default=2000, help="images of the earlier drop")
    parser.add_argument("--new", type=int, default=200, help="images of the new drop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    before = speed_reference()
    with tempfile.TemporaryDirectory(prefix="bench-image-table-reuse-") as tmp:
        cores = parallel.usable_cores()
        drops = [make_demo_drop(Path(tmp), "v0001", n=args.n, seed=0, workers=cores)]
        if args.new:
            drops.append(make_demo_drop(Path(tmp), "v0002", n=args.new, seed=1, workers=cores))
        earlier = build_image_table(drops[:1]).images
        tables: dict[str, pd.DataFrame] = {}
        reused: list[int] = []

        def build(mode: str):
            def run() -> None:
                result = build_image_table(drops, known=earlier if mode == "reuse" else None)
                tables[mode] = result.images
                if mode == "reuse":
                    reused.append(result.n_reused)

            return run

        timing = side_by_side(build("again"), build("reuse"), repeats=args.repeats, warmup=1)
        pd.testing.assert_frame_equal(tables["again"], tables["reuse"])
    ratios = [a / b for a, b in zip(timing.a_seconds, timing.b_seconds, strict=True)]
    result = {
        "benchmark": "image_table_reuse",
        "what": f"build_image_table of {args.n} + {args.new} images: all hashed again vs the {args.n} earlier "
        "images' facts reused",
        "n_images": args.n,
        "n_new": args.new,
        "n_reused": reused[-1],
        "repeats": args.repeats,
        "again_seconds": [round(s, 2) for s in timing.a_seconds],
        "reuse_seconds": [round(s, 2) for s in timing.b_seconds],
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "machine": machine_facts(),
        "speed_reference_before": before,
        "speed_reference_after": speed_reference(),
    }
    write_result("image_table_reuse", result)
    print(
        f"[bench] image table of {args.n} + {args.new} images: hashed again {statistics.median(timing.a_seconds):.1f} "
        f"s, facts reused {statistics.median(timing.b_seconds):.1f} s: {result['median_ratio']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
