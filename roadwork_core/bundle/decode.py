"""Image inputs of `Bundle.predict`: bytes / path / PIL -> uint8 canvas, and batching.

Decoding runs in worker threads one batch ahead of the model forward (`Bundle.iter_predict`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import PIL.Image
import torch

ImageInput = PIL.Image.Image | bytes | str | os.PathLike


def to_canvas(item: ImageInput, name: str, canvas_size: int) -> torch.Tensor:
    """One input -> uint8 (3, C, C); raises ImageRejected / OSError / TypeError naming `name`."""
    from roadwork_core.data.images import decode_image, decode_pil, load_image
    from roadwork_core.data.loading import pil_to_canvas

    if isinstance(item, PIL.Image.Image):
        # as decode_image does for bytes and paths: a photo opened with PIL.Image.open still carries its
        # EXIF orientation tag and colour profile, and may not be decoded yet (errors then name `name`)
        img = decode_pil(item, source=name)
    elif isinstance(item, bytes | bytearray | memoryview):
        img = decode_image(bytes(item), source=name)
    elif isinstance(item, str | os.PathLike):
        img = load_image(os.fspath(item))
    else:
        raise TypeError(f"{name}: expected a PIL image, bytes, or a path, got {type(item).__name__}")
    return pil_to_canvas(img, canvas_size)


def decode_or_error(item: ImageInput | Exception, name: str, canvas_size: int) -> torch.Tensor | Exception:
    if isinstance(item, Exception):  # an input that already failed upstream (e.g. invalid base64)
        return item
    try:
        return to_canvas(item, name, canvas_size)
    except (ValueError, OSError, TypeError) as err:  # ImageRejected is a ValueError
        return err
    except (
        RuntimeError,
        MemoryError,
    ) as err:  # torch could not resize it: this image's error, not the batch's
        return ValueError(
            f"{name}: could not be resized to the {canvas_size} px canvas ({type(err).__name__}: {err})"
        )


def batched(
    items: Iterable[tuple[str, ImageInput]], batch_size: int
) -> Iterator[list[tuple[str, ImageInput]]]:
    batch: list[tuple[str, ImageInput]] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
