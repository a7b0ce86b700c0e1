"""The validator's challenge pipeline: image -> augmentation level 0-3 -> 224x224 JPEG, as a miner sees it.

Facts from the StreetVision validator (natixnetwork/streetvision-subnet, MIT licence;
`natix/utils/image_transforms.py`, `natix/protocol.py`, read 2026-12); the code is ours:

- A level is drawn with probability 0.25 each.
- Level 0: RGB, centre square crop (side = the shorter side), resize to 224x224 (PIL bilinear).
- Level 1: RGB -> float tensor, rotation by U(-20, 20) degrees, RandomResizedCrop(224, scale=(0.2, 1),
  ratio=(1, 1)) nudged towards the object's mask centre point when one is known, then the flips.
- Level 2: level 1, then colour saturation (CS), colour contrast (CC) and JPEG-style downsampling,
  each at its own random DeeperForensics level in 0..1. Level 3: CS, CC, JPEG, Gaussian colour
  noise (GNC), Gaussian blur (GB), each at a random level in 0..2. Level 0 of a distortion = off.
- The result goes to PIL (`ToPILImage`: x * 255 truncated to uint8) and is sent as a JPEG at PIL's
  default quality (75); the miner decodes that JPEG.

Where the validator's code does something other than what its constructor arguments say, this file
does what the code does (the miner is scored on that), and says so:

- The rotation is nearest-neighbour: the validator's rotation wrapper calls `rotate(img, angle)`
  without the bilinear interpolation it was constructed with.
- The flips never happen: the validator's flip wrappers preset their parameters to `{}` and then
  read `do_flip` from them (False). `flips=True` applies the intended p = 0.5 horizontal and
  vertical flips instead (use it if the validator fixes this).
- The mask-point nudge takes `width, height = tensor.shape[1:]`, i.e. (H, W) swapped: on a
  non-square image the nudged crop can still miss the point. Replicated as is.

Each DeeperForensics distortion works on uint8 pixels (`(x * 255).astype(uint8)`, truncating) and
hands back x / 255, like the validator. Colour spaces: OpenCV's float YCrCb (BT.601, delta 0.5 even
on a 0-255 scale) followed by the validator's studio-range scaling; our numpy code replicates that
arithmetic without OpenCV. Resizes for the JPEG distortion are bilinear with half-pixel centres and
no antialiasing (OpenCV INTER_LINEAR); the blur is a `k x k` Gaussian with sigma = k / 6 (torchvision,
reflect-101 borders like OpenCV).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

SIZE = 224  # the validator's TARGET_IMAGE_SIZE
LEVELS = (0, 1, 2, 3)
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
ROTATION_DEG = 20.0
CROP_SCALE = (0.2, 1.0)
POINT_MARGIN = 10  # pixels kept between the mask point and the crop's edge when nudged

# DeeperForensics parameter per distortion level 1..5 (level 0 = off).
DISTORTION_PARAMS: dict[str, tuple[float, ...]] = {
    "CS": (0.4, 0.3, 0.2, 0.1, 0.0),  # chroma scale
    "CC": (0.85, 0.725, 0.6, 0.475, 0.35),  # intensity scale
    "JPEG": (2, 3, 4, 5, 6),  # downsampling factor
    "GNC": (0.001, 0.002, 0.005, 0.01, 0.05),  # noise variance
    "GB": (7, 9, 13, 17, 21),  # kernel size
}
# Augmentation level -> (distortions in order, highest random distortion level).
LEVEL_DISTORTIONS: dict[int, tuple[tuple[str, ...], int]] = {
    2: (("CS", "CC", "JPEG"), 1),
    3: (("CS", "CC", "JPEG", "GNC", "GB"), 2),
}

MaskPoint = tuple[float, float]  # (x, y) pixels in the input image


# ---------------------------------------------------------------------------------------------
# DeeperForensics distortions on uint8 (H, W, 3) RGB arrays


def _to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB on 0-255 -> the validator's scaled (Y, Cb, Cr)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr = (r - y) * 0.713 + 0.5  # OpenCV's float delta is 0.5 whatever the value range
    cb = (b - y) * 0.564 + 0.5
    out = np.stack([y, cb, cr], axis=-1).astype(np.float32)
    out[..., 0] = (out[..., 0] * (235 - 16) + 16) / 255.0
    out[..., 1:] = (out[..., 1:] * (240 - 16) + 16) / 255.0
    return out


def _from_ycbcr(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of `_to_ycbcr`: float32 RGB on 0-255 (not clipped)."""
    y = (ycbcr[..., 0] * 255.0 - 16) / (235 - 16)
    cb = (ycbcr[..., 1] * 255.0 - 16) / (240 - 16) - 0.5
    cr = (ycbcr[..., 2] * 255.0 - 16) / (240 - 16) - 0.5
    rgb = np.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], axis=-1)
    return rgb.astype(np.float32)


