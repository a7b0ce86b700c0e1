"""Data drops: folders of labelled images under an inbox, one per dataset version.

A drop is complete when it holds `_READY`. Five layouts are read (auto-detected, or forced):

- `labels_csv`: `labels.csv` with columns `file,label,<metadata...>`; `file` relative to the drop.
- `imagefolder`: class subfolders, by default `roadwork/` (label 1) and `no_roadwork/` (label 0); folder
  names match case-insensitively with '-' or ' ' for '_' (`Roadwork/`, `No-Roadwork/`). Symlinked
  subfolders are followed while they stay inside the drop. An image file outside every class folder
  (top level, `unsure/`, ...) is a `no_class_folder` reject; `unlabelled/` is the unlabelled pool.
- `hf_parquet`: Hugging Face parquet shards (`*.parquet`, e.g. under `data/`) with an `image` column
  of `{bytes, path}` structs, a `label` column (int or class name); every other column is metadata,
  nested structs flattened with dots (`scene_level_tags.weather`).
- `yolo`: detection labels, `images/**` with `labels/**/<stem>.txt` beside them (the same path with
  `images` -> `labels`), lines `class cx cy w h` (normalized; YOLO polygons `class x1 y1 x2 y2 ...`
  too), class names from an optional `classes.txt` or `data.yaml` (`names:`).
- `coco`: detection labels, one or more COCO json files (`*.json` at the top or under
  `annotations/`) with `images`, `annotations` and `categories`; `file_name` relative to the drop
  or to `images/`.
  A detection image is roadwork (1) when it holds at least one box of `box_classes` (default: any
  box); an empty or missing YOLO label file, or a COCO image without annotations, is no_roadwork (0).
  The centre of its largest such box becomes `mask_x`, `mask_y` (pixels), the validator's mask point.
  A malformed label line or annotation rejects its image (`bad_label`, naming the file and line).

With `labels.csv` present it alone decides which images the drop holds, class folders or not; image
files on disk that it does not list (outside `unlabelled/`) are counted in one `not_in_labels_csv`
reject row (file `labels.csv`) naming the first of them, so a csv that selects a subset on purpose
does not fail the reject limit, yet nothing is left out silently.

Readers only list candidates; decoding and label checks happen in the image table. Paths that escape
the drop root and symlinks that resolve outside it are rejected here and never read. OS junk
(dot-files, `Thumbs.db`, `desktop.ini`, `__MACOSX/`, ...) is skipped wherever folders are walked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from roadwork_core.data.images import ROW_SEP

FORMATS = ("labels_csv", "imagefolder", "hf_parquet", "yolo", "coco")
DEFAULT_CLASS_NAMES: dict[str, int] = {"roadwork": 1, "no_roadwork": 0}
READY = "_READY"
UNLABELLED = "unlabelled"
# Columns the listing, the image table or the splits step define; a metadata column with one of these
# names (an export's own `split`, `group_id`) is kept as `meta.<name>`.
RESERVED = frozenset(
    {"uri", "file", "label", "label_raw", "source", "image_id", "phash", "phash_dihedral", "width", "height"}
    | {"split", "group_id", "_prev", "_anchor"}  # the last two: assign_splits' working columns
)
BASE_COLUMNS = ["uri", "file", "label_raw", "source"]
# Reject rows that are notices (they count toward no reject limit, since they are no image): files in an
# ImageFolder drop's class folders whose suffix says they are not images, YOLO label files and COCO
# annotations that belong to no image.
NOT_AN_IMAGE_FILE = "not_an_image_file"
ORPHAN_LABEL = "orphan_label"
ORPHAN_ANNOTATION = "orphan_annotation"
# Skipped wherever a drop is walked (besides every name starting with '.': .DS_Store, ._x.jpg, .git).
JUNK_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
JUNK_DIRS = frozenset({"__macosx", "$recycle.bin", "system volume information"})
# What counts as an image file when looking for images a reader would leave out.
IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".mpo",  # multi-picture JPEG (stereo and some phone cameras); Pillow reads its first picture
    }
)


@dataclass(frozen=True)
class Reject:
    file: str
    reason: str  # stable short code: path_escape, symlink_outside, unreadable, ...
    detail: str = ""


@dataclass
class DropListing:
    candidates: pd.DataFrame  # uri, file, label_raw, source, then metadata columns (str)
    rejects: list[Reject] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Inbox


def version_key(version: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key of a dataset version name: natural order, digit runs compared as numbers.

    `v2` < `v10`, `2025-1-5` < `2025-01-10`; zero-padded names (`v0001` < `v0010`) keep their plain
    string order. Ties (`v1` vs `v01`) fall back to the string. Use it wherever versions are ordered or
    compared: `sorted(versions, key=version_key)`, `version_key(a) < version_key(b)`.
    """
    parts = re.split(r"(\d+)", version)  # str, digits, str, ...: a number always meets a number
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), version


