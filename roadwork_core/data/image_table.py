"""The image table: every accepted, unique image of a dataset version, with rejects and duplicates.

Each candidate from the drop readers is read, hashed (sha256 of the file bytes = `image_id`), fully
decoded (EXIF transpose, RGB), size-checked and perceptually hashed (`phash`, and `phash_dihedral`:
the phashes of its flips and quarter turns and of its content inside an added border, see neardup.py). Exact duplicates are collapsed
when their labels agree; when they disagree, the copy of the oldest drop is kept if that drop agrees
with itself and the later copies are rejected as `label_conflict`, else every copy is.
Reject codes: unreadable, truncated, too_large, too_small, bad_label, bad_filename (not UTF-8),
path_escape, symlink_outside, label_conflict (and the drop readers' own: no_class_folder, orphan_label, ...).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from roadwork_core.data.drops import (
    BASE_COLUMNS,
    DEFAULT_CLASS_NAMES,
    NOT_AN_IMAGE_FILE,
    ORPHAN_ANNOTATION,
    ORPHAN_LABEL,
    read_drop,
)
from roadwork_core.data.images import (
    ImageRejected,
    decode_image,
    printable_name,
    read_uri_bytes,
    split_uri,
    utf8_name,
)
from roadwork_core.data.neardup import dihedral_phashes
from roadwork_core.data.parallel import parallel_map

IMAGE_TABLE_COLUMNS = [
    "image_id",
    "uri",
    "file",
    "label",
    "phash",
    "phash_dihedral",
    "width",
    "height",
    "source",
]
REJECT_COLUMNS = ["file", "source", "reason", "detail"]
# reject rows that count no candidate (so not toward max_reject_fraction): one row per labels.csv drop
# summing up the image files on disk that the csv does not list, one per ImageFolder drop for files that are
# not images by their suffix, and label files / annotations of a detection drop that belong to no image
NOTICE_REASONS = frozenset({"not_in_labels_csv", NOT_AN_IMAGE_FILE, ORPHAN_LABEL, ORPHAN_ANNOTATION})
DUPLICATE_COLUMNS = ["image_id", "kept_file", "kept_source", "dropped_file", "dropped_source", "conflict"]


class TooManyRejects(ValueError):
    """More candidates were rejected than `max_reject_fraction` allows. `rejects` holds every reject row
    (REJECT_COLUMNS), so a caller can store them all: the message names only the first few."""

    def __init__(self, message: str, rejects: pd.DataFrame | None = None):
        super().__init__(message)
        self.rejects = rejects if rejects is not None else pd.DataFrame(columns=REJECT_COLUMNS)


@dataclass
class ImageTableResult:
    images: pd.DataFrame  # IMAGE_TABLE_COLUMNS + metadata columns (str), sorted by image_id
    rejects: pd.DataFrame  # REJECT_COLUMNS
    duplicates: pd.DataFrame  # DUPLICATE_COLUMNS
    n_candidates: int  # rows listed by the readers, accepted or not (notices like not_in_labels_csv excluded)
    n_reused: int = 0  # candidates whose facts came from `known` instead of being decoded and hashed again


_TEXT_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def parse_label(raw: object, class_names: dict[str, int]) -> int | None:
    """0/1 (int, bool, 0.0/1.0, or the strings "0", "1", "0.0", "1.0", "true", "false"), or a known class
    name (case and surrounding spaces ignored, "-" and " " read as "_") -> 0/1; anything else -> None.

    The same rules for every drop format: a labels.csv cell is always a string, a parquet label may be a
    bool, an int or a float."""
    if isinstance(raw, bool | np.bool_):
        return int(raw)
    if isinstance(raw, int | np.integer):
        return int(raw) if raw in (0, 1) else None
    if isinstance(raw, float | np.floating):
        return int(raw) if raw in (0.0, 1.0) else None
    if isinstance(raw, str):
        text = raw.strip()
        if text in class_names:
            value = class_names[text]
            return value if value in (0, 1) else None
        if text.lower() in _TEXT_LABELS:
            return _TEXT_LABELS[text.lower()]
        folded = {_fold(name): value for name, value in class_names.items()}
        value = folded.get(_fold(text))
        return value if value in (0, 1) else None
    return None


def _fold(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _inspect(uri: str, file: str, min_size: int) -> tuple[dict | None, tuple[str, str] | None]:
    """Read, hash and decode one image -> (facts, None) or (None, (reason, detail)). Runs in a thread."""
    try:
        data = read_uri_bytes(uri)
    except FileNotFoundError:
        return None, ("unreadable", "file does not exist; fix the file entry or add the file")
    except IsADirectoryError:
        return None, ("unreadable", "is a directory, not an image file")
    except PermissionError:
        return None, (
            "unreadable",
            "permission denied; make the file readable by the user the pipeline runs as",
        )
    except ImageRejected as exc:
        return None, (exc.reason, exc.detail)
    except (OSError, IndexError, ValueError) as exc:
        return None, ("unreadable", f"{type(exc).__name__}: {exc}")
    try:
        img = decode_image(data, source=file)
    except ImageRejected as exc:
        return None, (exc.reason, exc.detail)
    w, h = img.size
    if min(w, h) < min_size:
        return None, ("too_small", f"{w}x{h} is below the minimum side of {min_size} px (min_size)")
    phash, phash_dihedral = dihedral_phashes(img)
    facts = {
        "image_id": hashlib.sha256(data).hexdigest(),
        "phash": phash,
        "phash_dihedral": phash_dihedral,
        "width": w,
        "height": h,
    }
    return facts, None


FACT_COLUMNS = ["image_id", "phash", "phash_dihedral", "width", "height"]
# the modules whose code decides an image's facts (decode, EXIF transpose, size, the perceptual hashes)
_FACT_MODULES = ("roadwork_core.data.images", "roadwork_core.data.neardup", "roadwork_core.data.image_table")


# the codecs and libraries Pillow decodes with: a distribution's Pillow can link system libraries that
# are upgraded apart from Pillow's own version
_PIL_FEATURES = ("jpg", "libjpeg_turbo", "zlib", "libtiff", "littlecms2", "webp", "jpg_2000", "avif")


def _module_code(name: str) -> bytes | None:
    """The source of module `name`, or its compiled code where only bytecode is installed; None when neither
    can be had (a frozen module)."""
    import importlib
    import inspect
    import marshal

    module = importlib.import_module(name)
    try:
        return inspect.getsource(module).encode()
    except (OSError, TypeError):
        loader = getattr(module.__spec__, "loader", None)
        try:
            code = loader.get_code(name) if loader is not None and hasattr(loader, "get_code") else None
        except (ImportError, OSError):
            code = None
        return marshal.dumps(code) if code is not None else None


@functools.cache
def facts_version() -> str | None:
    """A fingerprint of everything that computes an image's facts (`FACT_COLUMNS`): the code of the modules
    that decode and hash, the versions of the imported Pillow, imagehash, numpy and scipy, and of the
    codecs Pillow decodes with. Facts an earlier table recorded are reused (`build_image_table(known=...)`)
    only under the same fingerprint, so an edit to the hashing or a library upgrade recomputes every image
    instead of mixing two kinds of hashes. None (nothing is reused) when the code cannot be read."""
    import imagehash
    import numpy
    import PIL
    import PIL.features
    import scipy

    digest = hashlib.sha256()
    for name in _FACT_MODULES:
        code = _module_code(name)
        if code is None:
            return None
        digest.update(name.encode() + b"\0" + code)
    for name, module in (("pillow", PIL), ("imagehash", imagehash), ("numpy", numpy), ("scipy", scipy)):
        digest.update(f"{name}={getattr(module, '__version__', '-')}\n".encode())
    for feature in _PIL_FEATURES:
        try:
            digest.update(f"{feature}={PIL.features.version(feature)}\n".encode())
        except ValueError:  # a feature this Pillow does not know
            digest.update(f"{feature}=?\n".encode())
    return digest.hexdigest()[:16]


def _content_id(uri: str) -> str | None:
    """sha256 of the file's bytes (the `image_id` `_inspect` would give it), None when it cannot be read:
    `_inspect` then reads it again and reports why."""
    try:
        return hashlib.sha256(read_uri_bytes(uri)).hexdigest()
    except Exception:  # noqa: BLE001 - any failure is reported by `_inspect`, which reads the file again
        return None


def _known_facts(known: pd.DataFrame | None) -> dict[str, tuple]:
    if known is None or not len(known) or not set(FACT_COLUMNS) <= set(known.columns):
        return {}
    frame = known[FACT_COLUMNS].drop_duplicates("image_id")
    return {row[0]: row[1:] for row in frame.itertuples(index=False, name=None)}


def _inspect_all(
    cands: pd.DataFrame, min_size: int, workers: int | None, known: dict[str, tuple]
) -> tuple[list, int]:
    """`_inspect` of every candidate -> (results, how many came from `known`). A file whose bytes hash to an
    image_id in `known` (the facts an earlier table recorded under the same `facts_version`) is not decoded
    and hashed again: the facts are a function of the bytes. Only its size is checked against `min_size`."""
    results: list = [None] * len(cands)
    todo = list(range(len(cands)))
    if known:
        # threads for files; rows of a parquet file in one ordered pass, which reads each row group once
        rows = any(split_uri(uri)[1] is not None for uri in cands["uri"])
        ids = parallel_map(
            _content_id, cands["uri"], workers=1 if rows else workers, min_for_processes=len(cands) + 1
        )
        todo = []
        for i, image_id in enumerate(ids):
            facts = known.get(image_id) if image_id is not None else None
            if facts is None:
                todo.append(i)
                continue
            phash, dihedral, w, h = facts
            if min(int(w), int(h)) < min_size:
                results[i] = (
                    None,
                    ("too_small", f"{w}x{h} is below the minimum side of {min_size} px (min_size)"),
                )
            else:
                results[i] = ({"image_id": image_id, "phash": phash, "phash_dihedral": dihedral,
                               "width": int(w), "height": int(h)}, None)  # fmt: skip
    # large drops on one process per core (the per-image work holds the GIL too often for threads to scale)
    fresh = parallel_map(
        _inspect,
        [cands.at[i, "uri"] for i in todo],
        [cands.at[i, "file"] for i in todo],
        [min_size] * len(todo),
        workers=workers,
    )
    for i, result in zip(todo, fresh, strict=True):
        results[i] = result
    return results, len(cands) - len(todo)


def build_image_table(
    drop_dirs: list[Path],
    *,
    fmt: str = "auto",
    class_names: dict[str, int] | None = None,
    box_classes: list[str] | None = None,
    min_size: int = 32,
    max_reject_fraction: float = 0.05,
    workers: int | None = None,
    known: pd.DataFrame | None = None,
) -> ImageTableResult:
    """Union of the drops (oldest first), validated and de-duplicated; see the module docstring.

    `known`: rows of earlier image tables (`FACT_COLUMNS` at least) whose facts were computed under this
    `facts_version()`; an image whose bytes match one of them is not decoded and hashed again
    (`ImageTableResult.n_reused`). The table is the same either way.
    Raises `TooManyRejects` when rejects / candidates > `max_reject_fraction`.
    """
    names = class_names or DEFAULT_CLASS_NAMES
    frames, rejects = [], []
    if box_classes:  # names no detection drop of the version defines are refused before anything is read
        from roadwork_core.data.detection_drops import check_box_classes
        from roadwork_core.data.drops import detect_format

        formats = [(Path(d), fmt if fmt != "auto" else detect_format(Path(d), names)) for d in drop_dirs]
        check_box_classes(box_classes, [(d, f) for d, f in formats if f in ("yolo", "coco")])
    for drop in drop_dirs:
        listing = read_drop(Path(drop), fmt=fmt, class_names=names, box_classes=box_classes)
        frames.append(listing.candidates)
        rejects += [
            {"file": r.file, "source": Path(drop).name, "reason": r.reason, "detail": r.detail}
            for r in listing.rejects
        ]
    cands = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BASE_COLUMNS)
    notices = [r for r in rejects if r["reason"] in NOTICE_REASONS]
    n_candidates = len(cands) + len(rejects) - len(notices)
    if n_candidates == 0:
        raise ValueError(
            f"no images found in drops {[str(d) for d in drop_dirs]}; check the folders and the format"
            + "".join(f". {r['source']}/{r['file']}: {r['detail']}" for r in notices)
        )
    meta_cols = [c for c in cands.columns if c not in BASE_COLUMNS]
    for col in meta_cols:  # a column missing from some drops is "" there
        cands[col] = cands[col].fillna("").astype(str)

    # names first: a path that is not UTF-8 cannot be written to any table (parquet, the event log)
    bad_name = (
        ~(cands["uri"].map(utf8_name) & cands["file"].map(utf8_name)) if len(cands) else cands["uri"].isna()
    )
    for row in cands[bad_name].itertuples(index=False):
        rejects.append({"file": row.file, "source": row.source, "reason": "bad_filename",
                        "detail": f"the file name '{printable_name(row.file)}' is not UTF-8 (an archive from a "
                                  "system with another encoding?); rename it in UTF-8, e.g. `convmv -f latin1 -t "
                                  "utf8 --notest -r <drop>`"})  # fmt: skip
    cands = cands[~bad_name].reset_index(drop=True)

    # labels next: cheap, and a bad label is reported whether or not the image decodes
    cands["label"] = [parse_label(v, names) for v in cands["label_raw"]]
    bad = cands["label"].isna()
    for row in cands[bad].itertuples(index=False):
        rejects.append({"file": row.file, "source": row.source, "reason": "bad_label",
                        "detail": f"label {row.label_raw!r} is not 0/1 or one of {sorted(names)}"})  # fmt: skip
    cands = cands[~bad].reset_index(drop=True)

    results, n_reused = _inspect_all(cands, min_size, workers, _known_facts(known))
    keep = []
    for i, (_facts, reject) in enumerate(results):
        if reject is not None:
            rejects.append({"file": cands.at[i, "file"], "source": cands.at[i, "source"], "reason": reject[0], "detail": reject[1]})  # fmt: skip
        else:
            keep.append(i)
    facts_frame = pd.DataFrame([results[i][0] for i in keep], columns=FACT_COLUMNS)
    good = pd.concat([cands.loc[keep].reset_index(drop=True), facts_frame], axis=1)

    images, duplicates, conflict_rejects = _collapse_duplicates(good)
    rejects += conflict_rejects
    images["label"] = images["label"].astype(int)
    images[["width", "height"]] = images[["width", "height"]].astype(int)
    images = (
        images[IMAGE_TABLE_COLUMNS + meta_cols].sort_values("image_id", kind="stable").reset_index(drop=True)
    )
    reject_frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    for col in ("file", "detail"):  # a reader's reject may name a file whose name is not UTF-8
        reject_frame[col] = reject_frame[col].astype(str).map(printable_name)

    # a summary row about files a labels.csv leaves out is a notice, not a rejected candidate
    counted = reject_frame[~reject_frame["reason"].isin(NOTICE_REASONS)]
    fraction = len(counted) / n_candidates
    if fraction > max_reject_fraction:
        raise TooManyRejects(
            _too_many_message(counted, n_candidates, fraction, max_reject_fraction), rejects=reject_frame
        )
    return ImageTableResult(images, reject_frame, duplicates, n_candidates, n_reused)


def _conflict_detail(row: pd.Series, group: pd.DataFrame, idx) -> str:
    """Why `row` (a copy in a group of identical bytes whose labels disagree) is rejected."""
    same_entry = group[(group["file"] == row["file"]) & (group["source"] == row["source"])]
    if len(same_entry) > 1:
        return (
            f"{row['file']} is listed {len(same_entry)} times in {row['source']} with labels "
            f"{sorted(set(same_entry['label'].astype(int).tolist()))}; keep one entry with the right label"
        )
    others = [f"{r.source}/{r.file} (label {int(r.label)})" for r in group.itertuples() if r.Index != idx]
    return f"identical bytes with a different label at {others}; keep one copy with the right label"


def _collapse_duplicates(good: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Keep the first copy (oldest drop, listing order) of each image_id.

    Copies whose labels disagree: when the oldest drop holding the image gives it one label, that copy is
    kept (the image keeps its label and its split, version after version) and only the later copies with
    another label are rejected as `label_conflict`; when the oldest drop itself disagrees, every copy is."""
    dup_rows, rejects, drop_index = [], [], []
    for image_id, group in good[good.duplicated("image_id", keep=False)].groupby("image_id", sort=True):
        first = group.iloc[0]
        oldest = group[group["source"] == first["source"]]
        settled = oldest["label"].nunique() == 1  # the oldest drop agrees with itself
        for idx, row in group.iterrows():
            if idx == group.index[0] and settled:
                continue  # the copy that is kept
            if settled:
                conflict = row["label"] != first["label"]
                detail = (
                    f"identical bytes to {first['source']}/{first['file']}, labelled {int(first['label'])} since "
                    f"{first['source']}; this copy says {int(row['label'])}. The earlier label is kept (the image "
                    f"keeps its split); fix or remove this copy"
                )
            else:
                conflict, detail = True, _conflict_detail(row, group, idx)
            drop_index.append(idx)
            if conflict:
                rejects.append({"file": row["file"], "source": row["source"], "reason": "label_conflict",
                                "detail": detail})  # fmt: skip
            dup_rows.append({
                "image_id": image_id,
                "kept_file": first["file"] if settled else "",
                "kept_source": first["source"] if settled else "",
                "dropped_file": row["file"],
                "dropped_source": row["source"],
                "conflict": bool(conflict),
            })  # fmt: skip
    images = good.drop(index=drop_index).reset_index(drop=True)
    return images, pd.DataFrame(dup_rows, columns=DUPLICATE_COLUMNS), rejects


def _too_many_message(rejects: pd.DataFrame, n: int, fraction: float, limit: float) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in rejects["reason"].value_counts().items())
    first = "\n".join(
        f"  {r.source}/{r.file}: {r.reason}" + (f" ({r.detail})" if r.detail else "")
        for r in rejects.head(5).itertuples()
    )
    return (
        f"{len(rejects)} of {n} images rejected ({fraction:.1%}), above the limit of {limit:.1%} "
        f"(max_reject_fraction={limit}). By reason: {counts}. First rejects:\n{first}\n"
        "Fix or remove these files, or raise max_reject_fraction if this share of bad files is expected."
    )
