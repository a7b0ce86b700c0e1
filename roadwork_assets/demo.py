"""`make demo`: a synthetic drop -> the whole graph through the real `dagster asset materialize` CLI on
the embedded instance -> a summary -> a `roadwork predict` call from a fresh process.

    python -m roadwork_assets.demo --inbox data/inbox --version v0001 --n 2000 --config configs/demo.yaml
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from roadwork_assets._util import latest_materialization_metadata
from roadwork_assets.partitions import dataset_version


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def ensure_drop(inbox: Path, version: str, n: int, seed: int, n_unlabelled: int) -> Path:
    from roadwork_core.data.synthetic import make_demo_drop

    drop = inbox / version
    if (drop / "_READY").exists():
        print(f"[demo] drop {drop} already complete; reusing it")
        return drop
    t0 = time.perf_counter()
    make_demo_drop(inbox, version, n=n, seed=seed, n_unlabelled=n_unlabelled)
    print(
        f"[demo] wrote {n} synthetic scenes (+{n_unlabelled} unlabelled) to {drop} in {time.perf_counter() - t0:.1f}s"
    )
    return drop


def materialize(version: str, config: Path) -> None:
    cmd = [
        _bin("dagster"),
        "asset",
        "materialize",
        "-m",
        "roadwork_assets.definitions",
        "--select",
        "*",
        "--partition",
        version,
        "-c",
        str(config),
    ]
    print("[demo] " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"[demo] dagster asset materialize failed (exit {proc.returncode}); see the log above"
        )
    print(f"[demo] graph materialized in {time.perf_counter() - t0:.1f}s")


def summarize(instance: dg.DagsterInstance, version: str) -> Path:
    def meta(asset: str) -> dict:
        return latest_materialization_metadata(instance, dg.AssetKey(asset), version)

    manifest, clf, bundle_meta, report_meta = (
        meta("image_manifest"),
        meta("classifier"),
        meta("bundle"),
        meta("evaluation_report"),
    )
    bundle_dir = Path(bundle_meta["path"]) / "dir"
    report_dir = Path(report_meta["path"]) / "dir"
    report = json.loads((report_dir / "report.json").read_text())
    print("\n==== roadwork demo summary ====")
    print(
        f"dataset version {version}: {manifest.get('num_images')} images accepted, {manifest.get('num_rejected')} rejected"
    )
    speedup = clf.get("cache_speedup_first_vs_later_epochs")
    print(
        f"classifier: mode {clf.get('mode')}, best epoch {clf.get('best_epoch')} of {clf.get('epochs_run')}, "
        f"val_select MCC {clf.get('best_select_mcc', float('nan')):.3f}"
        + (f", feature cache: epoch 1 / later epochs = {speedup:.0f}x" if speedup else "")
    )
    print(f"bundle ({bundle_meta.get('release_policy')} policy) at {bundle_dir}")
    print(f"  guarantee: {bundle_meta.get('guarantee')}")
    print(
        f"  on val_calib: coverage {bundle_meta.get('calib_coverage', float('nan')):.3f}, "
        f"FNR {bundle_meta.get('calib_fnr', float('nan')):.3f}, FPR {bundle_meta.get('calib_fpr', float('nan')):.3f}"
    )
    print(f"evaluation on val_test ({report_dir}):")
    print((report_dir / "summary.md").read_text())
    guarantee = report.get("guarantee_check", {})
    print(f"guarantee check on val_test: {guarantee.get('message')}")
    stream = (report.get("subnet") or {}).get("stream") or []
    if stream:  # the headline of the subnet section printed above
        print(
            "subnet (validator replica), expected reward per query: "
            + ", ".join(
                f"{r['answer']} {r['expected_reward']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" for r in stream
            )
        )
    print("\nLook at it:")
    print(
        "  Dagster UI:  make ui   (then http://127.0.0.1:3000, asset evaluation_report, partition "
        + version
        + ")"
    )
    print(f"  MLflow UI:   {mlflow_ui_command(os.environ.get('MLFLOW_TRACKING_URI'))}")
    return bundle_dir


def mlflow_ui_command(tracking_uri: str | None) -> str:
    """The `mlflow ui` line to print: bound to 127.0.0.1; a URI with credentials is never printed
    (the line refers to $MLFLOW_TRACKING_URI instead, which the user's shell already holds)."""
    from urllib.parse import urlsplit

    store = tracking_uri or "sqlite:///state/mlflow.db"
    lowered = store.lower()
    if (
        urlsplit(store).password is not None
        or "@" in store
        or any(k in lowered for k in ("password", "token"))
    ):
        store = '"$MLFLOW_TRACKING_URI"'
    return f".venv/bin/mlflow ui --backend-store-uri {store} --host 127.0.0.1"


def predict_demo(bundle_dir: Path, drop: Path, k: int = 3) -> None:
    images = sorted((drop / "images").glob("*.jpg"))[:k]
    cmd = [_bin("roadwork"), "predict", "--bundle", str(bundle_dir), *map(str, images)]
    print("\n[demo] " + " ".join(cmd))
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    print(proc.stdout.strip())
    if proc.returncode != 0:
        raise SystemExit(f"[demo] roadwork predict failed (exit {proc.returncode}): {proc.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inbox", default=os.environ.get("ROADWORK_INBOX", "data/inbox"))
    parser.add_argument("--version", default="v0001")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n-unlabelled", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument(
        "--no-ablation",
        dest="ablation",
        action="store_false",
        help="skip the ExPLoRA head-probe ablation at the end",
    )
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    drop = ensure_drop(Path(args.inbox), args.version, args.n, args.seed, args.n_unlabelled)
    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(dataset_version.name, args.version):
        instance.add_dynamic_partitions(dataset_version.name, [args.version])
    materialize(args.version, Path(args.config))
    bundle_dir = summarize(instance, args.version)
    predict_demo(bundle_dir, drop)
    if args.ablation:
        from roadwork_assets import ablation

        print(
            "\n[demo] python -m roadwork_assets.ablation --partition " + args.version + " -c " + args.config
        )
        ablation.main(["--partition", args.version, "-c", args.config])
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
