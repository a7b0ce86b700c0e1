"""Scaling: inference (`predict_frame`) and head-mode training (`train_classifier`, empty feature
cache, so it includes the feature pass) time as the number of images doubles.

Sizes are interleaved inside each repeat (the order reverses every repeat), the median per size is
taken, and the exponent k in time ~ n^k is the least-squares slope of log(time) on log(n).
Linear scaling is k = 1; a fixed start-up cost shows as k < 1 at small n.

    python -m bench.bench_scaling [--sizes 32 64 128 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine_facts, set_threads, synthetic_rows, write_result
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.predict import predict_frame
from roadwork_core.training.supervised import TrainConfig, train_classifier


def fit_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size)."""
    slope, _ = np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)
    return float(slope)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--preset", default="vit_test_tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    threads = set_threads()
    facts = machine_facts()
    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="roadwork-bench-scaling-") as tmp:
        root = Path(tmp)
        # Enough images that the largest training size fits in the train split (60%).
        images, splits = synthetic_rows(root / "inbox", int(max(sizes) / 0.55) + 8)
        rows = splits.sort_values("image_id").reset_index(drop=True)
        train_all = rows[rows["split"] == "train"].reset_index(drop=True)
        select = rows[rows["split"] == "val_select"].reset_index(drop=True).head(32)
        if len(train_all) < max(sizes):
            raise SystemExit(f"only {len(train_all)} train images for size {max(sizes)}; raise the drop size")
        torch.manual_seed(0)
        model = build_classifier(BackboneConfig(name=args.preset))
        init = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(
            mode="head", epochs=args.epochs, batch_size=32, lr=1e-3, ema_decay=None, patience=99
        )
        counter = itertools.count()

        def infer(n: int) -> float:
            model.load_state_dict(init)
            t0 = time.perf_counter()
            out = predict_frame(model, rows.head(n), batch_size=32)
            assert len(out) == n, f"predict_frame returned {len(out)} rows for {n}"
            return time.perf_counter() - t0

        def train(n: int) -> float:
            model.load_state_dict(init)
            work = root / f"run{next(counter)}"
            t0 = time.perf_counter()
            train_classifier(
                model,
                train_all.head(n),
                select,
                cfg,
                checkpoint_dir=work / "ckpt",
                feature_cache_dir=work / "cache",
            )
            dt = time.perf_counter() - t0
            shutil.rmtree(work)
            return dt

        infer(sizes[0]), train(sizes[0])  # warm-up: imports, allocator, first-call costs
        samples = {"inference": {n: [] for n in sizes}, "training": {n: [] for n in sizes}}
        for r in range(args.repeats):
            for n in sizes if r % 2 == 0 else sizes[::-1]:
                samples["inference"][n].append(infer(n))
                samples["training"][n].append(train(n))
    result = {"benchmark": "scaling", "preset": args.preset, "sizes": sizes, "repeats": args.repeats}
    for kind, per_size in samples.items():
        med = [statistics.median(per_size[n]) for n in sizes]
        k = fit_exponent(sizes, med)
        k_upper = fit_exponent(sizes[1:], med[1:]) if len(sizes) > 2 else k
        result[kind] = {
            "seconds": {str(n): [round(s, 4) for s in per_size[n]] for n in sizes},
            "median_seconds": {str(n): round(m, 4) for n, m in zip(sizes, med, strict=True)},
            "per_image_ms": {str(n): round(1000 * m / n, 3) for n, m in zip(sizes, med, strict=True)},
            "doubling_ratios": [round(b / a, 3) for a, b in itertools.pairwise(med)],
            "exponent": round(k, 3),
            "exponent_without_smallest": round(k_upper, 3),
        }
        print(
            f"[bench_scaling] {kind}: median seconds {result[kind]['median_seconds']}, time ~ n^{k:.2f} "
            f"(n^{k_upper:.2f} without n={sizes[0]}); doubling ratios {result[kind]['doubling_ratios']}"
        )
    result.update(
        what="predict_frame and head-mode train_classifier (empty cache, "
        f"{args.epochs} epochs) time vs number of images; log-log least-squares exponent",
        ratio=result["inference"]["exponent"],
        target="exponent ~1 (linear)",
        met=bool(abs(result["inference"]["exponent"] - 1) <= 0.15 and result["training"]["exponent"] <= 1.15),
        machine=facts,
        threads=threads,
    )
    write_result("scaling", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