MAX_VERSION_BYTES = 200  # in UTF-8; artifact folders are named `.tmp-<version>-<random>` (atomic_dir)


def version_name_problem(name: str) -> str | None:
    """Why a drop folder's name cannot name a dataset version, or None when it can.

    The name becomes the `dataset_version` partition key, run tags, folders under the state and a value in
    UTF-8 tables. Bytes that are not UTF-8 (a folder from an old archive) cannot be stored at all. Dagster's
    UI reads `...` as a range of partitions (Dagster refuses it, and control characters, in static partition
    keys) and splits a selection at commas, so that launching `v1,2` launches `v1` and `2` (dagster-io/dagster
    issue 15105)."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "holds bytes that are not UTF-8 (a folder from an archive made on another system?)"
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        return "is not the name of one folder inside the inbox (empty, '.', '..' or a path with '/' or '\\')"
    if name.startswith("."):
        return "begins with '.', a hidden folder the drop readers skip"
    if len(encoded) > MAX_VERSION_BYTES:
        return (
            f"is {len(encoded)} bytes long; at most {MAX_VERSION_BYTES}: the artifact store adds a prefix and a "
            f"suffix to it in file names, and file systems stop at 255 bytes"
        )
    if "..." in name:
        return "contains '...', which Dagster reads as a range of partitions"
    if "," in name:
        return "contains ',', where Dagster's UI splits a partition selection"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character (a tab or newline)"
    if name != name.strip():
        return "begins or ends with whitespace"
    return None


def _ready_folders(inbox: Path) -> list[Path]:
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    return [p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / READY).is_file()]


def list_ready_drops(inbox: Path) -> list[str]:
    """Names of the complete drops (subfolders holding `_READY`) under `inbox`, in `version_key` order.
    Folders whose name cannot be a dataset version are left out: `unusable_ready_drops` lists them."""
    return sorted(
        (p.name for p in _ready_folders(inbox) if version_name_problem(p.name) is None), key=version_key
    )


def unusable_ready_drops(inbox: Path) -> dict[str, str]:
    """Complete drops whose folder name cannot be a dataset version (`version_name_problem`): printable
    name (bytes that are not UTF-8 as \\xNN) -> the problem and the fix. No version includes their images
    until the folder is renamed."""
    from roadwork_core.data.images import printable_name

    out = {}
    for folder in _ready_folders(inbox):
        problem = version_name_problem(folder.name)
        if problem is not None:
            out[printable_name(folder.name)] = (
                f"{problem}; rename the folder (letters, digits, '-', '_', '.'; e.g. v0003 or 2026-12-01) "
                f"and keep {READY} in it"
            )
    return dict(sorted(out.items()))


def drops_up_to(inbox: Path, version: str) -> list[Path]:
    """Every ready drop whose name sorts (`version_key`) at or before `version` (drops accumulate), oldest first."""
    ready = list_ready_drops(inbox)
    if version not in ready:
        raise ValueError(
            f"dataset version {version!r} is not a ready drop under {inbox} "
            f"(ready: {ready or 'none'}); a drop is ready once `{inbox}/{version}/{READY}` exists"
        )
    return [Path(inbox) / name for name in ready if version_key(name) <= version_key(version)]


# ---------------------------------------------------------------------------------------------
# Format detection


def detect_format(drop_dir: Path, class_names: dict[str, int] | None = None) -> str:
    drop_dir = Path(drop_dir)
    if (drop_dir / "labels.csv").is_file():
        return "labels_csv"
    names = class_names or DEFAULT_CLASS_NAMES
    if _class_folders(drop_dir, names):
        return "imagefolder"
    if _parquet_files(drop_dir):
        return "hf_parquet"
    if (drop_dir / "images").is_dir() and (drop_dir / "labels").is_dir():
        return "yolo"
    if _coco_files(drop_dir):
        return "coco"
    raise ValueError(
        f"cannot tell the format of drop {drop_dir}: expected labels.csv, class folders "
        f"{sorted(names)}, *.parquet files, YOLO images/ + labels/ folders, or a COCO json with images "
        f"and annotations; add one of them or set the format explicitly ({', '.join(FORMATS)})"
    )


def pool_only(drop_dir: Path) -> bool:
    """The drop holds nothing but `unlabelled/` (and `_READY`, OS litter): a drop that adds images to the
    self-supervised pool only. It adds no labelled image to its version, and later versions build on it."""
    entries = [
        p for p in Path(drop_dir).iterdir() if p.name != READY and not is_junk(p.name, is_dir=p.is_dir())
    ]
    return all(p.name == UNLABELLED and p.is_dir() for p in entries)


def read_drop(
    drop_dir: Path,
    fmt: str = "auto",
    class_names: dict[str, int] | None = None,
    box_classes: list[str] | None = None,
) -> DropListing:
    """List the candidate images of one drop; see the module docstring for the formats.

    `box_classes` (detection formats only): class names (or ids) whose boxes make an image roadwork;
    None or empty = any box.
    """
    drop_dir = Path(drop_dir)
    if not drop_dir.is_dir():
        raise FileNotFoundError(f"drop folder {drop_dir} does not exist")
    names = class_names or DEFAULT_CLASS_NAMES
    if pool_only(drop_dir):  # unlabelled images only (or nothing yet): no labelled candidates, no error
        return DropListing(candidates=_frame([], drop_dir.name), rejects=[])
    if fmt == "auto":
        fmt = detect_format(drop_dir, names)
    readers = {
        "labels_csv": _read_labels_csv,
        "imagefolder": _read_imagefolder,
        "hf_parquet": _read_hf_parquet,
    }
    if fmt in ("yolo", "coco"):
        from roadwork_core.data import detection_drops

        reader = detection_drops.read_yolo if fmt == "yolo" else detection_drops.read_coco
        rows, rejects = reader(drop_dir, box_classes)
        if fmt == "coco" and not rows and not rejects:
            raise ValueError(
                f"{drop_dir}: no COCO json with images found (looked at *.json and annotations/*.json)"
            )
        return DropListing(candidates=_frame(rows, drop_dir.name, drop_dir), rejects=rejects)
    if fmt not in readers:
        raise ValueError(f"unknown drop format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}")
    rows, rejects = readers[fmt](drop_dir, names)
    return DropListing(candidates=_frame(rows, drop_dir.name, drop_dir), rejects=rejects)


def list_unlabelled(drop_dir: Path) -> list[str]:
    """Absolute paths of the images in `drop_dir/unlabelled/` (for self-supervised pretraining), sorted.

    Symlinks that resolve outside the drop are left out.
    """
    drop_dir = Path(drop_dir)
    folder = drop_dir / UNLABELLED
    if not folder.is_dir():
        return []
    root = drop_dir.resolve()
    out = []
    for path in _walk_files(folder):
        real = _real(path)
        if real is not None and _inside(real, root):  # a symlink loop or one leaving the drop: left out
            out.append(str(path.absolute()))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Readers: each returns (rows, rejects); a row is a dict with uri, file, label_raw and metadata.


def _read_labels_csv(drop_dir: Path, class_names: dict[str, int]) -> tuple[list[dict], list[Reject]]:
    csv_path = drop_dir / "labels.csv"
    try:
        data = csv_path.read_bytes()
        # UTF-8 (with or without a BOM), or UTF-16 with its BOM (Excel's "Unicode text" export)
        text = data.decode(_csv_encoding(data))
        text, sep = _excel_sep_line(text)
        sep = sep or _csv_separator(text)
        _check_field_counts(csv_path, text, sep)
        table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(
            f"{csv_path} is not a readable CSV ({exc}); write it as UTF-8 CSV with a header row "
            "`file,label,<metadata columns...>`"
        ) from exc
    table = table.fillna("")  # a row with fewer fields than the header: the missing cells are empty
    table.columns = [str(c).strip() for c in table.columns]
    # `File,Label` or `FILE,label` name the same columns; the metadata columns keep their spelling
    table = table.rename(columns={c: c.lower() for c in table.columns if c.lower() in ("file", "label")})
    _require_unique_columns(csv_path, text, sep)
    missing = [c for c in ("file", "label") if c not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path} lacks column(s) {missing} (found {list(table.columns)}); the header must start "
            "with `file,label` where file is relative to the drop folder and label is 0/1 or a class name"
        )
    meta_cols = [c for c in table.columns if c not in ("file", "label")]
    rows, rejects = [], []
    root = drop_dir.resolve()
    entries, listings = [], {}
    for n, rec in enumerate(table.to_dict("records"), start=1):
        rel = _csv_entry(drop_dir, rec["file"], listings)
        entries.append(rel)
        if not rel:
            where = f"labels.csv row {n}"
            rejects.append(
                Reject(where, "unreadable", f"{where} (label {rec['label']!r}) has an empty file entry")
            )
            continue
        target, reject = _safe_path(drop_dir, root, rel)
        if reject is not None:
            rejects.append(reject)
            continue
        row = {"uri": str(target), "file": rel, "label_raw": rec["label"].strip()}
        row.update({c: rec[c] for c in meta_cols})
        rows.append(row)
    unlisted = _unlisted_images(drop_dir, [Path(r["uri"]) for r in rows], entries)
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        rejects.append(
            Reject(
                "labels.csv",
                "not_in_labels_csv",
                f"{len(unlisted)} image file(s) in the drop are not listed in labels.csv and were left out "
                f"(labels.csv alone decides which images a drop holds): {shown}; add a row for each, or move "
                f"them to {UNLABELLED}/ (unlabelled images) or out of the drop",
            )
        )
    return rows, rejects


def _unlisted_images(drop_dir: Path, accepted: list[Path], entries: list[str]) -> list[str]:
    """Image files of the drop (outside `unlabelled/`) that no csv entry names (rejected entries too)
    and no accepted entry resolves to, relative to the drop."""
    real = {_real(p) for p in accepted}
    base = drop_dir.absolute()
    named = {os.path.normpath(base / e) for e in entries if e}
    return [
        p.relative_to(drop_dir).as_posix()
        for p in _images_outside(drop_dir, skip_top={UNLABELLED})
        if os.path.normpath(p.absolute()) not in named and (_real(p) is None or _real(p) not in real)
    ]


def _class_key(name: str) -> str:
    """Folder / class name as matched: case-insensitive, '-' and ' ' read as '_'."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _class_folders(drop_dir: Path, class_names: dict[str, int]) -> list[tuple[Path, str]]:
    """(folder, class name) for each top-level folder of the drop whose name matches a class name."""
    keys = {_class_key(n): n for n in class_names}
    try:
        entries = sorted(drop_dir.iterdir())
    except OSError:
        return []
    return [
        (p, keys[_class_key(p.name)])
        for p in entries
        if _class_key(p.name) in keys and not is_junk(p.name, True) and p.is_dir()
    ]


