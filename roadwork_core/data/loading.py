"""Images -> square uint8 canvases (3, C, C), the input of RoadworkClassifier after `.float() / 255`.

The canvas is the whole image resized (antialiased) to C x C; the multi-view step tiles it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import PIL.Image
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

__all__ = [
    "CANVAS_CACHE_BYTES",
    "CanvasDataset",
    "ImageChanged",
    "cache_canvases",
    "load_canvas",
    "load_verified_image",
    "pil_to_canvas",
]


# The antialiased resize runs one axis at a time, through an intermediate of (long side x canvas) pixels:
# above this many, a side is first reduced by an integer factor (PIL's box filter).
_RESIZE_INTERMEDIATE_PIXELS = 64 * 1024 * 1024


def pil_to_canvas(img: PIL.Image.Image, canvas_size: int) -> torch.Tensor:
    """PIL image (any mode) -> uint8 (3, canvas_size, canvas_size).

    A very long and thin image (1 x 8,000,000 pixels: a 31 KB PNG) is first reduced along its long side to
    about 4 canvases: resized directly, its intermediate took 4 GB, and at Pillow's pixel limit torch
    asked for 35 GB. Photos (up to ~90,000 px a side at a 672 px canvas) are resized directly, as before."""
    img = img.convert("RGB")  # before the reduce, which refuses palette, 1-bit and 16-bit modes
    w, h = img.size
    if max(w, h) * canvas_size > _RESIZE_INTERMEDIATE_PIXELS:
        img = img.reduce((max(1, w // (4 * canvas_size)), max(1, h // (4 * canvas_size))))
    pixels = TF.pil_to_tensor(img)  # (3, H, W) uint8
    return TF.resize(pixels, [canvas_size, canvas_size], antialias=True)


def load_canvas(uri: str, canvas_size: int) -> torch.Tensor:
    """uri (file path or `<parquet>#row=<n>`) -> uint8 (3, canvas_size, canvas_size)."""
    from roadwork_core.data.images import load_image

    return pil_to_canvas(load_image(uri), canvas_size)


class ImageChanged(ValueError):
    """An image's bytes are no longer those its image_id (sha256) was taken from."""


_SHA256 = re.compile(r"[0-9a-f]{64}")


def load_verified_image(uri: str, image_id: str) -> PIL.Image.Image:
    """Read the image at `uri`, check that its bytes still hash to `image_id`, decode it. A file replaced
    after `image_table` hashed it (another image copied over it, an edit) would otherwise be trained on or
    scored under the identity, split and cached features of the image it replaced. Only an image_id that
    is a sha256 (64 hex characters, as image_table writes them) can be checked; others (a table made by
    hand) are read as they are."""
    import hashlib

    from roadwork_core.data.images import decode_image, load_image, read_uri_bytes

    if not _SHA256.fullmatch(image_id):
        return load_image(uri)
    data = read_uri_bytes(uri)
    got = hashlib.sha256(data).hexdigest()
    if got != image_id:
        raise ImageChanged(
            f"{uri}: the file changed since image_table hashed it (sha256 {got[:12]}..., its image_id "
            f"{image_id[:12]}...): restore the file, or materialize image_table (and everything after it) "
            f"again for this dataset version so the change is hashed, split and checked"
        )
    return decode_image(data, source=uri)


class CanvasDataset(Dataset):
    """Items: (uint8 canvas (3, C, C), label float (NaN when unlabelled), index int). With `image_ids`
    (the image table's sha256 per uri) each read checks that the file still has those bytes."""

    def __init__(
        self,
        uris: list[str],
        labels: list[int] | None,
        canvas_size: int,
        transform: Callable[..., PIL.Image.Image] | None = None,
        mask_points: list[tuple[float, float] | None] | None = None,
        image_ids: list[str] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(uris):
            raise ValueError(
                f"CanvasDataset: {len(uris)} uris but {len(labels)} labels; pass one label per uri"
            )
        if image_ids is not None and len(image_ids) != len(uris):
            raise ValueError(f"CanvasDataset: {len(uris)} uris but {len(image_ids)} image_ids")
        self.image_ids = None if image_ids is None else [str(i) for i in image_ids]
        self.uris = list(uris)
        self.labels = None if labels is None else [float(label) for label in labels]
        self.canvas_size = canvas_size
        self.transform = transform
        # with mask points the transform is called as transform(img, mask_point=...) (ChallengeAugmentation)
        self.mask_points = mask_points
        if mask_points is not None and len(mask_points) != len(uris):
            raise ValueError(f"CanvasDataset: {len(uris)} uris but {len(mask_points)} mask points")

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, int]:
        from roadwork_core.data.images import load_image

        uri = self.uris[index]
        try:
            img = (
                load_image(uri) if self.image_ids is None else load_verified_image(uri, self.image_ids[index])
            )
            if self.transform is not None and self.mask_points is not None:
                img = self.transform(img, mask_point=self.mask_points[index])
            elif self.transform is not None:
                img = self.transform(img)
            canvas = pil_to_canvas(img, self.canvas_size)
        except Exception as e:
            e.add_note(
                f"CanvasDataset item {index}: uri {uri!r} (fix or remove this image from the image table)"
            )
            raise
        label = math.nan if self.labels is None else self.labels[index]
        return canvas, label, index


# A split read every epoch without augmentation (val_select) is decoded once and kept as uint8 canvases
# when they fit in this many bytes (the demo's 200 images at 172 px: 18 MB); larger splits stay lazy.
CANVAS_CACHE_BYTES = 512 * 2**20


class _CachedCanvases(Dataset):
    """The items of a transform-free CanvasDataset, decoded once: (canvas, label, index)."""

    def __init__(self, canvases: torch.Tensor, labels: list[float] | None) -> None:
        self.canvases, self.labels = canvases, labels

    def __len__(self) -> int:
        return len(self.canvases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, int]:
        label = math.nan if self.labels is None else self.labels[index]
        return self.canvases[index], label, index


def cache_canvases(
    dataset: CanvasDataset, max_bytes: int = CANVAS_CACHE_BYTES, workers: int | None = None
) -> Dataset:
    """`dataset` with every canvas decoded once, when it has no transform (the same pixels every epoch)
    and its canvases fit in `max_bytes`; otherwise `dataset` itself.

    The decode runs on `workers` threads (default: torch's intra-op thread count). Pillow's JPEG decode
    and torch's resize release the GIL: the demo's first 1,400 images as 172 px canvases took 3.9-4.4 s
    on 2 threads against 5.8-7.2 s on one (idle 2-core machine, 2 torch threads). The order is the
    dataset's."""
    if dataset.transform is not None or len(dataset) * 3 * dataset.canvas_size**2 > max_bytes:
        return dataset
    if len(dataset) == 0:
        return dataset
    if workers is None:  # the process's CPU budget: a DDP rank on 1 thread decodes on 1, the demo on 2
        workers = torch.get_num_threads()
    workers = max(1, min(int(workers), len(dataset)))

    def canvas(i: int) -> torch.Tensor:
        return dataset[i][0]

    if workers == 1:
        items = [canvas(i) for i in range(len(dataset))]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            items = list(pool.map(canvas, range(len(dataset))))  # in order; the first error propagates
    return _CachedCanvases(torch.stack(items), dataset.labels)  # (N, 3, C, C) uint8
