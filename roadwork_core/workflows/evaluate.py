"""Evaluate a released bundle on val_test: clean predictions, robustness levels, report files.

The clean test figures reuse the test predictions (logits) through the bundle's calibrator and
policy; robustness re-predicts distorted test images through `Bundle.predict`, the serving path, and
the subnet section re-predicts them through the validator replica (`roadwork_core.metrics.subnet_eval`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
from roadwork_core.metrics.report import (
    EvaluationReport,
    build_evaluation_report,
    distorted_predictions,
    write_report,
)
from roadwork_core.metrics.subnet_eval import replica_predictions, subnet_section

METADATA_EXCLUDE = {
    "image_id",
    "uri",
    "file",
    "label",
    "phash",
    "phash_dihedral",
    "width",
    "height",
    "split",
    "group_id",
}
METADATA_EXCLUDE |= {"mask_x", "mask_y"}  # the object's mask point (a coordinate, not a slice)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def policy_guarantee(policy) -> dict | None:
    """The guarantee a policy states, in the form the report's check reads (None: no guarantee)."""
    if getattr(policy, "policy", None) != "scrc":
        return None
    return {
        "alpha": policy.alpha,
        "delta": policy.delta,
        "mode": policy.mode,
        "bound": policy.bound,
        "n": policy.n,
        "conditioning": policy.conditioning,
    }


def decide_from_predictions(bundle, preds: pd.DataFrame) -> pd.DataFrame:
    """p_roadwork, decision and confidence for a predictions table, through the bundle's calibrator + policy."""
    p = bundle.calibrator.transform(preds["logit"].to_numpy(float))
    feats = {k: preds[k].to_numpy(float) for k in UNCERTAINTY_FEATURES}
    out = preds.copy()
    out["p_roadwork"] = p
    out["decision"] = bundle.policy.decide(p, feats)
    out["confidence"] = np.maximum(p, 1.0 - p)
    return out


def evaluate_bundle_on_test(
    bundle_dir: Path,
    test_rows: pd.DataFrame,
    test_preds: pd.DataFrame,
    out_dir: Path,
    *,
    levels: Sequence[int] = (0, 1, 2, 3),
    max_images: int | None = None,
    subnet: bool = True,
    subnet_max_images: int | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    device="cpu",
) -> tuple[EvaluationReport, dict[str, str]]:
    from roadwork_core.bundle.bundle import Bundle
    from roadwork_core.data.distortions import distort

    bundle = Bundle.load(Path(bundle_dir), device=device)
    meta_cols = [c for c in test_rows.columns if c not in METADATA_EXCLUDE and c not in test_preds.columns]
    # group_id (near-duplicate group from the splits) makes the bootstrap resample groups
    group_cols = [c for c in ("group_id",) if c in test_rows.columns and c not in test_preds.columns]
    table = decide_from_predictions(bundle, test_preds).merge(
        test_rows[["image_id", *group_cols, *meta_cols]], on="image_id", how="left"
    )

    robustness = {}
    if levels:
        subset = test_rows.sort_values("image_id")
        if max_images:
            subset = subset.head(max_images)
        images = _Decoded(subset["uri"].tolist())  # decoded a chunk at a time, never the whole split

        def predict_fn(imgs: list) -> pd.DataFrame:
            return pd.DataFrame(
                [
                    {
                        "p_roadwork": pr.p_roadwork,
                        "decision": pr.decision,
                        "confidence": max(pr.p_roadwork, 1 - pr.p_roadwork),
                    }
                    for pr in bundle.predict(imgs)
                ]
            )

        # The distortions' tensor steps (noise, blur) are small ops: at 1 torch thread they ran 3-6x faster
        # than at 2 on a 2-core box (profiled). A thread pool would break the per-image seeding, which
        # goes through torch's global RNG. The model forward keeps its threads.
        def distort_fn(img, level: int, image_seed: int):
            with _torch_threads(1):
                return distort(img, level, image_seed)

        robustness = distorted_predictions(
            images, subset["label"].astype(int).tolist(), predict_fn, distort_fn, levels=levels, seed=seed
        )

    subnet_table = _subnet_table(bundle, test_rows, subnet_max_images, seed) if subnet else None

    report = build_evaluation_report(
        table,
        policy_guarantee=policy_guarantee(bundle.policy),
        robustness=robustness,
        n_bootstrap=n_bootstrap,
        seed=seed,
        slice_columns=meta_cols or None,
    )
    if subnet_table is not None:
        report.subnet = subnet_section(subnet_table, n_bootstrap=min(n_bootstrap, 200), seed=seed)
    report.config["bundle_manifest"] = json.loads((Path(bundle_dir) / "manifest.json").read_text()).get(
        "dataset_version"
    )
    paths = write_report(report, out_dir)
    return report, {name: str(Path(path).relative_to(out_dir)) for name, path in paths.items()}


class _Decoded(Sequence):
    """The images at `uris`, decoded when indexed. The robustness and subnet sections read them a chunk at a
    time; a list of every decoded val_test image held ~90 MB per 12 MP photo at once (4.7 GB for the report
    step on 96 phone photos)."""

    def __init__(self, uris: list[str]) -> None:
        self.uris = uris

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index):  # an int (the callers' use); a slice gives another lazy sequence
        from roadwork_core.data.images import load_image

        if isinstance(index, slice):
            return _Decoded(self.uris[index])
        return load_image(self.uris[index])


def _subnet_table(bundle, test_rows: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """val_test images through the validator replica at every level, predicted by the bundle."""

    def predict_fn(imgs: list) -> pd.DataFrame:
        rows = []
        for pr in bundle.predict(imgs):
            row = {"p_roadwork": pr.p_roadwork, "p_raw": pr.p_raw}
            if getattr(pr, "answer", None) is not None:  # the bundle's subnet answer, where it has one
                row["answer"] = pr.answer
            rows.append(row)
        return pd.DataFrame(rows)

    subset = test_rows.sort_values("image_id")
    if max_images:
        subset = subset.head(max_images)
    images = _Decoded(subset["uri"].tolist())
    # the challenge transforms are small per-image tensor ops: 1 torch thread, as for the distortions
    return replica_predictions(
        images, subset["label"].astype(int).tolist(), predict_fn, seed=seed, transform_threads=1
    )
