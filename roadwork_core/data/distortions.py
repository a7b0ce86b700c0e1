"""The network validator's image distortions, levels 0-3, as torchvision.transforms.v2 pipelines on PIL.

The StreetVision validator sends miners images that went through a random "augmentation level":
level 0 is the clean image, and each higher level stacks stronger geometric, colour and
compression/noise distortions. Training on the same levels (``training_augmentation``) and
reporting robustness per level (``distort``) both use this one table.

Every transform keeps the image's size (or resizes to ``size`` when given) and returns a PIL RGB
image, so it can sit in front of any canvas builder.

The geometric, colour and JPEG steps run on the PIL image (torchvision v2 dispatches them to PIL's C
kernels); only the noise and blur, which v2 implements for tensors alone, run on a float tensor. At the
image's own size this is 1.6-2.9x faster than running the whole pipeline on a uint8 tensor (hue and
rotation dominated there): 59 -> 24 ms (level 1) and 134 -> 86 ms (level 3) an 800x600 scene, 300 -> 105
ms and 935 -> 399 ms a 1920x1080 one, one thread (`python -m bench.bench_distortions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image
import torch
import torchvision.transforms.v2 as T

MAX_LEVEL = 3


@dataclass(frozen=True)
class DistortionLevel:
    """Strengths of one level. Zero / None switches a distortion off."""

    crop_scale: tuple[float, float] | None  # RandomResizedCrop area fraction; None = center/resize only
    rotation_deg: float  # RandomRotation(+-deg)
    hflip_p: float
    color: float  # ColorJitter brightness = contrast = saturation = color
    hue: float
    jpeg_quality: tuple[int, int] | None  # JPEG re-encode quality range
    noise_sigma: float  # GaussianNoise sigma on [0, 1] pixels
    noise_p: float
    blur_sigma: tuple[float, float] | None  # GaussianBlur sigma range
    blur_p: float


LEVELS: dict[int, DistortionLevel] = {
    0: DistortionLevel(None, 0.0, 0.0, 0.0, 0.0, None, 0.0, 0.0, None, 0.0),
    1: DistortionLevel((0.8, 1.0), 10.0, 0.5, 0.1, 0.0, (80, 95), 0.0, 0.0, None, 0.0),
    2: DistortionLevel((0.6, 1.0), 15.0, 0.5, 0.25, 0.02, (60, 90), 0.02, 0.3, (0.1, 1.0), 0.3),
    3: DistortionLevel((0.4, 1.0), 20.0, 0.5, 0.4, 0.05, (30, 75), 0.05, 0.5, (0.3, 2.0), 0.5),
}


def _check_level(level: int) -> None:
    if not isinstance(level, int) or isinstance(level, bool) or level not in LEVELS:
        raise ValueError(f"distortion level {level!r} is not valid; use an int in 0..{MAX_LEVEL}")


def _pipeline(spec: DistortionLevel, size: tuple[int, int]) -> T.Compose:
    """Build the v2 pipeline for one level at output `size` (h, w): PIL RGB in, uint8 (3, h, w) tensor out."""
    ops: list[Callable] = []
    if spec.crop_scale is None:
        ops += [T.Resize(min(size), antialias=True), T.CenterCrop(size)]
    else:
        ops.append(T.RandomResizedCrop(size, scale=spec.crop_scale, antialias=True))
    if spec.rotation_deg > 0:
        ops.append(T.RandomRotation(spec.rotation_deg))
    if spec.hflip_p > 0:
        ops.append(T.RandomHorizontalFlip(spec.hflip_p))
    if spec.color > 0:
        ops.append(T.ColorJitter(spec.color, spec.color, spec.color, spec.hue))
    if spec.jpeg_quality is not None:
        ops.append(T.JPEG(list(spec.jpeg_quality)))
    ops.append(T.PILToTensor())  # the PIL steps end here: v2 has noise for tensors only
    ops.append(T.ToDtype(torch.float32, scale=True))
    if spec.noise_p > 0:
        ops.append(T.RandomApply([T.GaussianNoise(sigma=spec.noise_sigma, clip=True)], p=spec.noise_p))
    if spec.blur_sigma is not None:
        ops.append(T.RandomApply([T.GaussianBlur(5, sigma=spec.blur_sigma)], p=spec.blur_p))
    ops.append(T.ToDtype(torch.uint8, scale=True))
    return T.Compose(ops)


class ValidatorTransform:
    """Callable PIL -> PIL applying one distortion level (a class, so DataLoader workers can pickle it)."""

    def __init__(self, level: int, size: int | tuple[int, int] | None = None) -> None:
        _check_level(level)
        self.level = level
        self.spec = LEVELS[level]
        self.size = (size, size) if isinstance(size, int) else size

    def __call__(self, img: PIL.Image.Image) -> PIL.Image.Image:
        out_hw = self.size or (img.height, img.width)
        if self.level == 0 and self.size is None:
            return img.convert("RGB").copy()  # level 0 at native size: the clean image
        y = _pipeline(self.spec, out_hw)(img.convert("RGB"))  # (3, h, w) uint8
        return T.functional.to_pil_image(y)

    def __repr__(self) -> str:
        return f"ValidatorTransform(level={self.level}, size={self.size})"


def validator_transform(level: int, size: int | tuple[int, int] | None = None) -> ValidatorTransform:
    """The validator's distortion at `level` (0-3). Output keeps the input size unless `size` is given."""
    return ValidatorTransform(level, size)


def distort(
    img: PIL.Image.Image, level: int, seed: int, size: int | tuple[int, int] | None = None
) -> PIL.Image.Image:
    """Apply level `level` deterministically: the same (img, level, seed) gives the same pixels.

    The global torch RNG is forked, so calling this does not change other code's random stream.
    """
    transform = validator_transform(level, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


class TrainingAugmentation:
    """Picks a level uniformly in 0..max_level per image, then applies that level's distortion.

    The level draw uses torch's RNG (like the transforms), so seeding torch per epoch/worker
    reproduces the augmentations.
    """

    def __init__(self, max_level: int = MAX_LEVEL, size: int | tuple[int, int] | None = None) -> None:
        _check_level(max_level)
        self.max_level = max_level
        self.transforms = [ValidatorTransform(level, size) for level in range(max_level + 1)]

    def __call__(self, img: PIL.Image.Image) -> PIL.Image.Image:
        level = int(torch.randint(0, self.max_level + 1, ()).item())
        return self.transforms[level](img)

    def __repr__(self) -> str:
        return f"TrainingAugmentation(max_level={self.max_level})"


def training_augmentation(
    max_level: int = MAX_LEVEL, size: int | tuple[int, int] | None = None
) -> TrainingAugmentation:
    """Random validator level per image in 0..max_level (max_level 0 = no augmentation)."""
    return TrainingAugmentation(max_level, size)


__all__ = [
    "LEVELS",
    "MAX_LEVEL",
    "DistortionLevel",
    "TrainingAugmentation",
    "ValidatorTransform",
    "distort",
    "training_augmentation",
    "validator_transform",
]
