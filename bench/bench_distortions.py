"""The robustness report's validator distortions (`roadwork_core.data.distortions.distort`), per image.

A runs each level's pipeline on a uint8 tensor end to end (how `distort` ran before issue 19's fourth
round); B is `distort` itself: the geometric, colour and JPEG steps on the PIL image (PIL's C kernels),
noise and blur on a float tensor. Same levels, same seeds, synthetic scenes at the demo's size and at
1920x1080, one torch thread (as `evaluate_bundle_on_test` runs them). Ratio = seconds(A) / seconds(B).

    python -m bench.bench_distortions [--images 12] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torchvision.transforms.v2 as T

from bench.common import machine_facts, side_by_side, write_result
from roadwork_core.data.distortions import LEVELS, distort
from roadwork_core.data.synthetic import draw_scene


def tensor_pipeline(level: int, size: tuple[int, int]) -> T.Compose:
    """The whole level on a uint8 (3, H, W) tensor: the pre-change layout, kept here as the baseline."""
    spec = LEVELS[level]
    ops: list = [T.RandomResizedCrop(size, scale=spec.crop_scale, antialias=True)]
    if spec.rotation_deg > 0:
        ops.append(T.RandomRotation(spec.rotation_deg))
    ops.append(T.RandomHorizontalFlip(spec.hflip_p))
    ops.append(T.ColorJitter(spec.color, spec.color, spec.color, spec.hue))
    ops.append(T.JPEG(list(spec.jpeg_quality)))
    ops.append(T.ToDtype(torch.float32, scale=True))
    if spec.noise_p > 0:
        ops.append(T.RandomApply([T.GaussianNoise(sigma=spec.noise_sigma, clip=True)], p=spec.noise_p))
    if spec.blur_sigma is not None:
        ops.append(T.RandomApply([T.GaussianBlur(5, sigma=spec.blur_sigma)], p=spec.blur_p))
    ops.append(T.ToDtype(torch.uint8, scale=True))
    return T.Compose(ops)


def tensor_distort(img, level: int, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = T.functional.pil_to_tensor(img.convert("RGB"))
        return T.functional.to_pil_image(tensor_pipeline(level, (img.height, img.width))(x))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    scenes = [draw_scene(rng, positive=i % 2 == 0).image for i in range(args.images)]
    sizes = {"demo": None, "1920x1080": (1920, 1080)}
    rows = {}
    for name, size in sizes.items():
        imgs = [im if size is None else im.resize(size) for im in scenes]
        for level in (1, 2, 3):
            res = side_by_side(
                lambda: [tensor_distort(im, level, i) for i, im in enumerate(imgs)],  # noqa: B023
                lambda: [distort(im, level, i) for i, im in enumerate(imgs)],  # noqa: B023
                repeats=args.repeats,
            )
            d = res.as_dict()
            key = f"{name}_level{level}"
            rows[key] = {
                "image_size": list(imgs[0].size),
                "tensor_ms_per_image": round(1000 * d["median_a_seconds"] / len(imgs), 1),
                "pil_ms_per_image": round(1000 * d["median_b_seconds"] / len(imgs), 1),
                **d,
            }
            print(
                f"{key:>18} {imgs[0].size}: tensor {rows[key]['tensor_ms_per_image']} ms, "
                f"PIL kernels {rows[key]['pil_ms_per_image']} ms per image ({d['median_ratio_a_over_b']:.2f}x)"
            )
    write_result("distortions", {"machine": machine_facts(), "torch_threads": 1, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
