"""One epoch of the demo's classifier (configs/demo.yaml) on the 2,000-image demo drop, A vs B settings.

The demo's wall time is mostly the classifier step, and a classifier epoch is mostly its data path
(JPEG decode, the validator replica's augmentation, the canvas), so this is the short A/B run for the
demo's levers: torch threads, DataLoader workers, the canvas cache. Each arm trains one epoch from the
same initial weights on the same splits (fresh checkpoint folder), alternating A and B per repeat.

    python -m bench.bench_demo_epoch --a threads=2,workers=0 --b threads=1,workers=1 --repeats 3
    # where the time goes (py-spy is in the dev extra):
    py-spy record -o /tmp/epoch.svg --subprocesses -- python -m bench.bench_demo_epoch --profile threads=1,workers=1

Knobs of an arm: threads (torch intra-op threads), workers (DataLoader workers), epochs, n_train (cap on
train images), augment_level (the replica's highest training level; 0 = no augmentation, whose canvases
are then decoded once), eager (1: timm's eager attention instead of SDPA).
Result: bench/results/demo_epoch.json (median ratio of epoch seconds A / B).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import SideBySide, machine_facts, synthetic_rows, write_result

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DROP_ROOT = Path(tempfile.gettempdir()) / "roadwork-bench-demo-drop"


def parse_arm(text: str) -> dict[str, int]:
    known = {"threads", "workers", "epochs", "n_train", "augment_level", "eager"}
    arm: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in known or not value.isdigit():
            raise SystemExit(f"bad arm setting {part!r} in {text!r}; use key=int with key in {sorted(known)}")
        arm[key] = int(value)
    return arm


def demo_settings(config: Path) -> tuple[dict, dict]:
    """(explora backbone settings, classifier settings) of a run config such as configs/demo.yaml."""
    ops = yaml.safe_load(config.read_text())["ops"]
    return ops["explora_backbone"]["config"]["backbone"], ops["classifier"]["config"]


def make_epoch(arm: dict[str, int], train, select, backbone: dict, clf: dict):
    """A callable that trains the demo classifier for `arm['epochs']` (1) epoch(s) from fixed weights."""
    import torch

    from roadwork_core.models.backbone import BackboneConfig
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.multiview import MultiViewConfig
    from roadwork_core.training.supervised import TrainConfig, train_classifier

    mv = MultiViewConfig(grid=clf.get("grid", 3), overlap=clf.get("overlap", 0.15))
    cfg = TrainConfig(
        mode=clf["mode"],
        epochs=arm.get("epochs", 1),
        batch_size=clf["batch_size"],
        lr=clf["lr"],
        ema_decay=clf.get("ema_decay"),
        patience=clf.get("patience", 3),
        augment=("validator" if arm["augment_level"] else "none")
        if "augment_level" in arm
        else clf.get("augment", "validator"),
        augment_max_level=arm.get("augment_level", clf.get("augment_max_level", 3)),
        num_workers=arm.get("workers", 0),
    )
    if "eager" in arm:
        backbone = {**backbone, "attn_backend": "eager" if arm["eager"] else "sdpa"}
    torch.manual_seed(0)
    template = build_classifier(
        BackboneConfig(**backbone), mv, aggregator=clf["aggregator"], topk=clf["topk"], dropout=clf["dropout"]
    )
    init = {k: v.clone() for k, v in template.state_dict().items()}
    rows = train.iloc[: arm.get("n_train", len(train))]

    def epoch() -> dict:
        torch.set_num_threads(arm.get("threads", 2))
        model = build_classifier(
            BackboneConfig(**backbone),
            mv,
            aggregator=clf["aggregator"],
            topk=clf["topk"],
            dropout=clf["dropout"],
        )
        model.load_state_dict(init)
        with tempfile.TemporaryDirectory() as tmp:
            result = train_classifier(model, rows, select, cfg, checkpoint_dir=Path(tmp))
        return result.history[-1]

    return epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", default="threads=2,workers=0", help="arm A settings (the baseline)")
    parser.add_argument("--b", default="threads=1,workers=1", help="arm B settings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--drop-root", type=Path, default=DEFAULT_DROP_ROOT, help="reused between runs")
    parser.add_argument("--n", type=int, default=2000, help="images in the synthetic drop")
    parser.add_argument("--profile", metavar="ARM", help="run one epoch of this arm and exit (for py-spy)")
    args = parser.parse_args(argv)

    from roadwork_core.contracts.splits import Split

    manifest, splits = synthetic_rows(args.drop_root, args.n, n_unlabelled=0)
    rows = manifest.merge(splits[["image_id", "split"]], on="image_id")
    train = rows[rows["split"] == Split.TRAIN.value].reset_index(drop=True)
    select = rows[rows["split"] == Split.VAL_SELECT.value].reset_index(drop=True)
    backbone, clf = demo_settings(args.config)
    if args.profile:
        t0 = time.perf_counter()
        record = make_epoch(parse_arm(args.profile), train, select, backbone, clf)()
        print(f"{args.profile}: {time.perf_counter() - t0:.1f}s wall, epoch record {record}")
        return 0
    arm_a, arm_b = parse_arm(args.a), parse_arm(args.b)
    records: dict[str, list[dict]] = {"a": [], "b": []}
    epoch_a = make_epoch(arm_a, train, select, backbone, clf)
    epoch_b = make_epoch(arm_b, train, select, backbone, clf)
    timing = SideBySide()  # no warm-up round: an epoch is long, and both arms start cold alike
    for i in range(args.repeats):  # A then B on even repeats, B then A on odd ones
        for side in "ab" if i % 2 == 0 else "ba":
            t0 = time.perf_counter()
            records[side].append((epoch_a if side == "a" else epoch_b)())
            (timing.a_seconds if side == "a" else timing.b_seconds).append(time.perf_counter() - t0)
    result = {
        "benchmark": "demo_epoch",
        "what": f"one demo classifier epoch ({args.config.name}; {len(select)} val_select images, "
        f"{len(train)} train images unless an arm caps n_train); A = {args.a}, B = {args.b}",
        **timing.as_dict(),
        "select_mcc_a": [round(r["select_mcc"], 4) for r in records["a"]],
        "select_mcc_b": [round(r["select_mcc"], 4) for r in records["b"]],
        "machine": machine_facts(),
    }
    write_result("demo_epoch", result)
    print(
        f"A ({args.a}) {result['median_a_seconds']:.1f}s / B ({args.b}) {result['median_b_seconds']:.1f}s "
        f"per epoch: median ratio {result['median_ratio_a_over_b']:.2f}x (n={args.repeats}); "
        f"load average {result['machine']['load_average_1m_5m_15m']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
