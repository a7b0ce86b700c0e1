"""Which training augmentation scores best through the validator replica? A small side-by-side run.

    python tools/augment_compare.py --n 900 --epochs 8 --out /tmp/augment_compare

Writes a synthetic drop, splits it (60/15/25 train / select / test, seeded), then for each arm
(`validator`, `distortions`, `none`) trains the demo's classifier (configs/demo.yaml: vit_test_tiny,
64 px views, max pooling, mode full, random init, no ExPLoRA) from the same initial weights and seed,
and scores val_test through the validator replica (`roadwork_core.metrics.subnet_eval`, answer =
the model's uncalibrated probability). One JSON per arm under --out, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch


def _rows(drop: Path) -> pd.DataFrame:
    table = pd.read_csv(drop / "labels.csv", dtype=str, keep_default_na=False)
    return pd.DataFrame(
        {
            "image_id": table["file"],
            "uri": [str(drop / f) for f in table["file"]],
            "label": table["label"].astype(int),
            "mask_x": table["mask_x"],
            "mask_y": table["mask_y"],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=900)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--max-level", type=int, default=3)
    ap.add_argument(
        "--distortions-max-level", type=int, default=1, help="the demo's setting for the old family"
    )
    ap.add_argument("--arms", default="validator,distortions,none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/augment_compare"))
    args = ap.parse_args()

    from sklearn.metrics import roc_auc_score

    from roadwork_core.data.images import load_image
    from roadwork_core.data.loading import pil_to_canvas
    from roadwork_core.data.synthetic import make_demo_drop
    from roadwork_core.metrics.subnet_eval import replica_predictions, subnet_section
    from roadwork_core.models.backbone import BackboneConfig
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.multiview import MultiViewConfig
    from roadwork_core.training.supervised import TrainConfig, train_classifier

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    drop = args.out / "inbox" / "v0001"
    if not (drop / "_READY").exists():
        make_demo_drop(args.out / "inbox", "v0001", n=args.n, seed=args.seed)
    rows = _rows(drop).sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    n_train, n_select = int(0.6 * len(rows)), int(0.15 * len(rows))
    train, select, test = rows[:n_train], rows[n_train : n_train + n_select], rows[n_train + n_select :]
    test_images = [load_image(u) for u in test["uri"]]

    bb = BackboneConfig(name="vit_test_tiny", img_size=64, pooling="max")
    mv = MultiViewConfig(grid=3, overlap=0.15)
    torch.manual_seed(args.seed)
    init = build_classifier(bb, mv, aggregator="topk_mean", topk=3, dropout=0.0).state_dict()

    results = []
    for arm in args.arms.split(","):
        torch.manual_seed(args.seed)
        model = build_classifier(bb, mv, aggregator="topk_mean", topk=3, dropout=0.0)
        model.load_state_dict(init)
        level = args.distortions_max_level if arm == "distortions" else args.max_level
        cfg = TrainConfig(
            mode="full", epochs=args.epochs, batch_size=32, lr=5e-4, ema_decay=0.99, patience=args.epochs,
            augment=arm, augment_max_level=level, seed=args.seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = train_classifier(model, train, select, cfg, checkpoint_dir=args.out / f"ckpt-{arm}")
        train_s = time.perf_counter() - t0
        model.eval()

        @torch.no_grad()
        def predict_fn(imgs: list, model=model) -> pd.DataFrame:
            canvas = torch.stack([pil_to_canvas(im, model.canvas_size) for im in imgs])
            p = torch.cat(
                [model(canvas[i : i + 64])["logit"].float().sigmoid() for i in range(0, len(canvas), 64)]
            )
            return pd.DataFrame({"p_roadwork": p.numpy(), "p_raw": p.numpy()})

        table = replica_predictions(
            test_images, test["label"].tolist(), predict_fn, seed=args.seed, transform_threads=1
        )
        section = subnet_section(table, n_streams=200, n_bootstrap=200, seed=args.seed)
        model_rows = {r["level"]: r for r in section["per_level"] if r["answer"] == "model"}
        stream = next(r for r in section["stream"] if r["answer"] == "model")
        record = {
            "arm": arm,
            "test_auroc_mix": round(float(roc_auc_score(table["label"], table["p_raw"])), 4),
            "augment_max_level": level,
            "best_epoch": result.best_epoch,
            "best_select_mcc": result.best_select_mcc,
            "train_seconds": round(train_s, 1),
            "test_mcc_by_level": {k: round(v["mcc"], 4) for k, v in model_rows.items()},
            "test_reward_proxy_mix": round(model_rows["mix"]["reward_proxy"], 4),
            "stream_expected_reward": round(stream["expected_reward"], 4),
            "stream_ci": [round(stream["low"], 4), round(stream["high"], 4)],
            "n": {"train": len(train), "select": len(select), "test": len(test)},
            "epochs": args.epochs,
        }
        (args.out / f"{arm}.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record), flush=True)
        results.append(record)

    print(
        "\n| arm | max level | val_select MCC | test MCC L0 / L1 / L2 / L3 / mix | AUROC (mix) "
        "| reward proxy (mix) | stream reward [CI] |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["test_mcc_by_level"]
        print(
            f"| {r['arm']} | {r['augment_max_level']} | {r['best_select_mcc']:.3f} | "
            f"{m['0']:.3f} / {m['1']:.3f} / {m['2']:.3f} / {m['3']:.3f} / {m['mix']:.3f} | {r['test_auroc_mix']:.3f} | "
            f"{r['test_reward_proxy_mix']:.3f} | {r['stream_expected_reward']:.3f} {r['stream_ci']} |"
        )


if __name__ == "__main__":
    main()
