"""Image bytes -> validated RGB PIL image, and the URIs images are read from.

A URI is either an absolute file path, or `<absolute path of a parquet file>#row=<n>` for images
stored inside a Hugging Face parquet shard (an `image` column of `{bytes, path}` structs). `#row=` is
a row marker only after a `.parquet` path: `frame#row=1.jpg` is a plain file name.

Decoding is strict: the whole image is decoded (`img.load()`), so a truncated file is caught here
and not halfway through training. Nothing global in Pillow is changed (no LOAD_TRUNCATED_IMAGES,
no MAX_IMAGE_PIXELS); the pixel limit is our own argument.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import re
import stat
import threading
import warnings
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# 8192 x 8192: larger than any street camera frame we expect, far below what exhausts memory.
MAX_PIXELS = 8192 * 8192
# Scans of a progressive JPEG: libjpeg decodes each over the whole image and only warns on surplus ones, so
# a 99-byte scan repeated 300 times (a 292 KB file) took 13.6 s and 80,000 of them would hold a server core
# for an hour. Encoders write 6-10 (libjpeg's default progression), rarely more than a few dozen.
MAX_JPEG_SCANS = 128
# Bumped whenever decoding turns the same bytes into other pixels (EXIF, colour profiles, alpha, 16-bit
# scaling): it is part of the feature cache's key, so features cached by an earlier decoder never hit.
# 2: grey, 16-bit grey and palette images with a colour profile are converted to sRGB.
DECODE_VERSION = 2
# The largest image file read: an uncompressed 16-bit RGB TIFF at MAX_PIXELS is 384 MiB.
MAX_FILE_BYTES = 512 << 20

ROW_SEP = "#row="

# ISO base media `ftyp` brands of HEIC/HEIF and AVIF files (phone photos); Pillow reads neither here.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageRejected(ValueError):
    """An image that cannot be used. `reason` is a stable short code, `detail` says why for a person.

    Codes: `unreadable` (not an image, empty, unknown format), `truncated` (header readable, pixel
    data incomplete or corrupt), `too_large` (over the pixel limit: a decompression bomb guard).
    """

    def __init__(self, reason: str, source: str, detail: str = ""):
        self.reason, self.source, self.detail = reason, source, detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))


def decode_image(data: bytes, *, source: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `data` fully into an RGB image with EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images are converted; alpha is composited on white.
    Raises `ImageRejected` naming `source` for anything that cannot be decoded completely.
    """
    if not data:
        raise ImageRejected("unreadable", source, "zero-byte file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on huge images; we apply our own limit below instead. Its "Corrupt
            # EXIF data" warnings at open say nothing a reject would not: decoding decides below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", source, _text(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  any plugin's failure on hostile bytes: UnidentifiedImageError,
        # OSError, ValueError, SyntaxError, and TypeError / struct.error / IndexError from odd headers
        raise ImageRejected(
            "unreadable", source, _unsupported_format(data) or f"not a readable image: {_describe(exc)}"
        ) from exc

    return decode_pil(img, source=source, max_pixels=max_pixels)


def _check_jpeg_scans(img: Image.Image, source: str) -> None:
    """Refuse a JPEG of more than MAX_JPEG_SCANS scans before it is decoded (from its file's bytes; an
    image already decoded, or without a file, has nothing left to guard)."""
    fp = getattr(img, "fp", None)
    if img.format not in ("JPEG", "MPO") or fp is None or getattr(img, "_im", None) is not None:
        return
    try:
        at = fp.tell()
        fp.seek(0)
        data = fp.read(MAX_FILE_BYTES + 1)
        fp.seek(at)
    except (OSError, ValueError, AttributeError):  # a closed or unseekable file: decoding will say so
        return
    scans = data.count(b"\xff\xda")  # start-of-scan markers (0xFF in entropy-coded data is stuffed)
    if scans > MAX_JPEG_SCANS:
        raise ImageRejected(
            "too_large",
            source,
            f"a JPEG of {scans} scans (more than {MAX_JPEG_SCANS}): each is decoded over the whole image, so "
            "it would take minutes; re-save it as a baseline JPEG or a PNG",
        )


def decode_pil(img: Image.Image, *, source: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An opened (possibly not yet loaded) PIL image -> RGB, as `decode_image` makes it: fully decoded,
    EXIF orientation applied, an embedded colour profile converted to sRGB, alpha composited on white.
    Raises `ImageRejected` naming `source`."""
    fmt = img.format or "image"  # exif_transpose returns a copy without `format`
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected(
            "too_large", source, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}; resize it"
        )
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # "Corrupt EXIF data", "Truncated File Read": decided below
        with _load_lock(img):
            _check_jpeg_scans(img, source)  # bytes, paths and PIL images alike, before any decoding
        try:
            with _load_lock(img):  # one PIL object passed twice is decoded by two threads otherwise
                img.load()  # force a full decode: this is where truncated / corrupt pixel data shows up
        except MemoryError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageRejected("truncated", source, f"{fmt} {w}x{h}: {_text(exc)}") from exc
        except Exception as exc:  # noqa: BLE001  e.g. TypeError from a TIFF tag of the wrong type, or
            # Pillow's assertion on an image whose file was closed (`with Image.open(...)` left behind)
            why = (
                "its file was closed before it was decoded; call .load() inside the `with Image.open(...)` "
                "block, or pass the path or the bytes"
                if _closed(img)
                else _describe(exc)
            )
            raise ImageRejected("unreadable", source, f"{fmt} {w}x{h}: {why}") from exc
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # noqa: BLE001
            raise ImageRejected(
                "unreadable", source, f"malformed EXIF orientation: {_describe(exc)}"
            ) from exc
    try:
        return to_rgb(to_srgb(img))
    except UnusablePixels as exc:
        raise ImageRejected("unreadable", source, f"{fmt} {w}x{h} mode {img.mode}: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  a mode Pillow cannot convert
        raise ImageRejected("unreadable", source, f"{fmt} {w}x{h} mode {img.mode}: {_describe(exc)}") from exc


_LOAD_LOCKS_GUARD = threading.Lock()


def _load_lock(img: Image.Image) -> threading.Lock:
    """A lock per PIL image object (kept on the object: PIL images are not hashable): Pillow's lazy
    `load()` is not safe to run twice at once on one object."""
    with _LOAD_LOCKS_GUARD:
        lock = getattr(img, "_roadwork_load_lock", None)
        if lock is None:
            lock = threading.Lock()
            img._roadwork_load_lock = lock
        return lock


def _closed(img: Image.Image) -> bool:
    return getattr(img, "fp", True) is None and getattr(img, "_im", True) is None  # never loaded, file gone


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str):
    """A LittleCMS transform from the embedded profile `icc` to sRGB (None when it is sRGB already)."""
    from PIL import ImageCms

    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if "srgb" in (ImageCms.getProfileDescription(source) or "").lower():
        return None  # most cameras and web images: nothing to convert
    out = "RGBA" if mode == "RGBA" else "RGB"
    return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, out)


_DEEP_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_srgb(img: Image.Image) -> Image.Image:
    """Pixels in an embedded colour profile other than sRGB (an iPhone's Display P3, Adobe RGB, a CMYK
    press profile, a grey profile such as Photoshop's Gray Gamma / Dot Gain) converted to sRGB, the space
    the model and the validator's images live in. A palette image is expanded to its colours first, a grey
    one (8-bit, 16-bit, with alpha) is converted from its grey profile into sRGB RGB. Images without a
    profile, or with one LittleCMS cannot read or that does not fit the mode (then taken as sRGB), are
    returned as they are."""
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    original = img
    try:
        if img.mode in ("P", "PA") or (img.mode == "RGB" and "transparency" in img.info):
            alpha = img.mode == "PA" or "transparency" in img.info
            img = _with_profile(img.convert("RGBA" if alpha else "RGB"), icc)
        if img.mode == "L" and "transparency" in img.info:
            img = _with_profile(img.convert("LA"), icc)
        if img.mode in _DEEP_GREY:
            img = _with_profile(to_rgb(img).convert("L"), icc)  # to 8 bits as to_rgb scales them
        if img.mode in ("LA", "La"):
            grey, alpha = img.convert("LA").split()
            out = to_srgb(_with_profile(grey, icc))
            out.putalpha(alpha)
            return out
        if img.mode not in ("RGB", "RGBA", "CMYK", "L"):
            return img
        transform = _srgb_transform(bytes(icc), img.mode)
        return img if transform is None else _apply(transform, img)
    except Exception as exc:  # ImageCms.PyCMSError (a plain Exception in Pillow 13): a broken profile, or
        # one that does not fit the pixels (an RGB profile on a grey image): taken as sRGB, as a browser does
        log.debug("colour profile of a %s image ignored: %s", img.mode, exc)
        return original


def _with_profile(img: Image.Image, icc) -> Image.Image:
    img.info = {k: v for k, v in img.info.items() if k != "transparency"}  # applied by the conversion
    img.info["icc_profile"] = icc
    return img


def _apply(transform, img: Image.Image) -> Image.Image:
    from PIL import ImageCms

    out = ImageCms.applyTransform(img, transform)
    out.info = {k: v for k, v in img.info.items() if k != "icc_profile"}
    return out


class UnusablePixels(ValueError):
    """Pixel values with no defined brightness (NaN / infinite floats)."""


def _describe(exc: BaseException) -> str:
    """`_text`, prefixed with the exception's type when it is not one of the usual I/O ones."""
    text = _text(exc)
    usual = (OSError, ValueError, SyntaxError, EOFError)
    return text if isinstance(exc, usual) and text else f"{type(exc).__name__}: {text}"


def _text(exc: BaseException) -> str:
    """An exception's message without object reprs (`<_io.BytesIO object at 0x7f...>` says nothing)."""
    return _OBJECT_REPR.sub("", str(exc)).strip()


def _unsupported_format(data: bytes) -> str | None:
    """A reject detail for a known image format that cannot be read here, from its magic bytes."""
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        kind = "HEIC/HEIF" if brand in _HEIF_BRANDS else "AVIF" if brand in _AVIF_BRANDS else None
        if kind is not None:
            return (
                f"{kind} image (ftyp brand {brand.decode('ascii')!r}): this format is not supported; convert it "
                "to JPEG (e.g. `heif-convert in.heic out.jpg`, or set the phone camera to 'Most Compatible')"
            )
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent pixels become white (an alpha channel, or the one
    colour a PNG marks transparent with tRNS: what PNG optimizers write when alpha is only 0 or 255)."""
    if img.mode in ("RGB", "L") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        unit = _unit_range(arr, img.mode)
        arr8 = np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _unit_range(arr: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel deep pixels -> [0, 1].

    `I;16*`: 16-bit, 0..65535. `I` (32-bit int) and `F` (float): values within 0..1 (`F` only), 0..255
    or 0..65535 (`I` only: 16-bit data Pillow opened as `I`) are read in that range; any other range is
    stretched from its own minimum to maximum. Raises `UnusablePixels` for NaN or infinite floats.
    """
    if mode.startswith("I;16"):
        return arr / 65535.0
    if not np.isfinite(arr).all():
        raise UnusablePixels(
            "float pixels include NaN or infinite values, so their brightness is undefined; save it as an "
            "8-bit image (JPEG or PNG)"
        )
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1.0 and mode == "F":
        return arr
    if lo >= 0 and hi <= 255.0:
        return arr / 255.0
    if lo >= 0 and hi <= 65535.0 and mode == "I":
        return arr / 65535.0
    return (arr - lo) / ((hi - lo) or 1.0)


# ---------------------------------------------------------------------------------------------
# URIs


def utf8_name(text: str) -> bool:
    """False for a path holding bytes that are not UTF-8 (os.listdir hands them out as surrogate escapes,
    e.g. a Latin-1 `café.jpg` from an old archive): no UTF-8 table or log can record such a name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(text: str) -> str:
    """`text` with bytes that are not UTF-8 written as \\xNN escapes: `caf\\xe9.jpg`."""
    return text if utf8_name(text) else os.fsencode(text).decode("utf-8", "backslashreplace")


def parquet_uri(path: str | os.PathLike, row: int) -> str:
    return f"{Path(path).absolute()}{ROW_SEP}{row}"


def split_uri(uri: str) -> tuple[str, int | None]:
    """`/a/b.parquet#row=3` -> ('/a/b.parquet', 3); a plain path, `#row=` in its name or not, -> (path, None)."""
    path, sep, row = uri.rpartition(ROW_SEP)
    if not sep or not path.endswith(".parquet"):
        return uri, None
    if not row.isdigit():
        raise ValueError(f"bad image uri {uri!r}: expected '<parquet path>#row=<non-negative int>'")
    return path, int(row)


class _ParquetShard:
    """An opened parquet file with row-group offsets, so one row costs one row-group read."""

    def __init__(self, path: str):
        self.path = path
        self.file = pq.ParquetFile(path)
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()  # len = n_groups + 1
        self.lock = threading.Lock()  # a ParquetFile is not safe to read from several threads


@functools.lru_cache(maxsize=8)
def _open_shard(path: str, mtime_ns: int, size: int) -> _ParquetShard:
    # mtime and size are part of the key so that a rewritten file is reopened.
    return _ParquetShard(path)


@functools.lru_cache(maxsize=4)
def _image_column(path: str, mtime_ns: int, size: int, group: int) -> pa.StructArray:
    shard = _open_shard(path, mtime_ns, size)
    with shard.lock:
        table = shard.file.read_row_group(group, columns=["image"])
    return table.column("image").combine_chunks()


def _parquet_row_bytes(path: str, row: int) -> bytes:
    uri = f"{path}{ROW_SEP}{row}"
    st = os.stat(path)
    try:
        shard = _open_shard(path, st.st_mtime_ns, st.st_size)
        n_rows = shard.starts[-1]
        if row >= n_rows:
            raise ImageRejected("unreadable", uri, f"{path} has {n_rows} rows; row {row} does not exist")
        group = bisect_right(shard.starts, row) - 1
        column = _image_column(path, st.st_mtime_ns, st.st_size, group)
        value = column[row - shard.starts[group]].as_py()
    except (KeyError, IndexError, pa.ArrowException) as err:  # no `image` column, not a parquet file
        raise ImageRejected(
            "unreadable", uri, f"not a Hugging Face image shard row ({type(err).__name__}: {err})"
        ) from err
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise ImageRejected("unreadable", f"{path}{ROW_SEP}{row}", "the image struct holds no embedded bytes")
    return data


def read_uri_bytes(uri: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The raw bytes of the image at `uri` (a file path, or `<parquet>#row=<n>`). A path that is not a
    regular file (a named pipe would block the read for ever, a device never ends) or holds more than
    `max_bytes` raises `ImageRejected` before anything is read."""
    path, row = split_uri(uri)
    if row is not None:
        return _parquet_row_bytes(path, row)
    info = os.stat(path)  # FileNotFoundError / PermissionError / ELOOP as they are
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a named pipe"
            if stat.S_ISFIFO(info.st_mode)
            else "a socket"
            if stat.S_ISSOCK(info.st_mode)
            else "a device"
        )
        raise ImageRejected("unreadable", path, f"{kind}, not a regular file; replace it with the image file")
    if info.st_size > max_bytes:
        raise ImageRejected(
            "too_large",
            path,
            f"{info.st_size} bytes exceeds the limit of {max_bytes} bytes for one image file; "
            "recompress or resize it",
        )
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the stat
        raise ImageRejected("too_large", path, f"more than {max_bytes} bytes; recompress or resize it")
    return data


def load_image(uri: str, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode the image at `uri`; raises `ImageRejected` (or OSError for a missing file)."""
    return decode_image(read_uri_bytes(uri), source=uri, max_pixels=max_pixels)