def _csv_encoding(data: bytes) -> str:
    """UTF-8 (with or without a BOM), or UTF-16 with its BOM (Excel's "Unicode text" export) or without
    one (then told by the zero high bytes of an ASCII header: `f\\0i\\0` is little-endian)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    if len(data) >= 4 and data[1] == 0 and data[3] == 0 and data[0] and data[2]:
        return "utf-16-le"
    if len(data) >= 4 and data[0] == 0 and data[2] == 0 and data[1] and data[3]:
        return "utf-16-be"
    return "utf-8-sig"


def _excel_sep_line(text: str) -> tuple[str, str | None]:
    """Excel's `sep=;` first line (it writes one to say which separator follows): (text with that line
    blanked, so line numbers stay, the separator), or (text, None) without one."""
    first, newline, rest = text.partition("\n")
    stripped = first.strip().strip('"')
    if len(stripped) == 5 and stripped.lower().startswith("sep="):
        return newline + rest, stripped[4]
    return text, None


def _require_unique_columns(csv_path: Path, text: str, sep: str) -> None:
    """Raise when two header fields name `file` or `label` (in any case): pandas would keep the last, so a
    metadata column called `Label` would silently replace the labels."""
    header = next((r for r in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if r), [])
    names = [f.strip() for f in header]
    repeated = sorted({n for n in names if n and names.count(n) > 1 and n.lower() not in ("file", "label")})
    if repeated:
        shown = ", ".join(
            f"{n!r} (columns {', '.join(str(i + 1) for i, f in enumerate(names) if f == n)})"
            for n in repeated
        )
        raise ValueError(
            f"{csv_path} names a column more than once (spaces around a name ignored): {shown}; only one "
            "would be kept. Rename or remove the others"
        )
    for name in ("file", "label"):
        same = [f"{f.strip()!r} (column {i + 1})" for i, f in enumerate(header) if f.strip().lower() == name]
        if len(same) > 1:
            raise ValueError(
                f"{csv_path} has {len(same)} columns named {name} (upper/lower case ignored): {', '.join(same)}; "
                f"keep one `{name}` column and rename the other (e.g. {name}_source), so it is kept as metadata"
            )


def _csv_separator(text: str) -> str:
    """',' unless the header read with commas is one column holding ';' or a tab (European Excel, TSV)."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    fields = next(csv.reader([header]), [])
    if len(fields) == 1:
        for sep in (";", "\t"):
            if sep in fields[0]:
                return sep
    return ","


