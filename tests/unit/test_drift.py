"""Drift statistics (MMD permutation test, PSI, KS) and the bundle-based drift check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from roadwork_core.metrics.drift import drift_report, mmd_permutation_test, psi
from roadwork_core.workflows.drift_check import compare_with_training, sample_rows

# ---------------------------------------------------------------------------------------------------
# A tiny bundle (random-init vit_test_tiny) and image folders; shared with the e2e sensor tests.


def build_tiny_bundle(root: Path) -> Path:
    """Export a bundle around a seeded random-init vit_test_tiny classifier; return its directory."""
    from roadwork_core.bundle import export_bundle
    from roadwork_core.calibration import fit_calibrator, fit_threshold_policy
    from roadwork_core.models.backbone import BackboneConfig
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.serialization import save_classifier

    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(name="vit_test_tiny")).eval()
    save_classifier(root / "classifier", model, extra={"epochs": 0})
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 300)
    labels = (rng.uniform(size=300) < 1 / (1 + np.exp(-logits))).astype(int)
    calibrator, _ = fit_calibrator(logits, labels, methods=("temperature",))
    policy = fit_threshold_policy(1 / (1 + np.exp(-logits)), labels, target_fnr=0.1)
    return export_bundle(
        root / "release",
        classifier_dir=root / "classifier",
        calibrator=calibrator,
        policy=policy,
        dataset_version="v0001",
        upstream_versions={},
        metrics_summary={},
        code_version=None,
    )


def splits_for(folder: Path) -> pd.DataFrame:
    """A splits-shaped table with every image of `folder` in train."""
    uris = sorted(str(p) for p in folder.rglob("*.jpg"))
    return pd.DataFrame(
        {
            "image_id": [hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in uris],
            "split": "train",
            "uri": uris,
        }
    )


def shifted_copies(uris: list[str], out: Path) -> list[str]:
    """Darkened, inverted copies: what a broken camera or a night-only feed would send."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, uri in enumerate(uris):
        img = PIL.ImageOps.invert(PIL.Image.open(uri).convert("RGB")).point(lambda v: v // 4)
        path = out / f"shifted_{i:04d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def drift_world(tmp_path_factory) -> dict:
    from roadwork_core.data.synthetic import make_demo_drop

    root = tmp_path_factory.mktemp("drift")
    train = make_demo_drop(root / "inbox", "v0001", n=48, seed=11, scale=0.5)
    same = make_demo_drop(root / "monitor_same", "m", n=48, seed=12, scale=0.5)
    same_uris = sorted(str(p) for p in (same / "images").glob("*.jpg"))
    return {
        "bundle": build_tiny_bundle(root),
        "splits": splits_for(train / "images"),
        "same": same_uris,
        "shifted": shifted_copies(same_uris, root / "monitor_shifted"),
        "root": root,
    }


# ---------------------------------------------------------------------------------------------------
# Statistics


def test_mmd_rejects_shifted_gaussians():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (40, 8))
    y = rng.normal(0.8, 1, (40, 8))
    mmd2, p = mmd_permutation_test(x, y, n_permutations=200, seed=0)
    assert mmd2 > 0, f"MMD^2 of shifted Gaussians should be positive, got {mmd2}"
    assert p < 0.01, f"a mean shift of 0.8 sd in 8 dims should be detected; p={p}"


def test_mmd_null_rejection_rate_is_at_most_alpha():
    """Under H0 the permutation p-value is super-uniform: rejections at alpha=0.1 about 10%."""
    rng = np.random.default_rng(1)
    reps, alpha = 200, 0.1
    pvalues = np.array(
        [
            mmd_permutation_test(
                rng.normal(size=(20, 4)), rng.normal(size=(20, 4)), n_permutations=49, seed=r
            )[1]
            for r in range(reps)
        ]
    )
    rate = float((pvalues < alpha).mean())
    # Binomial(200, 0.1): sd 0.021; 0.16 is ~3 sd above the nominal rate
    assert rate <= 0.16, f"MMD test rejects {rate:.1%} of same-distribution pairs at alpha={alpha}"
    assert rate >= 0.03, f"MMD test rejects only {rate:.1%} at alpha={alpha}: p-values are not calibrated"
    assert pvalues.min() >= 1 / 50, "a permutation p-value is never below 1/(B+1)"


