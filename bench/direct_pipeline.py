"""The asset graph's roadwork_core calls from one plain script, no Dagster: the baseline that
bench_orchestration compares `dagster asset materialize` against.

It mirrors the assets in roadwork_assets/*.py call for call with the resolved config values that
bench_orchestration writes (`--resolved`, the same YAML read through the assets' own Config
classes): build_image_table -> assign_splits -> filter_unlabelled_pool -> run_explora ->
train_classifier -> predict_frame x3 -> fit_calibrator -> threshold / gate / SCRC policies ->
export_bundle -> evaluate_bundle_on_test.
Not mirrored: asset checks, MLflow logging, the IO manager's sha256 records (that is the overhead
being measured).

    python -m bench.direct_pipeline --resolved cfg.json --inbox DIR --version v0001 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path


def _setup(gpu: dict) -> None:
    """What GPUResource.setup does: threads, determinism / TF32 flags and seeds."""
    import numpy as np
    import torch

    from roadwork_core.config import apply_torch_flags

    apply_torch_flags(threads=gpu["threads"], deterministic=gpu.get("deterministic", False))
    random.seed(gpu["seed"])
    np.random.seed(gpu["seed"] % (2**32))
    torch.manual_seed(gpu["seed"])


def _device_and_precision(gpu: dict) -> tuple[str, str]:
    """GPUResource.torch_device / effective_precision: `auto` takes CUDA when torch sees it; a CPU runs
    fp32 whatever the precision asked for (fp16 needs CUDA, bf16 on a CPU is slower than fp32)."""
    import torch

    device = gpu["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gpu.device is 'cuda' but torch sees no CUDA device; set device: auto or cpu")
    precision = "fp32" if device == "cpu" else gpu["precision"]
    return device, precision


def run(resolved: dict, inbox: Path, version: str, out: Path) -> dict:
    import numpy as np
    from safetensors.torch import load_file, save_file

    from roadwork_core.bundle.export import export_bundle
    from roadwork_core.calibration.calibrators import fit_calibrator
    from roadwork_core.calibration.gate import fit_gate_policy
    from roadwork_core.calibration.policy import policy_name
    from roadwork_core.calibration.scrc import fit_scrc_policy
    from roadwork_core.calibration.threshold import fit_threshold_policy
    from roadwork_core.config import (
        BackboneConfig,
        ExploraConfig,
        HeadConfig,
        MultiViewConfig,
        TrainConfig,
        exact_fp32,
        from_mapping,
    )
    from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
    from roadwork_core.data.drops import list_unlabelled
    from roadwork_core.data.image_table import build_image_table
    from roadwork_core.data.pool import cap_explora_images, filter_unlabelled_pool
    from roadwork_core.data.splits import SplitConfig, assign_splits
    from roadwork_core.models.backbone import create_backbone
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.predict import predict_frame
    from roadwork_core.models.serialization import load_classifier, save_classifier
    from roadwork_core.training.explora import run_explora
    from roadwork_core.training.supervised import train_classifier
    from roadwork_core.workflows.evaluate import evaluate_bundle_on_test

    ops, res = resolved["ops"], resolved["resources"]
    gpu = res["gpu"]
    device, precision = _device_and_precision(gpu)
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 3)
        t = now

    drops = [inbox / version]
    mc = ops["image_table"]
    images = build_image_table(
        drops, min_size=mc["min_size"], max_reject_fraction=mc["max_reject_fraction"]
    ).images
    lap("image_table")
    ss = res["split_settings"]
    ratios = {k: ss[k] for k in ("train", "val_select", "val_calib", "val_test")}
    splits = assign_splits(images, SplitConfig(ratios=ratios, radius=ss["radius"]))
    by = {s: splits[splits["split"] == s].reset_index(drop=True) for s in ratios}
    lap("splits")

    ec = ops["explora_backbone"]
    _setup(gpu)
    pool = [u for drop in drops for u in list_unlabelled(drop)] if ec["use_unlabelled"] else []
    evaluation = splits[splits["split"] != "train"]  # the pool must not copy an evaluation image
    kept = filter_unlabelled_pool(pool, evaluation, radius=ss["radius"]).kept
    uris, _ = cap_explora_images(list(by["train"]["uri"]), kept, ec["max_images"])
    backbone_cfg = from_mapping(BackboneConfig, ec["backbone"], attn_backend=gpu["attn_backend"])
    backbone = create_backbone(backbone_cfg)
    xcfg = from_mapping(ExploraConfig, ec, seed=gpu["seed"])
    explora = run_explora(
        backbone, uris, xcfg, device=device, precision=precision, checkpoint_dir=out / "explora_checkpoints"
    )
    (out / "explora").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in explora.state_dict.items()},
        str(out / "explora" / "backbone.safetensors"),
    )
    lap("explora_backbone")

    cc = ops["classifier"]
    _setup(gpu)
    head = from_mapping(HeadConfig, cc)
    model = build_classifier(backbone_cfg, from_mapping(MultiViewConfig, cc), **dataclasses.asdict(head))
    model.backbone.load_state_dict(load_file(str(out / "explora" / "backbone.safetensors")))
    train_cfg = from_mapping(TrainConfig, cc, seed=gpu["seed"])
    result = train_classifier(
        model,
        by["train"],
        by["val_select"],
        train_cfg,
        device=device,
        precision=precision,
        checkpoint_dir=out / "checkpoints",
        compile_backend="inductor" if gpu.get("compile") else None,
        feature_cache_dir=out / "feature_cache",
    )
    save_classifier(out / "classifier", model, extra={"best_epoch": result.best_epoch})
    lap("classifier")
    epoch_seconds = [round(float(h.get("seconds", float("nan"))), 3) for h in result.history]

    preds = {}
    for name, split in [("select", "val_select"), ("calib", "val_calib"), ("test", "val_test")]:
        _setup(gpu)
        clf = load_classifier(out / "classifier", device=device, inference=True)
        pc = ops[f"{name}_predictions"]
        with exact_fp32():  # as the prediction assets: fp32 without TF32, the logits the bundle serves
            preds[name] = predict_frame(
                clf, by[split], device=device, batch_size=pc["batch_size"], num_workers=pc["num_workers"]
            )
        lap(f"{name}_predictions")

    def feats(frame) -> dict:
        return {k: frame[k].to_numpy(float) for k in UNCERTAINTY_FEATURES}

    cal_cfg = ops["calibrator"]
    calib, select = preds["calib"], preds["select"]
    labels = calib["label"].to_numpy(int)
    calibrator, _ = fit_calibrator(
        calib["logit"].to_numpy(float),
        labels,
        methods=tuple(cal_cfg["methods"]),
        holdout_fraction=cal_cfg["holdout_fraction"],
        seed=cal_cfg["seed"],
    )
    lap("calibrator")
    p_calib = calibrator.transform(calib["logit"].to_numpy(float))
    p_select = calibrator.transform(select["logit"].to_numpy(float))
    tp = ops["threshold_policy"]
    policies = {
        "threshold": fit_threshold_policy(
            p_calib, labels, target_fnr=tp["target_fnr"], target_fpr=tp["target_fpr"]
        )
    }
    gp = ops["gate_policy"]
    policies["gate"] = fit_gate_policy(
        p_select, feats(select), select["label"].to_numpy(int), p_calib, feats(calib), labels,
        target_fnr=gp["target_fnr"], target_fpr=gp["target_fpr"],
    )  # fmt: skip
    sp = ops["scrc_policy"]
    policies["scrc"] = fit_scrc_policy(
        p_calib, feats(calib)[sp["confidence_feature"]], labels, alpha=sp["alpha"], delta=sp["delta"],
        mode=sp["mode"], target_coverage=sp["target_coverage"], bound=sp["bound"],
        confidence_feature=sp["confidence_feature"],
    )  # fmt: skip
    lap("policies")

    policy = policies[policy_name(ops["bundle"]["release_policy"])]
    bundle_dir = export_bundle(
        out / "bundle",
        classifier_dir=out / "classifier",
        calibrator=calibrator,
        policy=policy,
        dataset_version=version,
        upstream_versions={"dataset_version": version},
        metrics_summary={},
        code_version="bench",
    )
    lap("bundle")
    rc = ops["evaluation_report"]
    _setup(gpu)
    test_rows = by["val_test"]
    evaluate_bundle_on_test(
        bundle_dir, test_rows, preds["test"], out / "report", levels=rc["robustness_levels"],
        max_images=rc["robustness_max_images"], subnet=rc["subnet"], subnet_max_images=rc["subnet_max_images"],
        n_bootstrap=rc["n_bootstrap"], seed=rc["seed"], device=device,
    )  # fmt: skip
    lap("evaluation_report")
    assert np.isfinite(p_calib).all(), "calibrated probabilities must be finite"
    return times, epoch_seconds


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolved", required=True)
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    resolved = json.loads(Path(args.resolved).read_text())
    t_imports = time.perf_counter()
    times, epoch_seconds = run(resolved, Path(args.inbox), args.version, Path(args.out))
    print(json.dumps({"steps": times, "classifier_epoch_seconds": epoch_seconds, "in_process_seconds": round(time.perf_counter() - t_imports, 3),
                      "since_main_seconds": round(time.perf_counter() - t0, 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
