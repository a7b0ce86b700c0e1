"""Head-mode feature cache: a head-mode training epoch that must compute the backbone features
against the same epoch reading them from the content-addressed FeatureCache.

A: `train_classifier(mode="head", epochs=1)` with an empty cache directory (decode every JPEG,
build canvases, one backbone forward per batch, write the cache, then the head epoch).
B: the same call, same model and rows, with a warm cache directory (features read from
safetensors, no backbone forward). Each call gets a fresh checkpoint directory so nothing resumes.
Ratio = seconds(A) / seconds(B). Target >= 20x. Also records epoch 1 vs later epochs of one
multi-epoch run (later epochs reuse the in-memory features).

    python -m bench.bench_feature_cache [--n 256] [--preset vit_test_tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import machine_facts, set_threads, side_by_side, synthetic_rows, write_result
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.training.supervised import TrainConfig, train_classifier

TARGET = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=256, help="synthetic images in the drop")
    parser.add_argument("--preset", default="vit_test_tiny")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    threads = set_threads()
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="roadwork-bench-cache-") as tmp:
        root = Path(tmp)
        _, splits = synthetic_rows(root / "inbox", args.n)
        train = splits[splits["split"] == "train"].reset_index(drop=True)
        select = splits[splits["split"] == "val_select"].reset_index(drop=True)
        torch.manual_seed(0)
        model = build_classifier(BackboneConfig(name=args.preset))
        init = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(mode="head", epochs=1, batch_size=64, lr=1e-3, ema_decay=None)
        warm_cache = root / "warm_cache"
        counter = itertools.count()

        def run(cache_dir: Path, epochs: int = 1) -> object:
            model.load_state_dict(init)
            ckpt = root / f"ckpt{next(counter)}"
            result = train_classifier(
                model,
                train,
                select,
                TrainConfig(**{**cfg.__dict__, "epochs": epochs}),
                checkpoint_dir=ckpt,
                feature_cache_dir=cache_dir,
            )
            shutil.rmtree(ckpt)
            return result

        def cold() -> None:
            cache = root / "cold_cache"
            shutil.rmtree(cache, ignore_errors=True)
            run(cache)

        def warm() -> None:
            run(warm_cache)

        run(warm_cache)  # fill the warm cache once
        sbs = side_by_side(cold, warm, repeats=args.repeats, warmup=1)
        multi = run(root / "multi_cache", epochs=6)
        secs = [h["seconds"] for h in multi.history]
        forwards = [h.get("backbone_forwards") for h in multi.history]
    ratio = sbs.median_ratio
    later = statistics.median(secs[1:])
    print(
        f"[bench_feature_cache] {args.preset}, {len(train)} train + {len(select)} select images, {threads} threads: "
        f"epoch recomputing features / epoch from the cache = {ratio:.1f}x (repeats {sbs.ratios}); "
        f"in one run epoch 1 / later epochs = {secs[0] / later:.1f}x; target >= {TARGET}"
    )
    write_result(
        "feature_cache",
        {
            "benchmark": "head_mode_feature_cache",
            "what": "head-mode train_classifier epoch with an empty cache vs with a warm cache (fresh process state each)",
            "preset": args.preset,
            "n_train": len(train),
            "n_select": len(select),
            "a": "epoch, cache empty (decode + backbone + head)",
            "b": "epoch, cache warm (safetensors read + head)",
            **sbs.as_dict(),
            "ratio": round(ratio, 3),
            "one_run_epoch_seconds": [round(s, 4) for s in secs],
            "one_run_backbone_forwards_per_epoch": forwards,
            "one_run_epoch1_over_median_later": round(secs[0] / later, 3),
            "target": f">= {TARGET}",
            "met": ratio >= TARGET,
            "machine": facts,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
