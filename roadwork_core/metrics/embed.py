"""PNG figures as markdown images with a base64 data URI, small enough for Dagster metadata.

Dagster's UI renders `MetadataValue.md` in the browser; an image there must travel inside the markdown
(a `file://` link is refused by a page served over http). Figures are re-encoded as palette PNGs (a
plot has few colours) and scaled down until the encoded text fits the budget.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

MAX_WIDTH = 720  # px: wide enough to read a 9-inch figure's labels in the metadata dialog
MAX_ENCODED_BYTES = 120_000  # per image, after base64


def compact_png(png: bytes, max_width: int = MAX_WIDTH, max_bytes: int = MAX_ENCODED_BYTES) -> bytes:
    """Re-encode a PNG as an optimized 256-colour palette PNG at most `max_width` wide whose base64
    text is at most `max_bytes`; halves the width until it fits (never below 64 px)."""
    if not png.startswith(b"\x89PNG"):
        raise ValueError("compact_png: the bytes are not a PNG image (no PNG signature)")
    with Image.open(io.BytesIO(png)) as src:
        rgba = src.convert("RGBA")
    rgb = Image.new("RGB", rgba.size, "white")
    rgb.paste(rgba, mask=rgba.getchannel("A"))  # flatten transparency onto white
    width = min(max_width, rgb.width)
    while True:
        height = max(1, round(rgb.height * width / rgb.width))
        scaled = rgb if width == rgb.width else rgb.resize((width, height), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        scaled.quantize(colors=256).save(buf, format="PNG", optimize=True)
        out = buf.getvalue()
        if 4 * ((len(out) + 2) // 3) <= max_bytes or width <= 64:
            return out
        width //= 2


def png_data_uri(png: bytes, **kw) -> str:
    """`data:image/png;base64,...` of the compacted PNG."""
    return "data:image/png;base64," + base64.b64encode(compact_png(png, **kw)).decode("ascii")


def markdown_images(figures: Iterable[tuple[str, bytes]], **kw) -> str:
    """One `### title` + inline image per (title, png) pair, in the given order."""
    parts = [f"### {title}\n\n![{title}]({png_data_uri(png, **kw)})" for title, png in figures]
    return "\n\n".join(parts) if parts else "_(no plots)_"


def folder_figures(folder: str | os.PathLike, first: Iterable[str] = ()) -> list[tuple[str, bytes]]:
    """(title, png) for every `*.png` under `folder`: the file names in `first` (in that order), then
    the rest by path. Titles are the file stems with underscores as spaces."""
    root = Path(folder)
    found = {p.relative_to(root).as_posix(): p for p in root.rglob("*.png") if p.is_file()}
    first = [n for n in dict.fromkeys(first) if n in found]
    names = first + sorted(set(found) - set(first))
    return [(found[n].stem.replace("_", " "), found[n].read_bytes()) for n in names]
