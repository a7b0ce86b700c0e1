"""Data-parallel training throughput: the same classifier job under torchrun with 1 and with N processes.

A: `torchrun --nproc-per-node 1` (one process: the plain loop). B: `--nproc-per-node N` (DDP; gloo on
CPU, nccl on CUDA, one process per GPU). Same job directory (model, rows, config, global batch, seed),
fresh checkpoint folder each run. Figure = median seconds of the training epochs after the first
(the first also decodes images / fills caches) in A over B, per repeat; A and B alternate.
Ratio > 1: N processes train faster. On a 2-core CPU expect about 1 or less (two processes share two
cores, and gloo's all-reduce is extra work); the row exists for multi-GPU machines.

    python -m bench.bench_ddp [--nproc 2] [--n 256] [--mode full] [--epochs 4] [--repeats 3] [--device cpu]

On a machine with G GPUs (not run here: no GPU was available to these sessions):

    python -m bench.bench_ddp --device cuda --nproc G --n 2048 --preset dinov2_small --mode lora --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import machine_facts, synthetic_rows, write_result
from roadwork_assets._torchrun import torchrun_command
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.training.ddp_jobs import read_result, write_classifier_job
from roadwork_core.training.supervised import TrainConfig
from roadwork_resources.gpu import GPUResource

REPO = Path(__file__).resolve().parents[1]


def _run(job: Path, nproc: int, device: str, threads: int) -> list[float]:
    gpu = GPUResource(device=device, nproc_per_node=nproc, threads=threads)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(torchrun_command(gpu, job), cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun --nproc-per-node {nproc} failed:\n{proc.stderr[-3000:]}")
    return [float(h["seconds"]) for h in read_result(job)["history"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n", type=int, default=256, help="synthetic images in the drop")
    parser.add_argument("--preset", default="vit_test_tiny")
    parser.add_argument("--mode", default="full", choices=["head", "lora", "dora", "full"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch (image decoding, caches) is not timed")
    cores = len(os.sched_getaffinity(0))
    facts = machine_facts()
    runs: dict[str, list] = {"a_epoch_seconds": [], "b_epoch_seconds": [], "ratios": []}
    with tempfile.TemporaryDirectory(prefix="roadwork-bench-ddp-") as tmp:
        root = Path(tmp)
        _, splits = synthetic_rows(root / "inbox", args.n)
        train = splits[splits["split"] == "train"].reset_index(drop=True)
        select = splits[splits["split"] == "val_select"].reset_index(drop=True)
        torch.manual_seed(0)
        model = build_classifier(BackboneConfig(name=args.preset), dropout=0.0)
        cfg = TrainConfig(
            mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=1e-4, patience=args.epochs
        )
        for repeat in range(args.repeats):
            per_side = {}
            order = ((1, "a"), (args.nproc, "b")) if repeat % 2 == 0 else ((args.nproc, "b"), (1, "a"))
            for nproc, side in order:
                job = root / f"job-{repeat}-{side}"
                job.mkdir()
                write_classifier_job(
                    job, model, train, select, cfg, precision="fp32", checkpoint_dir=job / "ckpt",
                    feature_cache_dir=job / "cache", out_dir=job / "out",
                )  # fmt: skip
                threads = max(1, cores // nproc) if args.device == "cpu" else 1
                seconds = _run(job, nproc, args.device, threads)
                per_side[side] = statistics.median(seconds[1:])
                runs[f"{side}_epoch_seconds"].append(seconds)
            runs["ratios"].append(per_side["a"] / per_side["b"])
            print(
                f"[bench] repeat {repeat}: 1 proc {per_side['a']:.3f}s/epoch, {args.nproc} procs {per_side['b']:.3f}s/epoch"
            )
    result = {
        "what": f"training epoch seconds, 1 vs {args.nproc} processes (torchrun, DDP), {args.mode} mode",
        "preset": args.preset,
        "mode": args.mode,
        "n_train": len(train),
        "device": args.device,
        "nproc": args.nproc,
        "repeats": args.repeats,
        "median_ratio_1_over_n": round(statistics.median(runs["ratios"]), 4),
        "images_per_second_1": round(
            len(train) / statistics.median(s for r in runs["a_epoch_seconds"] for s in r[1:]), 2
        ),
        "images_per_second_n": round(
            len(train) / statistics.median(s for r in runs["b_epoch_seconds"] for s in r[1:]), 2
        ),
        **runs,
        "machine": facts,
        "command": " ".join([sys.executable, "-m", "bench.bench_ddp", *(argv or sys.argv[1:])]),
    }
    write_result("ddp", result)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("what", "median_ratio_1_over_n", "images_per_second_1", "images_per_second_n")
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
