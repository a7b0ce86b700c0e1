"""Validator distortion levels: determinism, level 0 identity, growing strength, bad levels."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

from roadwork_core.data.distortions import (
    LEVELS,
    distort,
    training_augmentation,
    validator_transform,
)


def _scene(w: int = 96, h: int = 64) -> PIL.Image.Image:
    img = PIL.Image.new("RGB", (w, h), (90, 120, 160))
    draw = PIL.ImageDraw.Draw(img)
    draw.rectangle([0, h // 2, w, h], fill=(60, 60, 60))
    draw.polygon([(20, 50), (35, 20), (50, 50)], fill=(255, 140, 0))
    return img


def _mean_abs_diff(a: PIL.Image.Image, b: PIL.Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_distort_is_deterministic_given_seed(level: int) -> None:
    img = _scene()
    a, b = distort(img, level, seed=7), distort(img, level, seed=7)
    assert a.size == img.size, f"level {level} changed the size {img.size} -> {a.size}"
    assert a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)), f"level {level} is not deterministic for one seed"


def test_distort_does_not_touch_global_rng() -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    distort(_scene(), 3, seed=11)
    assert torch.equal(torch.rand(4), expected), "distort() consumed the caller's torch RNG stream"


def test_level_zero_is_identity_and_resize_only() -> None:
    img = _scene()
    assert _mean_abs_diff(distort(img, 0, seed=1), img) == 0.0, (
        "level 0 at native size must be the clean image"
    )
    resized = validator_transform(0, size=32)(img)
    assert resized.size == (32, 32), f"level 0 with size=32 should center/resize to 32x32, got {resized.size}"
    assert _mean_abs_diff(validator_transform(0, size=32)(img), resized) == 0.0, "level 0 must not be random"


def test_higher_levels_distort_more() -> None:
    img = _scene()
    seeds = range(12)
    strength = {
        level: np.mean([_mean_abs_diff(distort(img, level, seed=s), img) for s in seeds]) for level in (1, 3)
    }
    assert strength[1] > 0.5, f"level 1 barely changes the image: {strength}"
    assert strength[3] > strength[1], f"level 3 should distort more than level 1 on average: {strength}"
    different = _mean_abs_diff(distort(img, 3, seed=0), distort(img, 3, seed=1))
    assert different > 0, "two seeds gave the same level-3 image"


@pytest.mark.parametrize("bad", [-1, 4, 1.5, "2", True])
def test_invalid_level_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="distortion level"):
        validator_transform(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distortion level"):
        distort(_scene(), bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distortion level"):
        training_augmentation(bad)  # type: ignore[arg-type]


def test_training_augmentation_reproducible_under_torch_seed() -> None:
    img = _scene()
    aug = training_augmentation(3)
    torch.manual_seed(5)
    first = [np.asarray(aug(img)) for _ in range(4)]
    torch.manual_seed(5)
    second = [np.asarray(aug(img)) for _ in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second)), (
        "same torch seed, different augmentations"
    )
    assert all(a.shape == (64, 96, 3) for a in first)
    clean = training_augmentation(0)
    assert _mean_abs_diff(clean(img), img) == 0.0, "max_level=0 must leave images clean"