def _check_field_counts(csv_path: Path, text: str, sep: str) -> None:
    """Raise on a row with more (non-empty) fields than the header, naming its line: pandas would
    otherwise take the first column for an index and shift every row's values."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header, bad, line = None, [], 0
    for record in reader:
        start, line = line + 1, reader.line_num
        if not record:
            continue
        if header is None:
            header = record
        elif len(record) > len(header) and any(f.strip() for f in record[len(header) :]):
            bad.append((start, record))
    if bad:
        shown = "; ".join(f"line {n}: {sep.join(r)!r} ({len(r)} fields)" for n, r in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        name = {",": "comma", ";": "semicolon", "\t": "tab"}[sep]
        raise ValueError(
            f"{csv_path} is not a readable CSV: the header has {len(header)} fields ({sep.join(header)!r}) but "
            f'{shown}{more}. Quote a value that contains the separator ({name}), e.g. "a{sep} b", or '
            "remove the extra fields"
        )


def _csv_entry(drop_dir: Path, raw: str, listings: dict[Path, dict[str, str]]) -> str:
    """A labels.csv `file` cell -> the entry as it names a file on disk.

    Surrounding spaces are stripped unless the file with them exists; backslashes (Windows) become '/'
    unless the name with them exists; a name that differs from the one on disk only by its Unicode
    normalization (NFC vs the NFD macOS writes) is matched to it. Only paths inside the drop are looked
    up; anything else, or an entry still missing, is returned for `_safe_path` and the image table to
    report as before.
    """

    def exists(rel: str) -> bool:
        return _lexically_inside(drop_dir, rel) and os.path.lexists(drop_dir / rel)

    rel = raw if raw == raw.strip() and raw else raw.strip()
    if rel != raw and exists(raw):
        rel = raw
    if "\\" in rel and not exists(rel):
        rel = rel.replace("\\", "/")
    if rel and not exists(rel) and _lexically_inside(drop_dir, rel):
        rel = _unicode_match(drop_dir, rel, listings) or rel
    return rel


def _lexically_inside(drop_dir: Path, rel: str) -> bool:
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return False
    base = drop_dir.absolute()
    return _inside(Path(os.path.normpath(base / rel)), base)


def _unicode_match(drop_dir: Path, rel: str, listings: dict[Path, dict[str, str]]) -> str | None:
    """`rel` with each component replaced by the name on disk that equals it under NFC, or else by the one
    name on disk that equals it ignoring upper/lower case (a csv written on Windows or macOS, whose disks
    ignore case, naming `IMG_1.JPG` for `img_1.jpg`), or None."""
    current, parts = drop_dir, []
    for part in Path(os.path.normpath(rel)).parts:
        if not os.path.lexists(current / part):
            if current not in listings:
                try:
                    names = os.listdir(current)
                except OSError:
                    return None
                by_case: dict[str, list[str]] = {}
                for n in names:
                    by_case.setdefault("\0" + unicodedata.normalize("NFC", n).casefold(), []).append(n)
                listings[current] = {unicodedata.normalize("NFC", n): n for n in names} | {
                    k: v[0]
                    for k, v in by_case.items()
                    if len(v) == 1  # only an unambiguous match
                }
            key = unicodedata.normalize("NFC", part)
            part = listings[current].get(key) or listings[current].get("\0" + key.casefold())
            if part is None:
                return None
        parts.append(part)
        current = current / part
    return "/".join(parts)


def _read_imagefolder(drop_dir: Path, class_names: dict[str, int]) -> tuple[list[dict], list[Reject]]:
    rows, rejects = [], []
    root = drop_dir.resolve()
    folders = _class_folders(drop_dir, class_names)
    not_images: list[str] = []
    for folder, name in folders:
        links_out: list[Path] = []
        for path in _walk_files(folder, follow_inside=root, links_outside=links_out):
            rel = path.relative_to(drop_dir).as_posix()
            unusual = bool(path.suffix) and path.suffix.lower() not in IMAGE_SUFFIXES
            target, reject = _safe_path(drop_dir, root, rel)
            if unusual and (reject is not None or not _image_content(target)):
                not_images.append(rel)  # a phone's or a photo export's sidecar (.AAE, .json, .xmp), a video
                continue
            if reject is not None:
                rejects.append(reject)
                continue
            rows.append({"uri": str(target), "file": rel, "label_raw": name})
        for link in links_out:
            rejects.append(
                Reject(
                    link.relative_to(drop_dir).as_posix(),
                    "symlink_outside",
                    f"a symlinked folder points to {link.resolve()}, outside the drop folder; its files are "
                    "not read: copy them into the drop instead",
                )
            )
    if not_images:
        shown = ", ".join(not_images[:5]) + (
            f" and {len(not_images) - 5} more" if len(not_images) > 5 else ""
        )
        rejects.append(
            Reject(
                "(class folders)",
                NOT_AN_IMAGE_FILE,
                f"{len(not_images)} file(s) in the class folders are not images, by their suffix and content "
                f"(sidecars such as .AAE / .json / .xmp, videos, notes), and were left out: {shown}. Nothing to do "
                f"unless one is an image in a format Pillow cannot identify: convert it to JPEG or PNG",
            )
        )
    claimed = {_real(Path(r["uri"])) for r in rows}
    accepted = ", ".join(f"{n}/" for n in sorted(class_names))
    used = {f.name for f, _ in folders}
    for path in _images_outside(drop_dir, skip_top=used | {UNLABELLED}):
        if _real(path) in claimed - {None}:  # reached through a followed symlink inside a class folder
            continue
        rel = path.relative_to(drop_dir)
        where = (
            f"in folder '{rel.parts[0]}/', which is not a class folder{_near_class(rel.parts[0], class_names)}"
            if len(rel.parts) > 1
            else "at the top of the drop, outside every class folder"
        )
        rejects.append(
            Reject(
                rel.as_posix(),
                "no_class_folder",
                f"{where}; an ImageFolder drop takes images under {accepted} (names match case-insensitively, "
                f"'-' or ' ' for '_') and unlabelled ones under {UNLABELLED}/; move it into one of them or "
                "delete it",
            )
        )
    return rows, rejects


def _near_class(folder: str, class_names: dict[str, int]) -> str:
    """' (rename it to no_roadwork/?)' when the folder name only lacks the separators of a class name."""
    squash = _class_key(folder).replace("_", "")
    near = [n for n in sorted(class_names) if _class_key(n).replace("_", "") == squash]
    return f" (rename it to {near[0]}/?)" if near else ""


def _images_outside(drop_dir: Path, skip_top: set[str]) -> list[Path]:
    """Image files (by suffix) in the drop outside the top-level entries named in `skip_top`; OS junk
    skipped, symlinked folders not followed."""
    out = []
    for path in _walk_files(drop_dir):
        rel = path.relative_to(drop_dir)
        if len(rel.parts) > 1 and rel.parts[0] in skip_top:
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.append(path)
    return out


def _read_hf_parquet(drop_dir: Path, class_names: dict[str, int]) -> tuple[list[dict], list[Reject]]:
    rows, rejects = [], []
    root = drop_dir.resolve()
    for path in _parquet_files(drop_dir):
        rel = path.relative_to(drop_dir).as_posix()
        _, reject = _safe_path(drop_dir, root, rel)
        if reject is not None:
            rejects.append(reject)
            continue
        try:
            pfile = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(
                f"{path} is not a readable parquet file ({exc}); replace or remove it from the drop"
            ) from exc
        names = pfile.schema_arrow.names
        if "image" not in names or "label" not in names:
            raise ValueError(
                f"{path} has columns {names}; a Hugging Face image-classification shard needs an `image` "
                "column of {bytes, path} structs and a `label` column"
            )
        image_type = pfile.schema_arrow.field("image").type
        if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
            raise ValueError(
                f"{path}: column `image` has type {image_type}; expected a struct<bytes: binary, path: string> "
                "(the Hugging Face `Image` feature). Re-export the shard with datasets' Image() feature"
            )
        label_names = _hf_label_names(pfile)
        meta_cols = [c for c in names if c not in ("image", "label")]
        offset = 0
        for group in range(pfile.num_row_groups):
            table = pfile.read_row_group(group)
            has_bytes = table.column("image").combine_chunks().field("bytes").is_valid().to_pylist()
            labels = table.column("label").to_pylist()
            meta = {c: _flatten_column(table.column(c).to_pylist(), c) for c in meta_cols}
            for i in range(table.num_rows):
                file = f"{rel}{ROW_SEP}{offset + i}"
                if not has_bytes[i]:
                    rejects.append(Reject(file, "unreadable", "the image struct holds no embedded bytes"))
                    continue
                label = labels[i]
                if label_names is not None and isinstance(label, int) and 0 <= label < len(label_names):
                    label = label_names[label]  # ClassLabel index -> its name, mapped via class_names later
                row = {"uri": f"{path.absolute()}{ROW_SEP}{offset + i}", "file": file, "label_raw": label}
                for flat in meta.values():
                    row.update(flat[i])
                rows.append(row)
            offset += table.num_rows
    return rows, rejects


def _hf_label_names(pfile: pq.ParquetFile) -> list[str] | None:
    """Names of a `ClassLabel` label feature from the Hugging Face schema metadata, if present."""
    raw = (pfile.schema_arrow.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"]["label"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(n) for n in feature["names"]]
    return None


def _flatten_column(values: list, name: str) -> list[dict[str, str]]:
    return [_flatten(v, name) for v in values]


def _flatten(value, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    if value is None:
        return {prefix: ""}
    if isinstance(value, list | tuple):
        return {prefix: json.dumps(value, default=str)}
    return {prefix: str(value)}


# ---------------------------------------------------------------------------------------------
# Helpers


def _frame(rows: list[dict], source: str, drop_dir: Path | None = None) -> pd.DataFrame:
    meta_cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in BASE_COLUMNS and key not in meta_cols:
                meta_cols.append(key)
    renamed = {c: _metadata_name(c) for c in meta_cols}
    _require_distinct_metadata(renamed, drop_dir or source)
    frame = pd.DataFrame(rows, columns=BASE_COLUMNS[:3] + meta_cols)
    frame = frame.rename(columns=renamed)
    frame.insert(3, "source", source)
    for col in renamed.values():
        frame[col] = frame[col].fillna("").astype(str)
    frame["uri"] = frame["uri"].astype(str)
    frame["file"] = frame["file"].astype(str)
    frame["label_raw"] = frame["label_raw"].astype(object)
    return frame


def _image_content(path: Path) -> bool:
    """Whether Pillow identifies the file as an image from its header (nothing decoded): an image whose
    suffix is not a usual one (.ppm, .tga, .jp2, `photo.JPG~`, `x.jpg_large`) is an image of the drop, as it
    is when labels.csv lists it; it was left out as a sidecar, and a whole class could vanish unnoticed."""
    import stat

    from PIL import Image

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a named pipe would block the read for ever
            return False
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image; the image table rejects it with the reason
    except Exception:  # noqa: BLE001 - Pillow raises many types for a file that is no image it knows
        return False


def _metadata_name(column: str) -> str:
    """A metadata column's name in the image table: `meta.<name>` for a name the pipeline defines, matched
    the way people spell headers (`Group_ID`, `group id` and `GROUP-ID` are `meta.group_id`, the default
    group column: a case-sensitive match left frames of one video spread over the splits); else as is."""
    key = re.sub(r"[\s\-]+", "_", column.strip().lower())
    return f"meta.{key}" if key in RESERVED else column


def _require_distinct_metadata(renamed: dict[str, str], where: Path | str) -> None:
    """Raise when two metadata columns would share a name in the image table: a column named like one the
    pipeline defines is kept as `meta.<name>`, which a drop may also hold already (a csv with `split` and
    `meta.split`, a parquet struct `meta` with a field `split` beside a `split` column)."""
    by_name: dict[str, list[str]] = {}
    for original, name in renamed.items():
        by_name.setdefault(name, []).append(original)
    clashes = {name: cols for name, cols in by_name.items() if len(cols) > 1}
    if clashes:
        shown = "; ".join(
            f"{' and '.join(repr(c) for c in cols)} would both be {name!r}" for name, cols in clashes.items()
        )
        raise ValueError(
            f"{where}: metadata columns clash: {shown} (a column named like one the pipeline defines, "
            f"{sorted({name.removeprefix('meta.') for name in clashes} & RESERVED)}, is kept as `meta.<name>`). "
            "Rename one of them in the drop"
        )


def _safe_path(drop_dir: Path, root: Path, rel: str) -> tuple[Path | None, Reject | None]:
    """Resolve `rel` under the drop; reject absolute paths, `..` escapes and symlinks leaving the drop."""
    if not rel:
        return None, Reject(rel, "unreadable", "empty file entry")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return None, Reject(
            rel, "path_escape", "absolute path; file entries must be relative to the drop folder"
        )
    lexical = Path(os.path.normpath(drop_dir.absolute() / rel))
    if not _inside(lexical, drop_dir.absolute()):
        return None, Reject(rel, "path_escape", f"resolves to {lexical}, outside the drop folder")
    real = _real(lexical)
    if real is None:
        return None, Reject(
            rel,
            "unreadable",
            "a symlink loop (the link leads back to itself); replace the link with the image file or remove it",
        )
    if not _inside(real, root):
        return None, Reject(rel, "symlink_outside", f"a symlink points to {real}, outside the drop folder")
    return lexical, None


def _real(path: Path) -> Path | None:
    """`path` with every symlink resolved, or None for a symlink loop (Python raises RuntimeError for one
    up to 3.12, OSError ELOOP after)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def is_junk(name: str, is_dir: bool) -> bool:
    """Hidden names and OS leftovers (Thumbs.db, desktop.ini, __MACOSX/, ...): never data."""
    return name.startswith(".") or name.lower() in (JUNK_DIRS if is_dir else JUNK_FILES)


