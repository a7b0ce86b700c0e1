"""`make bench`: run every benchmark in its own process, then write bench/results/README_TABLE.md.

Each benchmark is a separate interpreter so that one's threads, caches and allocator state do not
leak into the next. The end-to-end `make demo` run takes the longest (about 10 minutes with the
default 2000 images on 2 cores); `--skip-demo` keeps its previous result, `--demo-n` shrinks it.

    python -m bench.run_all [--only multiview bundle ...] [--skip-demo] [--skip-tests] [--demo-n 2000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR, read_result
from roadwork_core.io import atomic_write_text

# name -> (module, result file, table row: what is compared, target text)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "multiview": ("bench.bench_multiview", "multiview"),
    "bundle": ("bench.bench_bundle", "bundle"),
    "feature_cache": ("bench.bench_feature_cache", "feature_cache"),
    "scaling": ("bench.bench_scaling", "scaling"),
    "orchestration": ("bench.bench_orchestration", "orchestration"),
    "orchestration_demo": ("bench.bench_orchestration", "orchestration_demo"),
    "demo": ("bench.bench_demo", "demo"),
    "demo_epoch": ("bench.bench_demo_epoch", "demo_epoch"),
    "distortions": ("bench.bench_distortions", "distortions"),
    "image_table": ("bench.bench_image_table", "image_table"),
    "image_table_reuse": ("bench.bench_image_table_reuse", "image_table_reuse"),
    "exit": ("bench.bench_exit", "exit"),
    "gc_threshold": ("bench.bench_gc_threshold", "gc_threshold"),
    "ddp": ("bench.bench_ddp", "ddp"),
    "serve": ("bench.bench_serve", "serve"),
    "tests": ("bench.bench_tests", "tests"),
    "gpu_checks": ("bench.gpu_checks", "gpu_checks"),  # only where torch sees CUDA
}


def _machine(result: dict, device: str = "cpu") -> str:
    m = result.get("machine", {})
    if device == "cuda" and m.get("cuda_device"):
        return str(m["cuda_device"])
    return (
        f"{m.get('usable_cores')} cores ({m.get('cpu_model', 'CPU')}), {m.get('torch_threads')} torch threads"
    )


def _speed(result: dict) -> str:
    """The speed reference (bench.common.speed_reference) before / after a benchmark of wall time."""
    before, after = result.get("speed_reference_before"), result.get("speed_reference_after")
    if not (before and after):
        return ""
    return (
        f"; speed reference before / after: torch+timm import {before['import_torch_timm_seconds']:.1f} / "
        f"{after['import_torch_timm_seconds']:.1f} s, ViT-S forward {before['forward_seconds']:.2f} / "
        f"{after['forward_seconds']:.2f} s"
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table_rows() -> list[list[str]]:
    rows: list[list[str]] = []
    r = read_result("multiview")
    if r:
        for run in r["runs"]:
            rows.append(
                [
                    "1. multi-view batched forward",
                    f"one backbone call on {run['batch_images']}x{run['views_per_image']} views vs a loop over "
                    f"{run['views_per_image']} views; {run['preset']} random init, {run['view_size']} px, {run['device']}"
                    + (
                        f" (split into calls of {run['batch_images']} crops: {run['chunked_speedup']:.2f}x)"
                        if "chunked_speedup" in run
                        else ""
                    ),
                    f"{run['speedup']:.2f}x (n={run['repeats']})",
                    ">= 1.5x",
                    _yes(run["speedup"] >= 1.5),
                    _machine(r, run["device"]),
                ]
            )
    r = read_result("bundle")
    if r:
        for run in r["runs"]:
            rows.append(
                [
                    "2. bundle overhead",
                    f"Bundle.predict on {run['batch_images']} 224x224 JPEGs vs raw backbone on "
                    f"{run['crops_per_forward']} crops; {run['preset']}, {run['device']}",
                    f"{run['throughput_ratio']:.2f} (n={run['repeats']})",
                    ">= 0.9",
                    _yes(run["throughput_ratio"] >= 0.9),
                    _machine(r, run["device"]),
                ]
            )
    r = read_result("feature_cache")
    if r:
        rows.append(
            [
                "3. head-mode feature cache",
                f"head-mode epoch, empty cache vs warm cache; {r['preset']}, {r['n_train']} train + "
                f"{r['n_select']} select images (one run: epoch 1 / later = {r['one_run_epoch1_over_median_later']:.1f}x)",
                f"{r['ratio']:.1f}x (n={r['repeats']})",
                ">= 20x",
                _yes(r["met"]),
                _machine(r),
            ]
        )
    for name in ("orchestration", "orchestration_demo"):
        r = read_result(name)
        if r:
            rows.append(
                [
                    "4. orchestration overhead",
                    f"`dagster asset materialize` vs the same core calls in one script; {r['n_images']} images, "
                    f"{r['config']} (without start-up: {r['ratio_without_startup']:.2f}x)",
                    f"{r['ratio']:.2f}x (n={r['repeats']})",
                    r.get("target", "<= 1.15x"),
                    _yes(r["met"]),
                    _machine(r) + _speed(r),
                ]
            )
    r = read_result("demo")
    if r:
        rows.append(
            [
                "5. end to end",
                f"`make demo` ({r['n_images']} images) wall after set-up; peak RSS {r['peak_tree_rss_mib']:.0f} MiB "
                f"(process tree)"
                + (
                    f"; val_test MCC {r['steps']['val_test_mcc']:.3f}"
                    if "val_test_mcc" in r.get("steps", {})
                    else ""
                ),
                f"{r['wall_seconds'] / 60:.1f} min (n=1)",
                r.get("target", "wall <= 600 s").replace("wall ", ""),
                _yes(r["met"]),
                _machine(r) + _speed(r),
            ]
        )
    r = read_result("demo_epoch")
    if r:
        rows.append(
            [
                "5. demo classifier epoch",
                f"{r['what']}; load average {r['machine']['load_average_1m_5m_15m'][0]:.1f} (shared machine)",
                f"{r['median_ratio_a_over_b']:.2f}x (n={r['repeats']})",
                "B faster (> 1x)",
                _yes(r["median_ratio_a_over_b"] > 1.0),
                _machine(r),
            ]
        )
    r = read_result("scaling")
    if r:
        sizes = "/".join(str(s) for s in r["sizes"])
        for kind in ("inference", "training"):
            rows.append(
                [
                    f"6. scaling, {kind}",
                    f"time vs images ({sizes}); log-log slope; {r['preset']}",
                    f"n^{r[kind]['exponent']:.2f} (n={r['repeats']})",
                    "~n^1 (linear)",
                    _yes(r[kind]["exponent"] <= 1.15),
                    _machine(r),
                ]
            )
    r = read_result("ddp")
    if r:
        rows.append(
            [
                "7. data-parallel training",
                f"{r['mode']}-mode epoch, 1 vs {r['nproc']} processes (torchrun + DDP, "
                f"{r['device']}); {r['preset']}, {r['n_train']} train images",
                f"{r['median_ratio_1_over_n']:.2f}x (n={r['repeats']})",
                "none expected on 2 CPU cores; ~N x on N GPUs",
                "n/a",
                _machine(r, r["device"]),
            ]
        )
    r = read_result("serve")
    if r:
        cold = r["cold_start_seconds"]
        load = (r["machine"].get("load_average_1m_5m_15m") or [None])[0]
        busy = f"; load average {load:.1f} at the start (shared machine)" if load is not None else ""
        for run in r["runs"]:
            rows.append(
                [
                    f"8. serving, {run['clients']} client(s)",
                    f"{run['server']}: p50 / p99 per request and throughput, {r['preset']} random init, 10 views, "
                    f"one 224 px base64 JPEG per request, loopback; cold start {cold.get(run['server'], 0):.1f} s{busy}",
                    f"p50 {run['p50_seconds']:.2f} s, p99 {run['p99_seconds']:.2f} s, {run['throughput_rps']:.2f} req/s "
                    f"(n={run['requests']})",
                    "p99 <= 9 s (validator)",
                    _yes(run["p99_seconds"] <= r["validator_timeout_seconds"]),
                    _machine(r),
                ]
            )
    r = read_result("distortions")
    if r:
        for key, row in r["rows"].items():
            w, h = row["image_size"]
            rows.append(
                [
                    "5. robustness distortions",
                    f"`distort` level {key[-1]} on PIL kernels vs the whole level on a uint8 tensor, {w}x{h}, "
                    f"1 thread: {row['tensor_ms_per_image']} vs {row['pil_ms_per_image']} ms an image",
                    f"{row['median_ratio_a_over_b']:.2f}x (n={row['repeats']})",
                    "B faster (> 1x)",
                    _yes(row["median_ratio_a_over_b"] > 1.0),
                    _machine(r),
                ]
            )
    r = read_result("image_table")
    if r:
        rows.append(
            [
                "5. image table",
                f"{r['what']} (median {statistics.median(r['threads_seconds']):.1f} vs "
                f"{statistics.median(r['processes_seconds']):.1f} s)",
                f"{r['median_ratio']:.2f}x (n={r['repeats']})",
                "B faster (> 1x)",
                _yes(r["median_ratio"] > 1.0),
                _machine(r) + _speed(r),
            ]
        )
    r = read_result("image_table_reuse")
    if r:
        rows.append(
            [
                "5. image table of a grown version",
                f"{r['what']} (median {statistics.median(r['again_seconds']):.1f} vs "
                f"{statistics.median(r['reuse_seconds']):.1f} s; {r['n_reused']} reused)",
                f"{r['median_ratio']:.2f}x (n={r['repeats']})",
                "B faster (> 1x)",
                _yes(r["median_ratio"] > 1.0),
                _machine(r) + _speed(r),
            ]
        )
    r = read_result("exit")
    if r:
        rows.append(
            [
                "4. process exit (orchestration and suite fixed cost)",
                "a fresh interpreter with torch, torchmetrics, timm, dagster and mlflow imported, from its last "
                f"statement to its end: without vs with roadwork_core's `gc.freeze` atexit hook: "
                f"{r['median_a_seconds']:.2f} vs {r['median_b_seconds']:.2f} s",
                f"{r['median_ratio_a_over_b']:.2f}x (n={r['repeats']})",
                "B faster (> 1x)",
                _yes(r["median_ratio_a_over_b"] > 1.0),
                _machine(r),
            ]
        )
    r = read_result("gc_threshold")
    if r:
        rows.append(
            [
                "4. imports under roadwork's garbage-collector threshold (orchestration and suite fixed cost)",
                "CPU seconds of a fresh interpreter importing the training and orchestration stack and the "
                "definitions at CPython's default thresholds (700, 10, 10) vs roadwork_core's (7000, 10, 10): "
                f"{r['median_a_seconds']:.2f} vs {r['median_b_seconds']:.2f} CPU-s",
                f"{r['median_ratio_a_over_b']:.2f}x (n={r['repeats']})",
                "B faster (> 1x)",
                _yes(r["median_ratio_a_over_b"] > 1.0),
                _machine(r),
            ]
        )
    r = read_result("tests")
    if r:
        load = r["definitions_load"]
        rows.append(
            [
                "9. loading the Dagster definitions",
                "fresh `import roadwork_assets.definitions` (code server, CLI, sensor, run worker) vs the same plus "
                "torch + torchmetrics, which it imported before they moved into the asset bodies",
                f"{load['median_ratio_a_over_b']:.2f}x faster: {load['median_b_seconds']:.1f} s vs "
                f"{load['median_a_seconds']:.1f} s (n={load['repeats']})",
                "no training stack imported (tests/unit/test_import_cost.py)",
                _yes(load["median_ratio_a_over_b"] > 1.0),
                _machine(r),
            ]
        )
        suite = r.get("suite")
        if suite:
            serial = r.get("suite_serial")
            versus = f"; one process: {serial['seconds'] / 60:.1f} min" if serial else ""
            rows.append(
                [
                    "10. the test suite",
                    f"`make test`'s pytest (xdist `-n auto`, slow tests first), nothing skipped{versus}",
                    f"{suite['median_seconds'] / 60:.1f} min (n={len(suite['runs'])}; {suite['runs'][-1]['summary']})",
                    "<= 6 min",
                    _yes(suite["all_green"] and suite["median_seconds"] <= 360),
                    _machine(r) + _speed(suite),
                ]
            )
    return rows


def write_table() -> Path:
    header = ["benchmark", "what is compared", "median ratio", "target", "met?", "machine"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *(
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
            for row in [*table_rows(), *_gpu_rows()]
        ),
        "",
        "Every figure is a ratio of two things timed side by side in one process (A and B alternate "
        "each repeat), median over n repeats; details, per-repeat figures and machine facts in "
        "`bench/results/*.json`. Regenerate with `make bench`.",
    ]
    path = RESULTS_DIR / "README_TABLE.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"[bench] wrote {path}")
    return path


def _cuda_available() -> bool:
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _gpu_rows() -> list[list[str]]:
    """bench.gpu_checks: the multi-view row on a GPU and the training settings of the `gpu` resource."""
    r = read_result("gpu_checks")
    if not r:
        return []
    rows, machine = [], _machine(r, "cuda")
    for run in r["sections"].get("multiview", {}).get("runs", []):
        rows.append(
            [
                "1. multi-view batched forward, GPU",
                f"one backbone call on {run['batch_images']}x{run['views_per_image']} views vs a loop over "
                f"{run['views_per_image']} views; {run['preset']} random init, {run['view_size']} px, cuda, fp32 "
                f"(loop {run['median_a_seconds'] * 1e3:.1f} ms, one call {run['median_b_seconds'] * 1e3:.1f} ms; "
                f"calls of {run['batch_images']} crops: {run['chunked_speedup']:.2f}x)",
                f"{run['speedup']:.2f}x (n={run['repeats']})",
                ">= 1.5x",
                _yes(run["speedup"] >= 1.5),
                machine,
            ]
        )
    runs = r["sections"].get("training", {}).get("runs", [])
    base = next((run for run in runs if run["precision"] == "fp32"), None)
    for run in runs:
        last = run["epoch_seconds"][-1]
        rows.append(
            [
                "11. classifier training on a GPU",
                f"`train_classifier`, {run['variant']}; LoRA on random-init DINOv3 ViT-B/16, {run['train_images']} "
                f"images x {run['views_per_image']} views, batch {run['batch_size']}; epochs "
                + " / ".join(f"{s:.1f}" for s in run["epoch_seconds"])
                + f" s (the first compiles and warms up), peak {run['peak_memory_gib']} GiB",
                f"{base['epoch_seconds'][-1] / last:.2f}x fp32's last epoch" if base else f"{last:.1f} s",
                "faster than fp32",
                "n/a" if run is base else _yes(base is not None and last < base["epoch_seconds"][-1]),
                machine,
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument(
        "--skip-demo",
        action="store_true",
        help="keep the previous results of the two demo-sized runs (demo, orchestration_demo)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="keep the previous test-suite timing")
    parser.add_argument("--demo-n", type=int, default=2000)
    parser.add_argument("--table-only", action="store_true", help="rewrite README_TABLE.md from the JSON")
    args = parser.parse_args(argv)
    failed = []
    if not args.table_only:
        skipped = {"demo", "orchestration_demo"} if args.skip_demo else set()
        names = args.only or [n for n in BENCHMARKS if n not in skipped]
        for name in names:
            module, _ = BENCHMARKS[name]
            if name == "gpu_checks" and not _cuda_available():
                print(
                    "[bench] gpu_checks skipped: torch sees no CUDA device (its last result stays)",
                    flush=True,
                )
                continue
            cmd = [sys.executable, "-m", module] + (["--n", str(args.demo_n)] if name == "demo" else [])
            if name == "orchestration_demo":  # issue 19: the demo's own workload, target <= 1.10x
                cmd += ["--config", "configs/demo.yaml", "--n", str(args.demo_n), "--repeats", "2"]
                cmd += ["--result", name, "--target", "1.10"]
            if name == "tests" and args.skip_tests:
                cmd.append("--skip-suite")
            print(f"[bench] {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, check=False)
            print(
                f"[bench] {name} finished in {time.perf_counter() - t0:.0f}s (exit {proc.returncode})",
                flush=True,
            )
            if proc.returncode != 0:
                failed.append(name)
    write_table()
    if failed:
        print(f"[bench] failed: {failed}; their previous results (if any) are in the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
