"""ExPLoRA ablation on the same splits: a `head` probe on the base backbone against one on the
ExPLoRA backbone, both trained on train and scored on val_select (MCC).

    python -m roadwork_commands.ablation --partition v0001 -c configs/demo.yaml

It reads the `splits` and `explora_backbone` artifacts of the partition from the instance (run the
graph, or at least those two assets, first) and rebuilds the base backbone exactly as the asset did
(same config and seed; the weights hash is checked).

With `--stage-on-stdin` (how `make demo` runs it beside the graph) it starts before those assets exist:
it imports what it needs, then waits for a line `splits` on standard input before reading the splits,
runs the base probe (the base backbone rebuilt from the run config's `explora_backbone` settings and
`gpu` seed), then waits for a line `explora_backbone` before the ExPLoRA probe. The base weights' hash is
checked against the one `explora_backbone` recorded; on a mismatch the base probe is run again from the
recorded config. End of input before a line it waits for stops it with an error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

# Dagster, yaml and the roadwork packages are imported in main(), after the SIGUSR1 handler is set.


def _artifact(instance, asset: str, partition: str):
    import dagster as dg

    from roadwork_assets._util import latest_materialization_metadata
    from roadwork_resources.io_manager import read_artifact

    path = latest_materialization_metadata(instance, dg.AssetKey(asset), partition).get("path")
    if not path:
        raise SystemExit(f"no materialization of {asset} for partition {partition}; materialize it first")
    return read_artifact(Path(path))


def probe(backbone_state: dict, backbone_cfg, train, select, clf_cfg: dict, seed: int):
    """Train a head probe (frozen backbone, cached features); returns the TrainResult."""
    import torch

    from roadwork_core.config import HeadConfig, MultiViewConfig, TrainConfig, from_mapping
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.training.supervised import train_classifier

    def picked(*keys: str) -> dict:  # the classifier's tiling and aggregation; the rest stays at the defaults
        return {k: clf_cfg[k] for k in keys if k in clf_cfg}

    torch.manual_seed(seed)
    mv = from_mapping(MultiViewConfig, picked("grid", "overlap"))
    head = from_mapping(HeadConfig, picked("aggregator", "topk"))
    model = build_classifier(backbone_cfg, mv, aggregator=head.aggregator, topk=head.topk)
    model.backbone.load_state_dict(backbone_state)
    cfg = from_mapping(TrainConfig, clf_cfg, mode="head", seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_classifier(
            model,
            train,
            select,
            cfg,
            checkpoint_dir=Path(tmp) / "ckpt",
            feature_cache_dir=Path(tmp) / "cache",
        )
    return result


def cache_speedup(result) -> float:
    """Epoch 1 (computes and caches the features) over the median later epoch (reads the cache)."""
    import statistics

    times = [h["seconds"] for h in result.history]
    return times[0] / max(statistics.median(times[1:]), 1e-9) if len(times) > 1 else float("nan")


def raise_threads_on_signal(threads: int, signum: int = signal.SIGUSR1) -> None:
    """On `signum`, set torch's intra-op threads to `threads`: the demo starts the ablation on one
    thread beside the graph's last steps and sends SIGUSR1 once the graph ends and both cores are free.
    (Python runs the handler in the main thread between bytecodes, never inside a torch kernel.)"""

    def handler(_signum, _frame) -> None:
        import torch

        torch.set_num_threads(threads)

    signal.signal(signum, handler)


def wait_for_line(expected: str) -> None:
    """Block until standard input carries the line `expected` (other lines are skipped)."""
    for line in sys.stdin:
        if line.strip() == expected:
            return
    raise SystemExit(f"standard input ended before the line {expected!r}: the graph did not get that far")


def base_from_run_config(run_cfg: dict):
    """(seed, source config, architecture config) of the base backbone `explora_backbone` starts from,
    as the asset builds it from the same run config (its `backbone` settings, the gpu resource's seed
    and attention kernel)."""
    import dataclasses

    from roadwork_assets.training import ExploraSettings, _backbone_config
    from roadwork_resources.gpu import GPUResource

    ops = run_cfg.get("ops", {}) or {}
    explora = ExploraSettings(**((ops.get("explora_backbone", {}) or {}).get("config", {}) or {}))
    gpu = GPUResource(**((run_cfg.get("resources", {}).get("gpu", {}) or {}).get("config", {}) or {}))
    source = _backbone_config(explora.backbone, gpu.attn_backend)
    return gpu.seed, source, dataclasses.replace(source, pretrained=False, weights_file=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--partition", required=True, help="dataset version, e.g. v0001")
    parser.add_argument(
        "-c", "--config", help="run-config YAML; its ops.classifier.config sets the probe's views"
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="head-probe epochs (cheap: features are cached)"
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="head-probe learning rate")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: the run config's resources.gpu.config.threads)"
    )
    parser.add_argument(
        "--threads-on-signal",
        type=int,
        help="on SIGUSR1, switch to this many torch threads (the demo sends it when its graph ends)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority by this much (os.nice): the demo runs it beside training",
    )
    parser.add_argument(
        "--stage-on-stdin",
        action="store_true",
        help="start before the graph has these assets: wait for the lines 'splits' and then "
        "'explora_backbone' on standard input before reading each (the demo writes them as the steps end)",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    if args.threads_on_signal:
        raise_threads_on_signal(args.threads_on_signal)  # first: a signal before this would kill us

    import dagster as dg
    import torch
    import yaml

    from roadwork_core.contracts import Split, SplitReader
    from roadwork_core.models.backbone import create_backbone, state_dict_sha256
    from roadwork_core.models.serialization import load_backbone

    if args.stage_on_stdin:  # everything the probes import, now, while the graph's first steps run
        import roadwork_core.training.supervised  # noqa: F401

    run_cfg = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    clf_cfg = ((run_cfg.get("ops", {}).get("classifier", {}) or {}).get("config", {})) or {}
    gpu_cfg = (run_cfg.get("resources", {}).get("gpu", {}) or {}).get("config", {}) or {}
    # the run config's torch threads (resources.gpu.config.threads), as the assets apply them
    threads = args.threads or int(gpu_cfg.get("threads", 0))
    clf_cfg = {**clf_cfg, "epochs": args.epochs, "lr": args.lr, "patience": args.epochs}
    if threads > 0:
        torch.set_num_threads(threads)

    instance = dg.DagsterInstance.get()
    if args.stage_on_stdin:
        wait_for_line("splits")
    splits = _artifact(instance, "splits", args.partition)
    reader = SplitReader("classifier", splits)  # the probe is a classifier: train + val_select only
    train, select = reader.read(Split.TRAIN), reader.read(Split.VAL_SELECT)

    if args.stage_on_stdin:  # the base probe before explora_backbone exists, from the run config
        seed, source_cfg, backbone_cfg = base_from_run_config(run_cfg)
        torch.manual_seed(seed)
        base = create_backbone(source_cfg)
        base_run = probe(base.state_dict(), backbone_cfg, train, select, clf_cfg, seed)
        wait_for_line("explora_backbone")
        saved = load_backbone(_artifact(instance, "explora_backbone", args.partition))
        stale = (saved.seed, saved.source_cfg) != (seed, source_cfg) or bool(
            saved.base_sha256 and state_dict_sha256(base) != saved.base_sha256
        )
        if stale:
            print(
                "  (the run config's base backbone is not the one explora_backbone started from: base probe rerun)"
            )
    else:
        saved = load_backbone(_artifact(instance, "explora_backbone", args.partition))
        stale = True
    if stale:
        torch.manual_seed(saved.seed)
        base = create_backbone(saved.source_cfg)
        if saved.base_sha256 and state_dict_sha256(base) != saved.base_sha256:
            raise SystemExit(
                "the rebuilt base backbone does not match the one explora_backbone started from "
                "(different weights file or timm version); rerun explora_backbone"
            )
        base_run = probe(base.state_dict(), saved.backbone_cfg, train, select, clf_cfg, saved.seed)
    explora_state = saved.state_dict
    explora_run = probe(explora_state, saved.backbone_cfg, train, select, clf_cfg, saved.seed)
    mcc_base, mcc_explora = float(base_run.best_select_mcc), float(explora_run.best_select_mcc)
    print(
        f"ExPLoRA ablation on {args.partition} ({len(train)} train, {len(select)} val_select images; head probe)"
    )
    print(f"  val_select MCC, base weights:    {mcc_base:.4f}")
    print(f"  val_select MCC, ExPLoRA weights: {mcc_explora:.4f}")
    print(f"  difference (ExPLoRA - base):     {mcc_explora - mcc_base:+.4f}")
    base_state = base.state_dict()
    moved = max(float((explora_state[k].float() - base_state[k].float()).abs().max()) for k in base_state)
    print(f"  largest weight change made by ExPLoRA: {moved:.2e}")
    print(
        f"  head-mode feature cache: epoch 1 / later epochs = {cache_speedup(base_run):.0f}x (base), "
        f"{cache_speedup(explora_run):.0f}x (ExPLoRA); later epochs ran "
        f"{sum(h['backbone_forwards'] for h in explora_run.history[1:])} backbone forwards"
    )
    if args.threads_on_signal:
        # done: a late signal is ignored. Python resets its own handlers to the default action (which
        # kills) while it shuts down, but leaves an ignored signal ignored.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
