"""Drop readers for detection labels: YOLO folders and COCO json (see `roadwork_core.data.drops`).

Public roadwork / traffic-cone sets mostly ship boxes, not image labels. An image is roadwork when
it holds at least one box of the configured classes (default: any box); no box (an empty or missing
YOLO label file, a COCO image without annotations) is no_roadwork. The centre of the largest such
box is kept as `mask_x`, `mask_y` (pixels): the object point the validator keeps inside its crop.

The mask point is given on the image as training sees it: EXIF orientation applied
(`roadwork_core.data.images.decode_image`). YOLO coordinates are read as Ultralytics does: normalized
to the EXIF-oriented image (its `exif_size`; OpenCV's `imread` rotates too), so they are scaled by the
displayed size. COCO boxes are in pixels; when an image's EXIF orientation swaps its axes (5-8) and the
json `width`/`height` are the stored, not the displayed, size, the boxes were drawn on the stored pixel
grid and are mapped through the same transpose (orientations 2-4 cannot be told apart from the json:
their boxes are read as drawn on the displayed image, like every unrotated one).

A `labels/**/*.txt` file that matches no image is an `orphan_label` reject naming the image path it
would need (and a near match, e.g. `images/Train` vs `labels/train`); when label files exist but not
one matches an image, reading the drop fails: every image would otherwise be no_roadwork.

Each malformed label line or annotation rejects its image with reason `bad_label` and a detail that
names the label file, the line (or annotation id) and what is wrong; nothing is silently dropped.
Format facts: YOLO txt lines `class cx cy w h`, coordinates normalized to [0, 1] (Ultralytics docs,
"Object detection datasets"); polygons `class x1 y1 x2 y2 ...` (segmentation). COCO: `images`
(`id`, `file_name`, `width`, `height`), `annotations` (`image_id`, `category_id`, `bbox` =
[x, y, width, height] in pixels), `categories` (`id`, `name`) (cocodataset.org, "Data format").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from PIL import ExifTags, Image

from roadwork_core.data.drops import (
    ORPHAN_ANNOTATION,
    ORPHAN_LABEL,
    Reject,
    _coco_files,
    _safe_path,
    _walk_files,
)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (or normalized for YOLO)


class _BadLine(ValueError):
    pass


def defined_classes(drop_dir: Path, fmt: str) -> tuple[dict[str, str], bool]:
    """(class id -> name the detection drop defines, whether it leaves names undefined: a YOLO drop without
    data.yaml / classes.txt, whose boxes are matched by id only)."""
    drop_dir = Path(drop_dir)
    if fmt == "yolo":
        names = yolo_class_names(drop_dir)
        return ({str(i): n for i, n in enumerate(names)}, False) if names is not None else ({}, True)
    known: dict[str, str] = {}
    for path in _coco_files(drop_dir):
        for c in _load_coco(path).get("categories", []):
            if isinstance(c, dict) and _is_id(c.get("id")):
                known[str(c["id"])] = str(c.get("name", c["id"]))
    return known, False


def check_box_classes(box_classes, drops: list[tuple[Path, str]]) -> None:
    """Refuse `box_classes` entries that no detection drop of the version defines, as an id or a name (the
    union over its drops: a later drop may add a class). A misspelt name matched no box: its images became
    no_roadwork, with every check green. `drops`: (folder, format) of the version's detection drops."""
    if not box_classes or not drops:
        return
    known: dict[str, str] = {}
    ids_only = False
    for drop_dir, fmt in drops:
        classes, unnamed = defined_classes(drop_dir, fmt)
        known.update(classes)
        ids_only = ids_only or unnamed
    unknown = [
        c
        for c in box_classes
        if c not in known and c not in known.values() and not (ids_only and str(c).isdigit())
    ]
    if unknown:
        listed = ", ".join(f"{k} {v!r}" for k, v in sorted(known.items())) or "none (ids only)"
        raise ValueError(
            f"dataset.box_classes {unknown} name no class of the drops {[Path(d).name for d, _ in drops]} (their "
            f"classes: {listed}); their boxes would count for nothing and their images become no_roadwork. Use the "
            "class names or ids the drops define"
        )