def _uint8(x: np.ndarray) -> np.ndarray:
    # The validator truncates (astype); values stay within a rounding error of 0..255 except noise,
    # which it clips first.
    return np.clip(x, 0, 255).astype(np.uint8)


def color_saturation(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    ycbcr = _to_ycbcr(img.astype(np.float32))
    ycbcr[..., 1:] = 0.5 + (ycbcr[..., 1:] - 0.5) * param
    return _uint8(_from_ycbcr(ycbcr))


def color_contrast(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    return _uint8(img.astype(np.float32) * param)


def jpeg_downsample(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    factor = int(param)
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    small = torch.nn.functional.interpolate(
        x, size=(h // factor, w // factor), mode="bilinear", align_corners=False, antialias=False
    )
    back = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return _uint8(back[0].permute(1, 2, 0).round().numpy())


def gaussian_noise_color(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    ycbcr = _to_ycbcr(img.astype(np.float32)) / 255
    noisy = (ycbcr + np.sqrt(param) * rng.standard_normal(ycbcr.shape)) * 255
    return _uint8(_from_ycbcr(noisy.astype(np.float32)))


def gaussian_blur(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    k = int(param)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, H, W) uint8
    return F.gaussian_blur(x, [k, k], [k / 6.0, k / 6.0]).permute(1, 2, 0).numpy()


DISTORTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "CS": color_saturation,
    "CC": color_contrast,
    "JPEG": jpeg_downsample,
    "GNC": gaussian_noise_color,
    "GB": gaussian_blur,
}


def apply_distortion(x: torch.Tensor, name: str, level: int, rng: np.random.Generator) -> torch.Tensor:
    """One DeeperForensics distortion at `level` (0 = off, 1..5) on a float (3, H, W) tensor in [0, 1]."""
    if level == 0:
        return x
    param = DISTORTION_PARAMS[name][level - 1]
    img = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # truncating, like the validator
    out = DISTORTIONS[name](img, param, rng)
    return torch.from_numpy(out.astype(np.float32) / 255.0).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Geometry


def _base(image: PIL.Image.Image) -> torch.Tensor:
    """Level 0: centre square crop, resize to 224, as a float (3, 224, 224) tensor."""
    img = image.convert("RGB")
    img = F.center_crop(img, [min(img.size)] * 2)
    img = F.resize(img, [SIZE, SIZE])  # PIL bilinear
    return F.to_tensor(img)


def _crop_box(x: torch.Tensor, mask_point: MaskPoint | None) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w), nudged towards `mask_point` the way the validator does."""
    i, j, h, w = T.RandomResizedCrop.get_params(x, list(CROP_SCALE), [1.0, 1.0])
    if mask_point is not None:
        px, py = mask_point
        width, height = x.shape[1:]  # (H, W), swapped as in the validator (see module docstring)
        if px < j:
            j = max(0, px - POINT_MARGIN)
        elif px > j + w:
            j = min(width - w, px - w + POINT_MARGIN)
        if py < i:
            i = max(0, py - POINT_MARGIN)
        elif py > i + h:
            i = min(height - h, py - h + POINT_MARGIN)
    return int(i), int(j), int(h), int(w)


def _rotated_crop(x: torch.Tensor, angle: float, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """`F.crop(F.rotate(x / 255, angle), top, left, h, w)` computed on the crop box alone.

    x: uint8 (3, H, W); returns float (3, h, w) in [0, 1]. The rotation is nearest-neighbour about the
    image centre with zero fill, so every output pixel is one source pixel: sampling only the box's
    pixels gives the same pixels as rotating the whole image and cropping, at a fraction of the cost
    (the crop covers 20-100 % of the image). The grid is torchvision's tensor-rotate grid (inverse
    rotation matrix, half-pixel centres, float32 `bmm`), restricted to the box;
    tests/unit/test_subnet_challenge.py checks the pixels against F.rotate + F.crop. Box parts past the
    bottom / right edge are zero, as F.crop pads them.
    """
    _, H, W = x.shape
    ih, iw = min(h, H - top), min(w, W - left)  # the part of the box inside the image
    if ih <= 0 or iw <= 0:
        return torch.zeros(3, h, w)
    rot = math.radians(-angle)  # torchvision's rotate inverts the angle for its affine matrix
    theta = torch.tensor(
        [math.cos(rot), math.sin(rot), 0.0, -math.sin(rot), math.cos(rot), 0.0], dtype=torch.float32
    ).reshape(1, 2, 3)
    base = torch.empty(1, ih, iw, 3)  # output pixel centres relative to the image centre, homogeneous
    base[..., 0].copy_(torch.arange(left, left + iw, dtype=torch.float32) + (0.5 - W * 0.5))
    base[..., 1].copy_((torch.arange(top, top + ih, dtype=torch.float32) + (0.5 - H * 0.5))[:, None])
    base[..., 2].fill_(1.0)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * W, 0.5 * H], dtype=torch.float32)
    grid = base.view(1, ih * iw, 3).bmm(scaled).view(1, ih, iw, 2)  # normalized source coordinates
    src = x.float().div_(255.0)[None]  # (1, 3, H, W), as F.to_tensor would give
    out = torch.nn.functional.grid_sample(
        src, grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return torch.nn.functional.pad(out[0], [0, w - iw, 0, h - ih])  # (3, h, w)


def _geometric(
    image: PIL.Image.Image, mask_point: MaskPoint | None, flips: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Level 1: rotate, random square crop to 224, (flips); float (3, 224, 224)."""
    x = F.pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8; only its shape drives the draws
    with torch.random.fork_rng(devices=[]):  # torchvision's samplers draw from torch; keep ours isolated
        torch.manual_seed(int(rng.integers(2**62)))
        angle = T.RandomRotation.get_params([-ROTATION_DEG, ROTATION_DEG])
        i, j, h, w = _crop_box(x, mask_point)
        # = F.resized_crop(F.rotate(F.to_tensor(image), angle), i, j, h, w, [SIZE, SIZE], antialias=True),
        # with the rotation (nearest, as the validator's wrapper really calls it) done on the crop only
        x = F.resize(_rotated_crop(x, angle, i, j, h, w), [SIZE, SIZE], antialias=True)
        if flips:
            if torch.rand(1) < 0.5:
                x = F.hflip(x)
            if torch.rand(1) < 0.5:
                x = F.vflip(x)
    return x


# ---------------------------------------------------------------------------------------------
# Public API


def _check_level(level: int) -> None:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or level not in LEVELS:
        raise ValueError(f"challenge level {level!r} is not valid; use an int in 0..3")


def to_jpeg(x: torch.Tensor) -> bytes:
    """The bytes the validator sends: ToPILImage (truncating) then JPEG at PIL's default quality."""
    buf = io.BytesIO()
    F.to_pil_image(x).save(buf, format="JPEG")
    return buf.getvalue()


def apply_level_jpeg(
    image: PIL.Image.Image,
    level: int,
    rng: np.random.Generator,
    mask_point: MaskPoint | None = None,
    *,
    flips: bool = False,
) -> bytes:
    """The JPEG bytes a miner receives for `image` at augmentation `level` (0-3)."""
    _check_level(level)
    if level == 0:
        return to_jpeg(_base(image))
    x = _geometric(image, mask_point, flips, rng)
    if level in LEVEL_DISTORTIONS:
        names, max_level = LEVEL_DISTORTIONS[level]
        for name in names:
            x = apply_distortion(x, name, int(rng.integers(0, max_level + 1)), rng)
    return to_jpeg(x)


def apply_level(
    image: PIL.Image.Image,
    level: int,
    rng: np.random.Generator,
    mask_point: MaskPoint | None = None,
    *,
    flips: bool = False,
) -> PIL.Image.Image:
    """`image` as a miner decodes it after the validator's level `level`: a 224x224 RGB PIL image.

    `rng` drives every random choice, so the same generator state gives the same pixels.
    `mask_point` is the (x, y) pixel centre of the object in `image`, when known.
    """
    data = apply_level_jpeg(image, level, rng, mask_point, flips=flips)
    with PIL.Image.open(io.BytesIO(data)) as decoded:
        return decoded.convert("RGB")


def sample_level(rng: np.random.Generator) -> int:
    """A level drawn like the validator's: 0-3 with probability 0.25 each."""
    return int(rng.choice(len(LEVELS), p=LEVEL_PROBS))


def sample(
    image: PIL.Image.Image,
    rng: np.random.Generator,
    mask_point: MaskPoint | None = None,
    *,
    flips: bool = False,
) -> tuple[PIL.Image.Image, int]:
    """A random challenge: (the decoded 224x224 image, its level)."""
    level = sample_level(rng)
    return apply_level(image, level, rng, mask_point, flips=flips), level


class ChallengeAugmentation:
    """Training augmentation = the validator's challenge: a level uniform in 0..max_level, then `apply_level`.

    Called as `aug(img, mask_point=None)`; returns the 224x224 image a miner would decode. The random
    draws come from torch's generator (one draw seeds a numpy generator), so the training loop's
    per-epoch / per-worker torch seeding reproduces them. A plain class: DataLoader workers pickle it.
    """

    def __init__(self, max_level: int = 3, *, flips: bool = False) -> None:
        _check_level(max_level)
        self.max_level = int(max_level)
        self.flips = flips

    def __call__(self, img: PIL.Image.Image, mask_point: MaskPoint | None = None) -> PIL.Image.Image:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        level = int(rng.integers(0, self.max_level + 1))
        return apply_level(img, level, rng, mask_point, flips=self.flips)

    def __repr__(self) -> str:
        return f"ChallengeAugmentation(max_level={self.max_level}, flips={self.flips})"


MASK_COLUMNS = ("mask_x", "mask_y")


def mask_points(rows) -> list[MaskPoint | None] | None:
    """Per row of an image-table-like table, the object's mask point from `mask_x` / `mask_y` (None where blank).

    Returns None when the table has no such columns. A non-numeric cell raises, naming the row.
    """
    if not all(c in rows.columns for c in MASK_COLUMNS):
        return None
    out: list[MaskPoint | None] = []
    for k, (x, y) in enumerate(zip(rows["mask_x"].tolist(), rows["mask_y"].tolist(), strict=True)):
        blank = [v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "" for v in (x, y)]
        if all(blank):
            out.append(None)
            continue
        try:
            out.append((float(x), float(y)))
        except (TypeError, ValueError):
            raise ValueError(
                f"row {k} ({rows['uri'].iloc[k] if 'uri' in rows.columns else 'no uri'}): mask_x={x!r}, "
                f"mask_y={y!r} is not a pixel point; give both as numbers or leave both blank"
            ) from None
    return out


__all__ = [
    "MASK_COLUMNS",
    "ChallengeAugmentation",
    "mask_points",
    "DISTORTION_PARAMS",
    "LEVEL_DISTORTIONS",
    "LEVEL_PROBS",
    "SIZE",
    "apply_distortion",
    "apply_level",
    "apply_level_jpeg",
    "sample",
    "sample_level",
    "to_jpeg",
]
