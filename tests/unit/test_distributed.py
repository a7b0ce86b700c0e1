"""Data-parallel training on CPU: batch sharding, and 2 gloo processes under torchrun training the
same weights as 1 process with the same global batch and seed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import RandomSampler, WeightedRandomSampler

from roadwork_assets._torchrun import torchrun_command
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.multiview import MultiViewConfig
from roadwork_core.training.checkpoint import load_checkpoint
from roadwork_core.training.ddp_jobs import read_result, write_classifier_job
from roadwork_core.training.distributed import RankBatchSampler, World, shard_bounds
from roadwork_core.training.feature_cache import FeatureCache
from roadwork_core.training.supervised import TrainConfig, train_classifier
from roadwork_resources.gpu import GPUResource
from tests.unit.test_training import _images

REPO = Path(__file__).resolve().parents[2]
# Two ranks average two half-batch gradients where one process takes one mean: the same sums in another
# order, so float32 rounding differs; AdamW divides by sqrt(v) and lets that grow in near-zero gradients.
# Measured max |w(2) - w(1)| after 15 steps at lr 1e-3: ~1e-7 (head), 1.5e-5 (full). A wrong shard, order
# or loss weight moves a weight by about one step, lr = 1e-3: ten times this tolerance.
WEIGHT_TOLERANCE = 1e-4


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 2), (9, 4, 2), (5, 4, 3), (17, 4, 2), (1, 4, 2)])
@pytest.mark.parametrize("balanced", [False, True])
def test_rank_batches_cover_each_draw_once_with_weights_that_restore_the_global_mean(
    n, batch, world, balanced
):
    def sampler():
        generator = torch.Generator().manual_seed(3)
        if balanced:
            weights = torch.tensor([1.0 if i % 3 else 2.0 for i in range(n)], dtype=torch.double)
            return WeightedRandomSampler(weights, n, replacement=True, generator=generator)
        return RandomSampler(range(n), generator=generator)

    single = list(sampler())  # what one process draws
    per_rank = [RankBatchSampler(sampler(), batch, r, world) for r in range(world)]
    batches = [list(s) for s in per_rank]
    for step in range(len(batches[0])):
        real = [b[step][: s.real_counts[step]] for b, s in zip(batches, per_rank, strict=True)]
        assert sum(real, []) == single[step * batch : (step + 1) * batch], (
            f"step {step} is not the global batch"
        )
        # DDP averages the ranks' gradients of w_r * mean_r; that is the global batch's mean gradient
        # when w_r = world * n_r / n_global (so the weights sum to world and an empty part weighs 0)
        n_global = len(single[step * batch : (step + 1) * batch])
        for s in per_rank:
            assert s.loss_weights[step] == pytest.approx(world * s.real_counts[step] / n_global)
        assert sum(s.loss_weights[step] for s in per_rank) == pytest.approx(world)
    assert sorted(i for b, s in zip(batches, per_rank) for k, x in enumerate(b) for i in x[: s.real_counts[k]]) == sorted(single)  # fmt: skip


def test_shard_bounds_and_evaluation_shards_partition_without_overlap():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [range(*shard_bounds(n, r, world)) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n)), (n, world, parts)
            scored = sorted(i for r in range(world) for i in World(r, world).eval_indices(n))
            assert scored == list(range(n)), f"evaluation of {n} images on {world} ranks scored {scored}"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    root = tmp_path_factory.mktemp("ddp_images")
    # 17 train images at batch 4: the last global batch holds 1 image, fewer than the 2 ranks
    return _images(root / "train", 17, seed=0), _images(root / "select", 7, seed=1)


def _model():
    torch.manual_seed(0)
    return build_classifier(
        BackboneConfig(name="vit_test_tiny"), MultiViewConfig(view_size=32, grid=2), dropout=0.0
    )


def _torchrun(job: Path, nproc: int = 2, deterministic: bool = False) -> subprocess.CompletedProcess:
    gpu = GPUResource(device="cpu", nproc_per_node=nproc, threads=1, deterministic=deterministic)
    (job / "tmp").mkdir(exist_ok=True)  # the processes' TMPDIR: whatever they leave there is visible
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(job / "tmp")}
    return subprocess.run(
        torchrun_command(gpu, job), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "head", "balanced_sampling": True},
        {"mode": "full", "balanced_sampling": False},
    ],
    ids=["head-balanced", "full"],
)
def test_two_gloo_processes_train_the_weights_of_one(rows, tmp_path: Path, settings: dict) -> None:
    train, select = rows
    # no per-sample randomness that a rank would draw from its own stream: no dropout, no augmentation
    cfg = TrainConfig(
        epochs=3, batch_size=4, lr=1e-3, ema_decay=0.9, patience=5, augment_max_level=0, **settings
    )

    one = train_classifier(
        _model(), train, select, cfg, checkpoint_dir=tmp_path / "ckpt1", feature_cache_dir=tmp_path / "cache1"
    )

    job = tmp_path / "job"
    job.mkdir()
    write_classifier_job(
        job, _model(), train, select, cfg, precision="fp32", checkpoint_dir=tmp_path / "ckpt2",
        feature_cache_dir=tmp_path / "cache2", out_dir=tmp_path / "out",
    )  # fmt: skip
    # the gpu resource's deterministic setting reaches the ranks (strict deterministic algorithms there)
    deterministic = settings["mode"] == "full"
    proc = _torchrun(job, deterministic=deterministic)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-4000:]}"
    flag = f"deterministic algorithms {'on' if deterministic else 'off'}"
    assert proc.stderr.count(flag) == 2, f"each rank must log '{flag}':\n{proc.stderr[-3000:]}"
    two = read_result(job)
    assert two["world_size"] == 2
    assert not list((job / "tmp").glob("torchelastic_*")), "torchrun's logs belong in the job directory"
    assert (job / "torchrun_logs").is_dir()

    # The last epoch's training weights (rank 0's checkpoint): the best-epoch choice is left out, since
    # a val_select probability at 0.5 +- 1e-7 may round either way and pick another epoch.
    last_one, last_two = load_checkpoint(tmp_path / "ckpt1"), load_checkpoint(tmp_path / "ckpt2")
    assert last_two is not None and last_two.state["epoch"] == cfg.epochs, "rank 0 wrote no final checkpoint"
    assert set(last_two.model_state) == set(last_one.model_state)
    diff = max(float((v - last_one.model_state[k]).abs().max()) for k, v in last_two.model_state.items())
    assert diff < WEIGHT_TOLERANCE, f"2 processes differ from 1 by {diff:.3g} (> {WEIGHT_TOLERANCE})"
    start = _model().state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in last_two.model_state.items() if k in start)
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    print(
        f"{settings['mode']}: max |w(2 procs) - w(1 proc)| = {diff:.2e}, weights moved by up to {moved:.2e}"
    )

    assert (tmp_path / "out" / "model.safetensors").is_file(), "rank 0 did not write the classifier"
    for a, b in zip(two["history"], one.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), (a, b)
    if settings["mode"] == "head":  # the feature cache: one entry per image, built once across ranks
        entries = {p.name for p in FeatureCache(tmp_path / "cache2").root.rglob("*.safetensors")}
        assert len(entries) == len(train) + len(select), (
            f"{len(entries)} cache entries for {len(train) + len(select)} images"
        )
        assert two["history"][1]["backbone_forwards"] == 0, "epoch 2 ran the backbone: cache not used"