def _label_row(uri: str, rel: str, boxes: list[tuple[str, str | None, Box]], box_classes) -> dict:
    """(class id, class name, box) list -> a candidate row with label_raw and the mask point."""
    wanted = set(box_classes or [])
    hits = [
        b for cid, name, b in boxes if not wanted or cid in wanted or (name is not None and name in wanted)
    ]
    row = {"uri": uri, "file": rel, "label_raw": "1" if hits else "0", "mask_x": "", "mask_y": ""}
    if hits:
        x0, y0, x1, y1 = max(hits, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        row["mask_x"], row["mask_y"] = str(round((x0 + x1) / 2)), str(round((y0 + y1) / 2))
    return row


def _header(path: Path) -> tuple[int, int, int]:
    """(stored width, stored height, EXIF orientation 1..8) from the image header; (0, 0, 1) if unreadable.

    A bad image is rejected later by the image table; here it only leaves the mask point unscaled.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
            except (OSError, ValueError, SyntaxError, KeyError, TypeError):
                orientation = 1
    except (OSError, ValueError, SyntaxError):
        return 0, 0, 1
    return w, h, orientation if orientation in range(1, 9) else 1


def _displayed_size(w: int, h: int, orientation: int) -> tuple[int, int]:
    """The size `ImageOps.exif_transpose` gives an image stored as w x h: orientations 5-8 swap the axes."""
    return (h, w) if orientation >= 5 else (w, h)


def _to_displayed(box: Box, w: float, h: float, orientation: int) -> Box:
    """A box on the stored w x h pixel grid -> the same box on the image as `ImageOps.exif_transpose`
    shows it (the transposes Pillow applies per EXIF orientation: 2 flip left-right, 3 rotate 180,
    4 flip top-bottom, 5 transpose, 6 rotate 270 (90 clockwise), 7 transverse, 8 rotate 90)."""

    def point(x: float, y: float) -> tuple[float, float]:
        return {
            2: (w - x, y),
            3: (w - x, h - y),
            4: (x, h - y),
            5: (y, x),
            6: (h - y, x),
            7: (h - y, w - x),
            8: (y, w - x),
        }.get(orientation, (x, y))

    (ax, ay), (bx, by) = point(box[0], box[1]), point(box[2], box[3])
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


# ---------------------------------------------------------------------------------------------
# YOLO


def yolo_class_names(drop_dir: Path) -> list[str] | None:
    """Class names by id from `data.yaml` (`names:` list or {id: name}) or `classes.txt`; None if neither."""
    data_yaml = drop_dir / "data.yaml"
    if data_yaml.is_file():
        try:
            doc = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{data_yaml} is not readable YAML ({exc}); fix it or remove it") from exc
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, list):
            return [str(n) for n in names]
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            return [str(names.get(i, i)) for i in range(max(names) + 1)] if names else []
        raise ValueError(
            f"{data_yaml}: `names` must be a list of class names or a mapping id -> name (got {names!r})"
        )
    classes_txt = drop_dir / "classes.txt"
    if classes_txt.is_file():
        lines = classes_txt.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        return [line.strip() for line in lines]
    return None


def _parse_yolo_line(line: str, names: list[str] | None) -> tuple[str, Box]:
    tokens = line.split()
    if len(tokens) < 5:
        raise _BadLine(f"expected `class cx cy w h` (5 fields), got {len(tokens)}")
    cls = tokens[0]
    if not cls.isdigit():
        raise _BadLine(f"class id {cls!r} is not a non-negative integer")
    if names is not None and int(cls) >= len(names):
        raise _BadLine(f"class id {cls} is not in the {len(names)} class names (ids 0..{len(names) - 1})")
    try:
        values = [float(t) for t in tokens[1:]]
    except ValueError:
        raise _BadLine("coordinates must be numbers") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise _BadLine("coordinates must be normalized to [0, 1]")
    if len(values) == 4:
        cx, cy, w, h = values
        if w <= 0 or h <= 0:
            raise _BadLine("box width and height must be > 0")
        return cls, (max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(1.0, cx + w / 2), min(1.0, cy + h / 2))
    if len(values) % 2 or len(values) < 6:
        raise _BadLine(f"a polygon needs an even number (>= 6) of coordinates, got {len(values)}")
    xs, ys = values[0::2], values[1::2]
    return cls, (min(xs), min(ys), max(xs), max(ys))


def read_yolo(drop_dir: Path, box_classes: list[str] | None) -> tuple[list[dict], list[Reject]]:
    drop_dir = Path(drop_dir)
    names = yolo_class_names(drop_dir)
    root = drop_dir.resolve()
    rows, rejects = [], []
    images = _walk_files(drop_dir / "images")
    used_labels: set[str] = set()
    for path in images:
        rel = path.relative_to(drop_dir).as_posix()
        target, reject = _safe_path(drop_dir, root, rel)
        label_rel = _yolo_label_rel(rel)
        used_labels.add(label_rel)
        if reject is not None:
            rejects.append(reject)
            continue
        label_path, reject = _safe_path(drop_dir, root, label_rel)
        if reject is not None:
            rejects.append(Reject(rel, "bad_label", f"{label_rel}: {reject.detail}"))
            continue
        boxes, bad = [], None
        if label_path.is_file():
            try:
                text = label_path.read_text(encoding="utf-8-sig")  # Windows Notepad writes a BOM
            except UnicodeDecodeError as exc:
                rejects.append(Reject(rel, "bad_label", f"{label_rel} is not UTF-8 text ({exc})"))
                continue
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    cls, box = _parse_yolo_line(line, names)
                except _BadLine as exc:
                    bad = f"{label_rel} line {n}: {line.strip()!r}: {exc}; fix or delete the line"
                    break
                boxes.append((cls, names[int(cls)] if names else None, box))
        if bad is not None:
            rejects.append(Reject(rel, "bad_label", bad))
            continue
        if boxes:  # normalized to the displayed (EXIF-oriented) image -> its pixels, for the mask point
            w, h = _displayed_size(*_header(target))
            boxes = [(c, nm, (b[0] * w, b[1] * h, b[2] * w, b[3] * h)) for c, nm, b in boxes]
        rows.append(_label_row(str(target), rel, boxes, box_classes))
    rejects += _orphan_labels(drop_dir, images, used_labels)
    return rows, rejects


def _yolo_label_rel(image_rel: str) -> str:
    """`images/a/b.jpg` -> `labels/a/b.txt`: the one label file YOLO pairs with an image."""
    return Path("labels", *Path(image_rel).parts[1:]).with_suffix(".txt").as_posix()


def _orphan_labels(drop_dir: Path, images: list[Path], used: set[str]) -> list[Reject]:
    """An `orphan_label` reject per `labels/**/*.txt` that no image pairs with, naming the likely cause.

    Raises when there are label files and not one of them pairs with an image.
    """
    labels = [p.relative_to(drop_dir).as_posix() for p in _walk_files(drop_dir / "labels")]
    labels = [r for r in labels if r.endswith(".txt") and Path(r).name != "classes.txt"]
    orphans = [r for r in labels if r not in used]
    if not orphans:
        return []
    image_rels = [p.relative_to(drop_dir).as_posix() for p in images]
    by_lower = {_yolo_label_rel(r).lower(): r for r in image_rels}
    by_stem: dict[str, list[str]] = {}
    for r in image_rels:
        by_stem.setdefault(Path(r).stem, []).append(r)
    rejects = []
    for label in orphans:
        wanted = Path("images", *Path(label).parts[1:]).with_suffix("").as_posix() + ".<ext>"
        near = by_lower.get(label.lower())
        if near is not None:
            cause = (
                f"the image {near} differs only in upper/lower case (its label file would be "
                f"{_yolo_label_rel(near)}); rename the folder or file so that images/ and labels/ match exactly"
            )
        elif Path(label).stem in by_stem:
            others = by_stem[Path(label).stem][:3]
            cause = (
                f"an image with the same name is at {', '.join(others)}, whose label file would be "
                f"{', '.join(_yolo_label_rel(o) for o in others)}; mirror the images/ folders under labels/"
            )
        else:
            cause = "no such image exists; add the image or delete the label file"
        rejects.append(
            Reject(
                label,
                ORPHAN_LABEL,
                f"label file matches no image: YOLO pairs it with {wanted}, but {cause}",
            )
        )
    if len(orphans) == len(labels):
        first = rejects[0]
        raise ValueError(
            f"{drop_dir}: none of the {len(labels)} label files under labels/ matches an image under images/, "
            f"so every image would be no_roadwork. YOLO pairs images/<path>/<name>.<ext> with "
            f"labels/<path>/<name>.txt (same folders, same case). First: {first.file}: {first.detail}"
        )
    return rejects


# ---------------------------------------------------------------------------------------------
# COCO


def _coco_bbox(ann: dict, size: tuple[float, float] | None) -> Box:
    bbox = ann.get("bbox")
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        raise _BadLine(f"bbox {bbox!r} is not [x, y, width, height] numbers")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0 or x < 0 or y < 0:
        raise _BadLine(f"bbox {bbox!r} needs x, y >= 0 and width, height > 0")
    if size is not None and (x + w > size[0] + 1 or y + h > size[1] + 1):
        raise _BadLine(f"bbox {bbox!r} reaches outside the {size[0]:g}x{size[1]:g} image")
    return x, y, x + w, y + h


def _load_coco(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); fix or remove it from the drop") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{path}: a COCO file needs an `images` list (and `annotations`, `categories`)")
    for key in ("annotations", "categories"):
        if not isinstance(doc.get(key, []), list):
            raise ValueError(f"{path}: `{key}` must be a list")
    for n, cat in enumerate(doc.get("categories", [])):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")):
            raise ValueError(
                f"{path}: categories[{n}] is {cat!r}; each category must be an object with an integer or string "
                '`id` and a `name`, e.g. {"id": 1, "name": "cone"}'
            )
    return doc


def _is_id(value: object) -> bool:
    """COCO ids are integers (strings are accepted); a list or an object cannot name anything."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def read_coco(drop_dir: Path, box_classes: list[str] | None) -> tuple[list[dict], list[Reject]]:
    """Every COCO json of the drop (`_coco_files`). An image listed by several (instances, keypoints,
    captions files of one export) is one candidate with the boxes of all of them; annotations without a
    `bbox` and a `category_id` (captions) are not detections and are skipped; annotations whose
    `image_id` is not in the file's images are one `orphan_annotation` notice per file."""
    drop_dir = Path(drop_dir)
    root = drop_dir.resolve()
    rejects: list[Reject] = []
    entries: dict[str, dict] = {}  # file entry -> target, boxes, first problem
    for path in _coco_files(drop_dir):
        json_rel = path.relative_to(drop_dir).as_posix()
        doc = _load_coco(path)
        categories = {c["id"]: str(c.get("name", c["id"])) for c in doc.get("categories", [])}
        images: dict = {}
        for img in doc["images"]:
            if (
                not isinstance(img, dict)
                or not _is_id(img.get("id"))
                or not isinstance(img.get("file_name"), str)
                or not img["file_name"].strip()
            ):
                rejects.append(
                    Reject(
                        f"{json_rel}#image",
                        "bad_label",
                        f"image entry {img!r} needs an integer or string `id` and a non-empty string `file_name`",
                    )
                )
                continue
            if img["id"] in images:
                raise ValueError(
                    f"{path}: image id {img['id']!r} appears twice; COCO image ids must be unique"
                )
            images[img["id"]] = img
        boxes: dict = {k: [] for k in images}
        bad: dict = {}
        orphans: list = []
        for ann in doc.get("annotations", []):
            if isinstance(ann, dict) and "bbox" not in ann and "category_id" not in ann:
                continue  # a caption or another non-detection annotation
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if not _is_id(image_id) or image_id not in images:
                orphans.append(image_id)
                continue
            where = f"{json_rel} annotation {ann.get('id')}"
            img = images[image_id]
            try:
                cat = ann.get("category_id")
                if not _is_id(cat) or cat not in categories:
                    raise _BadLine(f"category_id {cat!r} is not in categories {sorted(categories, key=str)}")
                size = (img["width"], img["height"]) if isinstance(img.get("width"), int | float) and isinstance(img.get("height"), int | float) else None  # fmt: skip
                boxes[image_id].append((str(cat), categories[cat], _coco_bbox(ann, size)))
            except _BadLine as exc:
                bad.setdefault(image_id, f"{where}: {exc}; fix or delete the annotation")
        if orphans:
            shown = ", ".join(repr(i) for i in orphans[:5]) + (
                f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
            )
            rejects.append(
                Reject(
                    f"{json_rel}#annotation",
                    ORPHAN_ANNOTATION,
                    f"{len(orphans)} annotation(s) name an image_id that is not in this file's images ({shown}) and "
                    "were left out; fix their image_id, add the image entries, or delete them",
                )
            )
        for image_id, img in images.items():
            rel = img["file_name"].replace("\\", "/")
            if not (drop_dir / rel).exists() and (drop_dir / "images" / rel).exists():
                rel = f"images/{rel}"
            entry = entries.get(rel)
            if entry is None:
                target, reject = _safe_path(drop_dir, root, rel)
                entry = entries[rel] = {"target": target, "reject": reject, "boxes": [], "bad": None}
            if entry["reject"] is not None:
                continue
            if image_id in bad:
                entry["bad"] = entry["bad"] or bad[image_id]
            else:
                entry["boxes"] += _coco_displayed(entry["target"], img, boxes[image_id])
    rows = []
    for rel, entry in entries.items():
        if entry["reject"] is not None:
            rejects.append(entry["reject"])
        elif entry["bad"] is not None:
            rejects.append(Reject(rel, "bad_label", entry["bad"]))
        else:
            rows.append(_label_row(str(entry["target"]), rel, entry["boxes"], box_classes))
    return rows, rejects


def _coco_displayed(target: Path, img: dict, boxes: list) -> list:
    """Boxes drawn on the stored pixel grid of an image whose EXIF orientation swaps its axes -> the
    displayed image. The json `width`/`height` tell which grid the annotator saw: the stored size
    (orientation 5-8, not square) means the stored grid; otherwise the boxes are kept as they are."""
    if not boxes:
        return boxes
    w, h, orientation = _header(target)
    json_size = (img.get("width"), img.get("height"))
    if orientation < 5 or w == h or json_size != (w, h):
        return boxes
    return [(c, nm, _to_displayed(b, w, h, orientation)) for c, nm, b in boxes]
