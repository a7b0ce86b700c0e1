"""The validator's challenge pipeline replica: sizes, determinism, the parameter tables, the mask point."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from roadwork_core.subnet.challenge import (
    DISTORTION_PARAMS,
    apply_distortion,
    apply_level,
    apply_level_jpeg,
    sample,
    sample_level,
)


def _scene(w: int = 320, h: int = 240) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).resize((w, h))


def _distort(img: np.ndarray, name: str, level: int, seed: int = 0) -> np.ndarray:
    import torch

    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    y = apply_distortion(x, name, level, np.random.default_rng(seed))
    # back to the uint8 the next step would see (x * 255 truncated; +0.5 guards float error here)
    return (y.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (100, 60)])
def test_every_level_gives_a_224_rgb_jpeg_round_trip(size) -> None:
    img = _scene(*size)
    for level in range(4):
        out = apply_level(img, level, np.random.default_rng(level))
        assert out.size == (224, 224) and out.mode == "RGB", (size, level)
    data = apply_level_jpeg(img, 2, np.random.default_rng(0))
    with Image.open(io.BytesIO(data)) as sent:
        assert sent.format == "JPEG" and sent.size == (224, 224)


def test_same_generator_state_same_pixels_and_level_0_is_not_random() -> None:
    img = _scene()
    for level in (1, 2, 3):
        a = np.asarray(apply_level(img, level, np.random.default_rng(5)))
        b = np.asarray(apply_level(img, level, np.random.default_rng(5)))
        c = np.asarray(apply_level(img, level, np.random.default_rng(6)))
        assert np.array_equal(a, b), level
        assert not np.array_equal(a, c), level
    a0 = np.asarray(apply_level(img, 0, np.random.default_rng(1)))
    b0 = np.asarray(apply_level(img, 0, np.random.default_rng(2)))
    assert np.array_equal(a0, b0)


def test_level_0_is_the_centre_square() -> None:
    # left third red, middle third green, right third blue: the centre square of a 3:1 image is green
    img = Image.new("RGB", (672, 224))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 223, 223), fill=(255, 0, 0))
    d.rectangle((224, 0, 447, 223), fill=(0, 255, 0))
    d.rectangle((448, 0, 671, 223), fill=(0, 0, 255))
    out = np.asarray(apply_level(img, 0, np.random.default_rng(0))).astype(int)
    assert out[..., 1].min() > 230 and out[..., 0].max() < 25 and out[..., 2].max() < 25


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="use an int in 0..3"):
        apply_level(_scene(), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="use an int in 0..3"):
        apply_level(_scene(), True, np.random.default_rng(0))


def test_levels_are_drawn_a_quarter_each() -> None:
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_level(rng) for _ in range(4000)], minlength=4)
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.03), counts
    out, level = sample(_scene(), np.random.default_rng(3))
    assert out.size == (224, 224) and level in (0, 1, 2, 3)


def test_contrast_and_saturation_follow_the_parameter_table() -> None:
    flat = np.full((16, 16, 3), 200, np.uint8)
    for level in range(1, 6):  # CC multiplies intensities by the table value, truncating
        expected = int(200 * DISTORTION_PARAMS["CC"][level - 1])
        assert np.all(np.abs(_distort(flat, "CC", level).astype(int) - expected) <= 1), level
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[...] = (220, 60, 30)
    grey = _distort(colour, "CS", 5).astype(int)  # CS level 5 = 0.0: no chroma left
    assert np.ptp(grey, axis=-1).max() <= 2
    luma = 0.299 * 220 + 0.587 * 60 + 0.114 * 30
    assert abs(grey.mean() - luma) <= 2
    half = _distort(colour, "CS", 1).astype(int)  # 0.4: chroma scaled by 0.4 around the luma
    assert np.allclose(half[0, 0], luma + 0.4 * (np.array([220, 60, 30]) - luma), atol=2)
    assert np.array_equal(_distort(colour, "CS", 0), colour)  # level 0 = off


def test_blur_jpeg_and_noise_strengths() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    stds = [_distort(checker, "GB", lv).std() for lv in range(0, 6)]  # kernel 7 .. 21 blurs more and more
    assert stds[0] > 120 and stds[1] < 60 and all(a >= b - 1e-6 for a, b in zip(stds[1:], stds[2:])), stds
    blocks = (np.indices((96, 96)) // 8).sum(0) % 2 * 255
    blocks = blocks.astype(np.uint8)[..., None].repeat(3, -1)
    for level in range(1, 6):  # downsampling by 2 .. 6 and back loses the 8-px edges' sharpness
        out = _distort(blocks, "JPEG", level)
        assert out.shape == blocks.shape and np.abs(out.astype(int) - blocks).mean() > 5, level
    flat = np.full((128, 128, 3), 128, np.uint8)
    assert np.array_equal(_distort(flat, "GB", 3), flat) and np.array_equal(_distort(flat, "JPEG", 3), flat)
    # GNC: noise of variance v on the validator's [0, 1]-scaled YCbCr, i.e. luma sigma sqrt(v) * 255^2 / 219
    for level in (1, 2, 3):
        out = _distort(flat, "GNC", level).astype(float)
        luma = 0.299 * out[..., 0] + 0.587 * out[..., 1] + 0.114 * out[..., 2]
        sigma = np.sqrt(DISTORTION_PARAMS["GNC"][level - 1]) * 255 * 255 / 219
        assert abs(luma.std() / sigma - 1) < 0.15, (level, luma.std(), sigma)


def test_mask_point_keeps_the_object_in_the_crop() -> None:
    # a red disc off-centre in a grey square image; with its centre as mask point it survives every crop
    img = Image.new("RGB", (1000, 1000), (128, 128, 128))
    cx, cy = 660, 500  # 160 px from the centre: the validator nudges the crop before rotating it away
    ImageDraw.Draw(img).ellipse((cx - 70, cy - 70, cx + 70, cy + 70), fill=(255, 0, 0))

    def red_seen(out: Image.Image) -> bool:
        a = np.asarray(out).astype(int)
        return bool(((a[..., 0] > 180) & (a[..., 1] < 90)).sum() > 20)

    with_point = [red_seen(apply_level(img, 1, np.random.default_rng(s), (cx, cy))) for s in range(24)]
    without = [red_seen(apply_level(img, 1, np.random.default_rng(s))) for s in range(24)]
    assert all(with_point), with_point
    assert not all(without), "the test image is too easy: unguided crops always show the disc"


def test_flips_option_flips_some_draws() -> None:
    img = _scene()
    differs = [
        not np.array_equal(
            np.asarray(apply_level(img, 1, np.random.default_rng(s))),
            np.asarray(apply_level(img, 1, np.random.default_rng(s), flips=True)),
        )
        for s in range(6)
    ]
    assert any(differs)


def test_crop_box_nudged_onto_the_point_on_square_images() -> None:
    import torch

    from roadwork_core.subnet.challenge import _crop_box

    x = torch.zeros(3, 500, 500)
    for seed in range(200):
        torch.manual_seed(seed)
        px, py = (seed * 37) % 500, (seed * 91) % 500
        i, j, h, w = _crop_box(x, (px, py))
        assert h == w and 0 <= j and j + w <= 500 and 0 <= i and i + h <= 500, (seed, i, j, h, w)
        assert j <= px <= j + w and i <= py <= i + h, (seed, (px, py), (i, j, h, w))


def test_rotation_on_the_crop_box_alone_gives_the_whole_image_rotation_pixels() -> None:
    # The level-1 geometry rotates only the crop box (the validator rotates the whole image, then crops);
    # the pixels must be the same, also for boxes past the bottom / right edge (portrait images with a
    # nudged crop) and for the full pipeline with the draws it makes.
    import torch
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    from roadwork_core.subnet import challenge

    rng = np.random.default_rng(0)
    for _ in range(40):
        H, W = (int(v) for v in rng.integers(20, 300, 2))
        x = torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8))
        angle = float(rng.uniform(-20, 20))
        h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
        top, left = int(rng.integers(0, H - h + 15)), int(rng.integers(0, W - w + 15))
        whole = F.crop(F.rotate(x.float() / 255.0, angle), top, left, h, w)
        assert torch.equal(challenge._rotated_crop(x, angle, top, left, h, w), whole), (
            H,
            W,
            angle,
            top,
            left,
        )

    def literal(image, mask_point, seed):  # what the validator does, step by step
        x = F.to_tensor(image.convert("RGB"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            angle = T.RandomRotation.get_params([-challenge.ROTATION_DEG, challenge.ROTATION_DEG])
            x = F.rotate(x, angle)
            i, j, h, w = challenge._crop_box(x, mask_point)
            return F.resized_crop(x, i, j, h, w, [challenge.SIZE, challenge.SIZE], antialias=True)

    for size, point in (((320, 240), None), ((240, 320), (200.0, 300.0)), ((100, 60), (5.0, 50.0))):
        img = _scene(*size)
        seed = int(np.random.default_rng(3).integers(2**62))
        fast = challenge._geometric(img, point, False, np.random.default_rng(3))
        assert torch.equal(fast, literal(img, point, seed)), size