def test_mmd_validates_shapes():
    with pytest.raises(ValueError, match="same d"):
        mmd_permutation_test(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_permutation_test(np.zeros((1, 3)), np.zeros((5, 3)))


def test_psi_zero_for_identical_and_large_for_shift():
    rng = np.random.default_rng(2)
    scores = rng.beta(2, 5, 2000)
    assert psi(scores, scores) == pytest.approx(0.0, abs=1e-9), "PSI of a sample with itself must be 0"
    same = psi(scores, rng.beta(2, 5, 2000))
    assert same < 0.05, f"PSI of two large same-distribution samples should be ~0, got {same}"
    shifted = psi(scores, rng.beta(5, 2, 2000))
    assert shifted > 1.0, f"PSI of Beta(2,5) vs Beta(5,2) should be far above 0.25, got {shifted}"


def test_ks_in_drift_report():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 4))
    ref = rng.uniform(0, 1, 300)
    same = drift_report(emb, rng.normal(size=(60, 4)), ref, rng.uniform(0, 1, 300), n_permutations=99)
    assert not same.drifted, f"same-distribution samples flagged as drift: {same}"
    assert same.ks_pvalue > 0.01 and same.ks_statistic < 0.15, f"KS on uniform vs uniform: {same}"
    moved = drift_report(emb, rng.normal(size=(60, 4)), ref, rng.uniform(0.3, 1, 300), n_permutations=99)
    assert moved.drifted and moved.ks_pvalue < 1e-6, f"scores moved up by 0.3 must drift by KS: {moved}"
    tags = moved.as_tags()
    assert tags["roadwork/drift_drifted"] == "True" and "roadwork/drift_mmd_pvalue" in tags, tags


def test_sample_rows_is_deterministic_and_bounded():
    a, b = sample_rows(100, 10, seed=4), sample_rows(100, 10, seed=4)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10, "same seed must give the same 10 rows"
    assert np.array_equal(sample_rows(5, 10, seed=0), np.arange(5)), "fewer rows than sample: take all"
    with pytest.raises(ValueError, match="at least 2"):
        sample_rows(10, 1, seed=0)


# ---------------------------------------------------------------------------------------------------
# compare_with_training on a tiny bundle


def test_same_distribution_images_do_not_drift(drift_world, tmp_path):
    w = drift_world
    result = compare_with_training(
        w["bundle"], w["splits"], w["same"], sample=48, alpha=0.01, psi_threshold=1.0,
        n_permutations=200, cache_dir=tmp_path,
    )  # fmt: skip
    assert (result.n_reference, result.n_current) == (48, 48), result
    assert not result.drifted, f"fresh scenes from the same generator flagged as drift: {result}"
    assert result.mmd_pvalue > 0.01, result


def test_darkened_inverted_images_drift(drift_world, tmp_path):
    w = drift_world
    result = compare_with_training(
        w["bundle"], w["splits"], w["shifted"], sample=48, alpha=0.01, psi_threshold=1.0,
        n_permutations=200, cache_dir=tmp_path,
    )  # fmt: skip
    assert result.drifted, f"darkened, inverted images not flagged as drift: {result}"
    assert result.mmd_pvalue < 0.01, f"MMD should see the shift in embeddings: {result}"


def test_reference_is_cached_by_bundle_hash(drift_world, tmp_path):
    w = drift_world
    args = dict(sample=16, alpha=0.01, psi_threshold=1.0, n_permutations=50, cache_dir=tmp_path)
    first = compare_with_training(w["bundle"], w["splits"], w["same"], **args)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1, f"expected one reference cache file, found {cached}"
    stamp = cached[0].stat().st_mtime_ns
    # shuffled rows: the same sample (sorted by image_id), so the cache is hit and the figures repeat
    second = compare_with_training(w["bundle"], w["splits"].sample(frac=1, random_state=0), w["same"], **args)
    assert cached[0].stat().st_mtime_ns == stamp, "the reference was recomputed instead of read from cache"
    assert first == second, f"cached reference changed the result: {first} vs {second}"


def test_unreadable_monitored_image_is_named(drift_world, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    w = drift_world
    with pytest.raises(ValueError, match="broken.jpg"):
        compare_with_training(
            w["bundle"], w["splits"], [*w["same"][:4], str(bad)], sample=8, alpha=0.01,
            psi_threshold=1.0, n_permutations=20, cache_dir=tmp_path / "cache",
        )  # fmt: skip


def test_splits_without_train_rows_is_an_error(drift_world, tmp_path):
    w = drift_world
    splits = w["splits"].assign(split="val_test")
    with pytest.raises(ValueError, match="0 train rows"):
        compare_with_training(
            w["bundle"], splits, w["same"], sample=8, alpha=0.01, psi_threshold=1.0,
            n_permutations=20, cache_dir=tmp_path,
        )  # fmt: skip


def test_embed_images_runs_the_backbone_once_per_batch(drift_world):
    from roadwork_core.bundle import Bundle
    from roadwork_core.workflows.drift_check import embed_images

    bundle = Bundle.load(drift_world["bundle"])
    calls: list[int] = []
    handle = bundle.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        emb, scores = embed_images(bundle, drift_world["same"][:6], batch_size=4)  # batches of 4 and 2
    finally:
        handle.remove()
    assert len(calls) == 2, f"expected one backbone forward per batch (2), got {len(calls)}"
    assert emb.shape[0] == 6 and emb.dtype == np.float32
    want = np.array([p.p_roadwork for p in bundle.predict(drift_world["same"][:6], batch_size=4)])
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-12)  # the bundle's calibrated P(roadwork)
