"""Bundle overhead: `Bundle.predict` images/s against the raw timm backbone forward on the same crops.

A: the backbone alone on a ready (B*V, 3, S, S) tensor (the crops B images become).
B: `Bundle.predict` on B 224x224 JPEG byte strings (what the network sends): decode, canvas resize,
normalise, view extraction, the same backbone forward, head, aggregator, uncertainty features,
calibration and the policy. Ratio = throughput(B) / throughput(A) = seconds(A) / seconds(B).
Target >= 0.9 (everything around the forward costs at most 10%).

    python -m bench.bench_bundle [--preset dinov2_small] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from bench.common import machine_facts, set_threads, side_by_side, write_result
from roadwork_core.bundle import Bundle, export_bundle
from roadwork_core.calibration import fit_calibrator, fit_threshold_policy
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.serialization import save_classifier

TARGET = 0.9


def street_like_jpegs(n: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """Smooth images with edges (JPEG-compressible like photos, unlike uniform noise), quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(6 * x * rng.uniform(0.5, 2)), np.cos(5 * y * rng.uniform(0.5, 2)), x * y], -1)
        noise = rng.normal(0, 0.05, (size, size, 3))
        pixels = np.clip((base * 0.5 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_bundle(preset: str, root: Path) -> Path:
    """A classifier saved with save_classifier + a fitted temperature calibrator + a threshold policy."""
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name=preset)).eval()
    save_classifier(root / "classifier", model, extra={"bench": True})
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 400)
    labels = (rng.uniform(size=400) < 1 / (1 + np.exp(-logits / 2))).astype(int)
    calibrator, _ = fit_calibrator(logits, labels, methods=("temperature",))
    policy = fit_threshold_policy(np.asarray(calibrator.transform(logits)), labels, target_fnr=0.05)
    return export_bundle(
        root / "bundle",
        classifier_dir=root / "classifier",
        calibrator=calibrator,
        policy=policy,
        dataset_version="bench",
        upstream_versions={},
        metrics_summary={},
        code_version="bench",
    )


def measure(preset: str, batch: int, repeats: int, device: str, root: Path) -> dict:
    bundle = Bundle.load(build_bundle(preset, root / preset), device=device)
    model = bundle.model
    V, S = model.num_views, model.mv.view_size
    jpegs = street_like_jpegs(batch)
    crops = torch.randn(batch * V, 3, S, S, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    @torch.inference_mode()
    def raw() -> None:
        model.backbone(crops)
        sync()

    def predict() -> None:
        preds = bundle.predict(jpegs, batch_size=batch)
        assert len(preds) == batch, f"Bundle.predict returned {len(preds)} predictions for {batch} images"

    sbs = side_by_side(raw, predict, repeats=repeats, warmup=1, min_seconds=1.0)
    return {
        "preset": preset,
        "device": device,
        "batch_images": batch,
        "views_per_image": V,
        "crops_per_forward": batch * V,
        "view_size": S,
        "canvas_size": model.canvas_size,
        "input": f"{batch} x 224x224 JPEG bytes (quality 90)",
        "decode_workers": bundle.decode_workers,
        "a": "raw timm backbone forward on B*V crops",
        "b": "Bundle.predict on B JPEGs",
        **sbs.as_dict(),
        "throughput_ratio": round(sbs.median_ratio, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="dinov2_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extra-preset", default="vit_test_tiny", help="also measure this one (the demo's)")
    args = parser.parse_args(argv)
    threads = set_threads()
    facts = machine_facts()
    runs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory(prefix="roadwork-bench-bundle-") as tmp:
        for device in devices:
            for preset in [args.preset] + ([args.extra_preset] if args.extra_preset else []):
                r = measure(preset, args.batch, args.repeats, device, Path(tmp) / device)
                print(
                    f"[bench_bundle] {preset} on {device} ({threads} threads), {args.batch} JPEGs x "
                    f"{r['views_per_image']} views: Bundle.predict / raw backbone throughput = "
                    f"{r['throughput_ratio']:.3f} (repeats {r['ratios_a_over_b']}); target >= {TARGET}"
                )
                runs.append(r)
    primary = runs[0]
    write_result(
        "bundle",
        {
            "benchmark": "bundle_overhead",
            "what": "Bundle.predict images/s over raw backbone forward images/s on the same B*V crops",
            "primary": f"{primary['preset']} random init, {primary['view_size']} px views, {primary['device']}",
            "ratio": primary["throughput_ratio"],
            "target": f">= {TARGET}",
            "met": primary["throughput_ratio"] >= TARGET,
            "runs": runs,
            "machine": facts,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
