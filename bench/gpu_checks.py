"""The checks and timings that need a GPU, in one call: what a session with a lent GPU runs.

Sections (each one's figures are written to `<out>/gpu_checks.json` as soon as it ends, so a run cut
short keeps what it measured; a failing section is recorded with its error and the rest still run):

1. `multiview`: bench_multiview's `measure` on cuda (one batched backbone call on B*V views against the
   per-view loop) for the presets below, at 4 and 32 images: the GPU row of issue 19's item 3.
2. `numerics`: on the same random-init DINOv3 ViT-B weights, SDPA against eager attention (fp32, TF32
   off), bf16 autocast and a `torch.compile`d forward against the fp32 eager backbone features of all
   views (refused if those features hardly differ between images: such a comparison proves nothing).
3. `training`: `train_classifier` (the project's training loop, LoRA on a DINOv3 ViT-B, 10 views of
   224 px) on a synthetic drop in four settings of the `gpu` resource: fp32 / bf16-mixed, SDPA / eager
   attention, compile off / on. Seconds per epoch (first epoch: compilation and cold caches; last:
   steady) and each epoch's loss.
4. `pipeline`: the whole core graph without Dagster (`bench.direct_pipeline`: image table, splits,
   ExPLoRA, classifier, three prediction sets, calibration, policies, bundle, test report) on cuda with
   `configs/dinov3_base_gpu.yaml` (bf16-mixed, compile, SDPA, 8 loader workers), random init instead of
   hub weights and fewer epochs. Step times.

    python -m bench.gpu_checks [--out DIR] [--sections multiview,numerics,training,pipeline]
    # results: DIR/gpu_checks.json, or bench/results/gpu_checks.json without --out (`make bench` runs
    # it when torch sees CUDA, and README_TABLE.md gets its rows)
    # the run config resolved through the assets' Config classes needs Dagster; on a machine without it
    # resolve here first and pass the file:  python -m bench.gpu_checks --resolve-only DIR/resolved.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_CONFIG = REPO / "configs" / "dinov3_base_gpu.yaml"
MULTIVIEW_RUNS = [("dinov2_small", 4), ("dinov2_small", 32), ("vit_test_tiny", 4), ("dinov3_base", 32)]
TRAINING_VARIANTS = [  # (name, precision, attention, compile)
    ("fp32, sdpa", "fp32", "sdpa", False),
    ("bf16-mixed, sdpa", "bf16-mixed", "sdpa", False),
    ("bf16-mixed, eager attention", "bf16-mixed", "eager", False),
    ("bf16-mixed, sdpa, compile", "bf16-mixed", "sdpa", True),
]


def resolve_gpu_config(epochs: int = 2, explora_epochs: int = 1, backbone: str | None = None) -> dict:
    """configs/dinov3_base_gpu.yaml through the assets' Config classes, random init (no hub here),
    shorter; `backbone` replaces its backbone (a dry run on a CPU). Needs Dagster (the assets' classes)."""
    import yaml

    from bench.bench_orchestration import resolve_config

    doc = yaml.safe_load(GPU_CONFIG.read_text())
    ops = doc["ops"]
    ops["explora_backbone"]["config"]["backbone"].update(pretrained=False, weights_file=None)
    if backbone:
        ops["explora_backbone"]["config"]["backbone"]["name"] = backbone
    ops["explora_backbone"]["config"]["epochs"] = explora_epochs
    ops["classifier"]["config"].update(epochs=epochs, patience=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu.yaml"
        path.write_text(yaml.safe_dump(doc))
        return resolve_config(path)


def _relative_error(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def section_multiview(device: str, plan: list[tuple[str, int]]) -> dict:
    from bench.bench_multiview import measure

    runs = []
    for preset, batch in plan:
        r = measure(preset, batch, repeats=5, device=device, min_seconds=0.3)  # GPU timings are steady
        print(
            f"[gpu_checks] multiview {preset} x{batch} on {device}: batched / loop = {r['speedup']:.2f}x, "
            f"calls of {batch} crops / loop = {r['chunked_speedup']:.2f}x, loop {r['median_a_seconds']:.4f} s, "
            f"batched {r['median_b_seconds']:.4f} s",
            flush=True,
        )
        runs.append(r)
    return {"runs": runs}


def section_numerics(device: str, preset: str = "dinov3_base") -> dict:
    """Backbone features (B, V, D) of 4 random canvases, not logits: a random-init head can give every
    image the same logit, and a comparison of constants passes whatever the backbone computes."""
    import torch

    from roadwork_core.config import BackboneConfig, exact_fp32
    from roadwork_core.models.classifier import build_classifier

    feats, x = {}, None
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)  # the same weights for both
        model = build_classifier(BackboneConfig(name=preset, attn_backend=attn)).eval().to(device)
        if x is None:
            x = torch.rand(4, 3, model.canvas_size, model.canvas_size, device=device)
        with torch.inference_mode(), exact_fp32():
            feats[attn] = model.forward_features(x).float()
    ref = feats["eager"]
    spread = float(ref.std(dim=0).mean() / ref.abs().mean())  # between images, relative to the scale
    if not spread > 1e-3:
        raise AssertionError(f"the reference features barely depend on the input (spread {spread:.2e})")
    with torch.inference_mode():
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            bf16 = model.forward_features(x).float()
        compiled = torch.compile(model.forward_features)
        with exact_fp32():
            comp = compiled(x).float()
    result = {
        "preset": preset,
        "features_shape": list(ref.shape),
        "reference_spread_between_images": spread,
        "sdpa_vs_eager_relative_error": _relative_error(feats["sdpa"], ref),
        "bf16_autocast_vs_fp32_relative_error": _relative_error(bf16, ref),
        "compiled_vs_eager_relative_error": _relative_error(comp, ref),
        "finite": bool(torch.isfinite(torch.stack([feats["sdpa"], bf16, comp])).all()),
    }
    print(f"[gpu_checks] numerics: {json.dumps(result)}", flush=True)
    return result


def _drop(root: Path, n: int) -> Path:
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = root / "inbox"
    if not (inbox / "v0001" / "_READY").exists():
        make_demo_drop(inbox, "v0001", n=n, seed=0, workers=min(16, os.cpu_count() or 1))
    return inbox


def section_training(device: str, root: Path, resolved: dict, n: int, epochs: int) -> dict:
    import torch

    from roadwork_core.config import (
        BackboneConfig,
        HeadConfig,
        MultiViewConfig,
        TrainConfig,
        apply_torch_flags,
        from_mapping,
    )
    from roadwork_core.data.image_table import build_image_table
    from roadwork_core.data.splits import SplitConfig, assign_splits
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.training.supervised import train_classifier

    inbox = _drop(root, n)
    images = build_image_table([inbox / "v0001"]).images
    ss = resolved["resources"]["split_settings"]
    ratios = {k: ss[k] for k in ("train", "val_select", "val_calib", "val_test")}
    splits = assign_splits(images, SplitConfig(ratios=ratios, radius=ss["radius"]))
    train = splits[splits["split"] == "train"].reset_index(drop=True)
    select = splits[splits["split"] == "val_select"].reset_index(drop=True)
    cc = resolved["ops"]["classifier"]
    bc = resolved["ops"]["explora_backbone"]["backbone"]
    runs = []
    for name, precision, attn, compile_ in TRAINING_VARIANTS:
        apply_torch_flags(deterministic=False)  # the gpu resource's default: TF32 allowed in training
        torch.manual_seed(0)
        model = build_classifier(
            from_mapping(BackboneConfig, bc, attn_backend=attn),
            from_mapping(MultiViewConfig, cc),
            **from_mapping(HeadConfig, cc).__dict__,
        )
        cfg = from_mapping(TrainConfig, cc, seed=0, epochs=epochs, patience=epochs)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = train_classifier(
            model, train, select, cfg, device=device, precision=precision,
            checkpoint_dir=root / "train" / name.replace(", ", "_").replace(" ", "-"),
            compile_backend="inductor" if compile_ else None,
        )  # fmt: skip
        wall = time.perf_counter() - t
        row = {
            "variant": name,
            "precision": precision,
            "attention": attn,
            "compile": compile_,
            "train_images": len(train),
            "views_per_image": model.num_views,
            "batch_size": cfg.batch_size,
            "wall_seconds": round(wall, 2),
            "epoch_seconds": [round(float(h["seconds"]), 3) for h in result.history],
            "train_loss": [round(float(h["train_loss"]), 4) for h in result.history if "train_loss" in h],
            "select_mcc": [round(float(h["select_mcc"]), 4) for h in result.history if "select_mcc" in h],
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if device == "cuda"
            else None,
        }
        print(f"[gpu_checks] training {json.dumps(row)}", flush=True)
        runs.append(row)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"runs": runs}


def section_pipeline(root: Path, resolved: dict, n: int) -> dict:
    from bench.direct_pipeline import run

    inbox = _drop(root, n)
    out = root / "pipeline"
    t = time.perf_counter()
    steps, epoch_seconds = run(resolved, inbox, "v0001", out)
    report = sorted(p.name for p in (out / "report").iterdir()) if (out / "report").is_dir() else []
    result = {
        "steps_seconds": steps,
        "classifier_epoch_seconds": epoch_seconds,
        "wall_seconds": round(time.perf_counter() - t, 2),
        "bundle_files": sorted(p.name for p in (out / "bundle").iterdir()),
        "report_files": report,
    }
    print(f"[gpu_checks] pipeline {json.dumps(result)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="folder for gpu_checks.json (default: bench/results)")
    parser.add_argument("--sections", default="multiview,numerics,training,pipeline")
    parser.add_argument("--resolved", type=Path, help="the resolved GPU run config (else resolved here)")
    parser.add_argument("--resolve-only", type=Path, help="write the resolved GPU run config there and stop")
    parser.add_argument("--n", type=int, default=320, help="images in the synthetic drop")
    parser.add_argument("--epochs", type=int, default=2, help="classifier epochs (training and pipeline)")
    parser.add_argument("--backbone", help="another backbone than the config's (a dry run: vit_test_tiny)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = parser.parse_args(argv)
    if args.resolve_only:
        args.resolve_only.write_text(
            json.dumps(resolve_gpu_config(args.epochs, backbone=args.backbone), indent=1)
        )
        print(f"[gpu_checks] wrote {args.resolve_only}")
        return 0
    import torch

    from bench.common import RESULTS_DIR, machine_facts
    from roadwork_core.io import atomic_write_text

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "[gpu_checks] torch sees no CUDA device (--device cpu: a dry run of the script)", file=sys.stderr
        )
        return 2
    if args.resolved:
        resolved = json.loads(args.resolved.read_text())
    else:
        resolved = resolve_gpu_config(args.epochs, backbone=args.backbone)
    if device == "cpu":  # the dry run: what direct_pipeline would otherwise take from `gpu.device: cuda`
        resolved["resources"]["gpu"].update(device="cpu", compile=False)
        for name in ("classifier", "select_predictions", "calib_predictions", "test_predictions"):
            resolved["ops"][name]["num_workers"] = 0
        resolved["ops"]["explora_backbone"]["num_workers"] = 0
    preset = args.backbone or resolved["ops"]["explora_backbone"]["backbone"]["name"]
    out = args.out or RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine_facts(), "versions": _versions(), "sections": {}}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as tmp:
        root = Path(tmp)
        for section in sections:
            t = time.perf_counter()
            try:
                if section == "multiview":
                    got = section_multiview(
                        device, MULTIVIEW_RUNS if device == "cuda" else [("vit_test_tiny", 2)]
                    )
                elif section == "numerics":
                    got = section_numerics(device, preset)
                elif section == "training":
                    got = section_training(device, root, resolved, args.n, args.epochs)
                elif section == "pipeline":
                    got = section_pipeline(root, resolved, args.n)
                else:
                    raise ValueError(f"unknown section {section!r}")
                got["seconds"] = round(time.perf_counter() - t, 1)
            except Exception as exc:  # record it and go on: the device time is spent either way
                traceback.print_exc()
                got = {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - t, 1)}
            results["sections"][section] = got
            atomic_write_text(out / "gpu_checks.json", json.dumps(results, indent=1) + "\n")
    failed = [s for s, r in results["sections"].items() if "error" in r]
    print(f"[gpu_checks] done; failed sections: {failed or 'none'}")
    return 1 if failed else 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "timm", "peft", "torchmetrics", "safetensors", "numpy", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
