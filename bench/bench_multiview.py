"""Multi-view: one batched backbone forward over all B*V views against a loop over the V views.

Both sides normalise the same canvases and cut the same views (`extract_views`); A then calls the
backbone once per view index (V calls on B crops each), B is `RoadworkClassifier.forward_features`
(one call on B*V crops). Ratio = throughput(B) / throughput(A) = seconds(A) / seconds(B).
Target >= 1.5x on 2 CPU cores. Also timed against A: the same pass split into calls of B crops
(`RoadworkClassifier.views_per_call`, `chunked_speedup`): the loop's call shapes without the loop, to
tell cache effects (a call on 40 ViT-S crops holds ~60 MB per MLP activation) from per-call overhead.
Runs on cuda as well when it is available.

    python -m bench.bench_multiview [--preset dinov2_small] [--batch 4] [--repeats 5]
    # where the time goes in each layout (torch.profiler, per operator, loop vs one call); prints a table
    python -m bench.bench_multiview --profile [--preset dinov2_small] [--batch 4]
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import machine_facts, set_threads, side_by_side, write_result
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import auto_views_per_call, build_classifier
from roadwork_core.models.multiview import extract_views

TARGET = 1.5


def per_view_loop(model, canvas: torch.Tensor) -> torch.Tensor:
    """The same features as model.forward_features, but one backbone call per view index."""
    x = (canvas - model.mean) / model.std
    views = extract_views(x, model.mv)  # (B, V, 3, S, S)
    feats = [model.backbone(views[:, v]) for v in range(views.shape[1])]  # V x (B, D)
    return torch.stack(feats, dim=1)  # (B, V, D)


def measure(preset: str, batch: int, repeats: int, device: str, min_seconds: float = 1.0) -> dict:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name=preset)).eval().to(device)
    model.views_per_call = None  # B: one call on every crop (the default "auto" is recorded below)
    C = model.canvas_size
    S = model.mv.view_size
    auto = auto_views_per_call(model.backbone, torch.empty(1, 3, S, S, device=device))
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
    sbs = side_by_side(loop, batched, repeats=repeats, warmup=1, min_seconds=min_seconds)
    split = side_by_side(loop, chunked, repeats=repeats, warmup=1, min_seconds=min_seconds)
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
        "auto_views_per_call": auto,  # what RoadworkClassifier's default ("auto") uses here
    }


def profile_layouts(preset: str, batch: int, repeats: int = 3) -> list[dict]:
    """torch.profiler self CPU time per operator: the per-view loop against one call on B*V crops."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name=preset)).eval()
    model.views_per_call = None  # one call on every crop
    canvas = torch.rand(batch, 3, model.canvas_size, model.canvas_size)
    layouts = {
        "loop": lambda: per_view_loop(model, canvas),
        "batched": lambda: model.forward_features(canvas),
    }
    per_op: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for fn in layouts.values():
            fn()  # warm-up
        for name, fn in layouts.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(repeats):
                    fn()
            for event in prof.key_averages():
                per_op.setdefault(event.key, {})[name] = event.self_cpu_time_total / 1e3 / repeats  # ms
    rows = [
        {"op": op, "loop_ms": t.get("loop", 0.0), "batched_ms": t.get("batched", 0.0)}
        for op, t in per_op.items()
    ]
    rows.sort(key=lambda r: -max(r["loop_ms"], r["batched_ms"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="dinov2_small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extra-preset", default="vit_test_tiny", help="also measure this one (the demo's)")
    parser.add_argument(
        "--profile", action="store_true", help="print the per-operator profile of both layouts"
    )
    args = parser.parse_args(argv)
    threads = set_threads()
    if args.profile:
        rows = profile_layouts(args.preset, args.batch)
        print(f"{args.preset}, {args.batch} images, {threads} threads: self CPU ms per pass")
        print(f"{'operator':44} {'loop':>9} {'one call':>9} {'one/loop':>9}")
        for r in rows[:15]:
            ratio = r["batched_ms"] / r["loop_ms"] if r["loop_ms"] else float("nan")
            print(f"{r['op'][:44]:44} {r['loop_ms']:9.1f} {r['batched_ms']:9.1f} {ratio:9.2f}")
        total = {k: sum(r[k] for r in rows) for k in ("loop_ms", "batched_ms")}
        print(f"{'total':44} {total['loop_ms']:9.1f} {total['batched_ms']:9.1f}")
        return 0
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