def _walk_files(
    folder: Path, follow_inside: Path | None = None, links_outside: list[Path] | None = None
) -> list[Path]:
    """Files (and symlinks to them) below `folder`, each folder's files before its subfolders', by name;
    OS junk skipped.

    Symlinked folders are not followed, unless `follow_inside` is given: then those that resolve inside
    it are followed (each real folder once, never back into one being walked) and those that resolve
    outside it are appended to `links_outside` instead.
    """
    out: list[Path] = []
    visited: set[Path] = set()

    def walk(current: Path, stack: tuple[Path, ...]) -> None:
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a symlink; a broken one is listed as a file
            except OSError:
                is_dir = False
            if is_junk(entry.name, is_dir):
                continue
            path = current / entry.name
            if not is_dir:
                out.append(path)
            elif not entry.is_symlink():
                subdirs.append(path)
            elif follow_inside is not None:
                real = path.resolve()
                if not _inside(real, follow_inside):
                    if links_outside is not None:
                        links_outside.append(path)
                elif not any(_inside(s, real) for s in stack):  # not a way back up: no loops
                    subdirs.append(path)
        for sub in subdirs:
            real = sub.resolve()
            if real not in visited:
                visited.add(real)
                walk(sub, (*stack, real))

    start = Path(folder).resolve()
    visited.add(start)
    walk(Path(folder), (start,))
    return out


def _parquet_files(drop_dir: Path) -> list[Path]:
    return [p for p in _walk_files(drop_dir) if p.suffix == ".parquet"]


def _coco_files(drop_dir: Path) -> list[Path]:
    """COCO annotation files: every `annotations/*.json`, and top-level `*.json` files that mention
    `"images"` in their first MiB (so a stray metadata json at the top is not taken for one)."""
    out = [p for p in sorted((drop_dir / "annotations").glob("*.json")) if p.is_file()]
    for path in sorted(drop_dir.glob("*.json")):
        if path.is_file():
            with open(path, "rb") as f:
                if b'"images"' in f.read(1 << 20):
                    out.append(path)
    return out
