"""Multi-view: one batched backbone forward over all B*V views against a loop over the V views.

Both sides normalise the same canvases and cut the same views (`extract_views`); A then calls the
backbone once per view index (V calls on B crops each), B is `RoadworkClassifier.forward_features`
(one call on B*V crops). Ratio = throughput(B) / throughput(A) = seconds(A) / seconds(B).
Target >= 1.5x on 2 CPU cores. Also timed against A: the same pass split into calls of B crops
(`RoadworkClassifier.views_per_call`, `chunked_speedup`): the loop's call shapes without the loop, to
tell cache effects (a call on 40 ViT-S crops holds ~60 MB per MLP activation) from per-call overhead.
Runs on cuda as well when it is available.

    python -m bench.bench_multiview [--preset dinov2_small] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import machine_facts, set_threads, side_by_side, write_result
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.multiview import extract_views

TARGET = 1.5


def per_view_loop(model, canvas: torch.Tensor) -> torch.Tensor:
    """The same features as model.forward_features, but one backbone call per view index."""
    x = (canvas - model.mean) / model.std
    views = extract_views(x, model.mv)  # (B, V, 3, S, S)
    feats = [model.backbone(views[:, v]) for v in range(views.shape[1])]  # V x (B, D)
    return torch.stack(feats, dim=1)  # (B, V, D)


def measure(preset: str, batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name=preset)).eval().to(device)
    C = model.canvas_size
    canvas = torch.rand(batch, 3, C, C, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    @torch.inference_mode()
    def loop() -> None:
        per_view_loop(model, canvas)
        sync()

    @torch.inference_mode()
    def batched() -> None:
        model.forward_features(canvas)
        sync()

    @torch.inference_mode()
    def chunked() -> None:
        model.views_per_call = batch  # backbone calls of B crops, like the loop's
        try:
            model.forward_features(canvas)
        finally:
            model.views_per_call = None
        sync()

    with torch.inference_mode():  # the two paths compute the same features
        diff = (per_view_loop(model, canvas) - model.forward_features(canvas)).abs().max().item()
    sbs = side_by_side(loop, batched, repeats=repeats, warmup=1, min_seconds=1.0)
    split = side_by_side(loop, chunked, repeats=repeats, warmup=1, min_seconds=1.0)
    return {
        "preset": preset,
        "device": device,
        "batch_images": batch,
        "views_per_image": model.num_views,
        "view_size": model.mv.view_size,
        "canvas_size": C,
        "max_abs_feature_difference": diff,
        "a": "per-view loop (V backbone calls of B crops)",
        "b": "forward_features (one backbone call of B*V crops)",
        **sbs.as_dict(),
        "speedup": round(sbs.median_ratio, 4),
        "chunked": split.as_dict(),
        "chunked_speedup": round(split.median_ratio, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="dinov2_small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extra-preset", default="vit_test_tiny", help="also measure this one (the demo's)")
    args = parser.parse_args(argv)
    threads = set_threads()
    facts = machine_facts()
    runs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for preset in [args.preset] + ([args.extra_preset] if args.extra_preset else []):
            r = measure(preset, args.batch, args.repeats, device)
            print(
                f"[bench_multiview] {preset} on {device} ({threads} threads), {args.batch} images x "
                f"{r['views_per_image']} views: batched / per-view loop throughput = {r['speedup']:.2f}x "
                f"(split into calls of {args.batch} crops: {r['chunked_speedup']:.2f}x) "
                f"(repeats {r['ratios_a_over_b']}); target >= {TARGET}"
            )
            runs.append(r)
    primary = runs[0]
    write_result(
        "multiview",
        {
            "benchmark": "multiview_batched_forward",
            "what": "one backbone forward on B*V views vs a loop over V views (same model, same canvases)",
            "primary": f"{primary['preset']} random init, {primary['view_size']} px views, {primary['device']}",
            "ratio": primary["speedup"],
            "target": f">= {TARGET}",
            "met": primary["speedup"] >= TARGET,
            "runs": runs,
            "machine": facts,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
