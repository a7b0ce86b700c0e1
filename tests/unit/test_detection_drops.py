"""YOLO and COCO drops: labels from boxes, class filters, mask points, bad label lines rejected."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest

from roadwork_core.data.drops import detect_format, read_drop
from roadwork_core.data.image_table import build_image_table
from roadwork_core.data.synthetic import CUE_KINDS, _image_rng, draw_scene, make_detection_drop

N = 10


@functools.cache
def _truth(version: str, seed: int = 0) -> list[tuple[int, set[str]]]:
    """The generator's own plan, redrawn: (label, cue kinds) per image index."""
    out = []
    for i in range(N):
        rng = _image_rng(seed, version, "detection", i)
        positive = bool(rng.random() < 0.5)
        scene = draw_scene(rng, positive=positive, hard_negative=bool(rng.random() < 0.3))
        out.append((scene.label, {c.kind for c in scene.cues}))
    return out


@pytest.fixture(scope="module")
def drops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detection")
    return {fmt: make_detection_drop(root / fmt, "v0001", n=N, seed=0, fmt=fmt) for fmt in ("yolo", "coco")}


def _by_index(cands) -> dict[int, dict]:
    return {int(Path(r["file"]).stem): r for r in cands.to_dict("records")}


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_labels_and_mask_points_from_boxes(drops, fmt: str) -> None:
    drop = drops[fmt]
    assert detect_format(drop) == fmt
    listing = read_drop(drop)
    assert listing.rejects == []
    rows = _by_index(listing.candidates)
    truth = _truth("v0001")
    assert {0, 1} <= {label for label, _ in truth}, "the fixture should hold both classes"
    for i, (label, _) in enumerate(truth):
        assert rows[i]["label_raw"] == str(label), (fmt, i)
        assert (rows[i]["mask_x"] != "") == bool(label), (fmt, i)


def test_yolo_and_coco_agree_on_the_same_scenes(drops) -> None:
    yolo = _by_index(read_drop(drops["yolo"]).candidates)
    coco = _by_index(read_drop(drops["coco"]).candidates)
    for i in range(N):
        assert yolo[i]["label_raw"] == coco[i]["label_raw"]
        if yolo[i]["mask_x"]:
            assert abs(int(yolo[i]["mask_x"]) - int(coco[i]["mask_x"])) <= 1
            assert abs(int(yolo[i]["mask_y"]) - int(coco[i]["mask_y"])) <= 1


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_box_classes_select_which_boxes_count(drops, fmt: str) -> None:
    truth = _truth("v0001")
    rows = _by_index(read_drop(drops[fmt], box_classes=["cone", "sign"]).candidates)
    for i, (_, kinds) in enumerate(truth):
        assert rows[i]["label_raw"] == str(int(bool(kinds & {"cone", "sign"}))), (fmt, i, kinds)
    if fmt == "yolo":  # without names a class is matched by its id
        ids = _by_index(read_drop(drops[fmt], box_classes=[str(CUE_KINDS.index("cone"))]).candidates)
        assert [ids[i]["label_raw"] for i in range(N)] == [str(int("cone" in k)) for _, k in truth]


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_a_box_class_the_drop_does_not_define_is_refused(drops, fmt: str) -> None:
    import shutil

    from roadwork_core.data.detection_drops import check_box_classes
    from roadwork_core.data.image_table import build_image_table

    """`box_classes: [cone, sgin]`: the typo matched no box, so every image with only a sign became
    no_roadwork (53 positives instead of 68 on a 160-image drop) with every split check green."""
    with pytest.raises(ValueError, match=r"box_classes \['sgin'\] name no class of the drops .*'sign'"):
        build_image_table([drops[fmt]], box_classes=["cone", "sgin"])
    # the check takes every drop of the version: a class a later drop adds is known from then on
    later = drops[fmt].parent / "later"
    shutil.copytree(drops[fmt], later)
    if fmt == "yolo":
        with (later / "classes.txt").open("a") as f:
            f.write("arrow_board\n")
        check_box_classes(["cone", "arrow_board"], [(drops[fmt], fmt), (later, fmt)])
        with pytest.raises(ValueError, match="arrow_board"):
            check_box_classes(["cone", "arrow_board"], [(drops[fmt], fmt)])


def test_yolo_bad_lines_reject_their_image_with_reasons(drops, tmp_path: Path) -> None:
    import shutil

    drop = tmp_path / "v0001"
    shutil.copytree(drops["yolo"], drop)
    bad = {
        0: ("x 0.5 0.5 0.1 0.1", "class id 'x'"),
        1: ("0 1.5 0.5 0.1 0.1", "normalized to [0, 1]"),
        2: ("0 0.5 0.5", "5 fields"),
        3: ("7 0.5 0.5 0.1 0.1", "not in the 5 class names"),
        4: ("0 0.5 0.5 0.0 0.1", "width and height must be > 0"),
        5: ("0 0.1 0.1 0.2 0.1 0.2", "even number"),
    }
    for i, (line, _) in bad.items():
        with open(drop / f"labels/{i:06d}.txt", "a") as f:
            f.write(line + "\n")
    (drop / f"labels/{6:06d}.txt").unlink()  # a missing label file: no box, no_roadwork
    listing = read_drop(drop)
    rejects = {r.file: r for r in listing.rejects}
    assert set(rejects) == {f"images/{i:06d}.jpg" for i in bad}
    for i, (line, why) in bad.items():
        r = rejects[f"images/{i:06d}.jpg"]
        assert r.reason == "bad_label" and f"labels/{i:06d}.txt line" in r.detail and why in r.detail, r
        assert repr(line) in r.detail
    assert _by_index(listing.candidates)[6]["label_raw"] == "0"


def test_yolo_class_names_from_data_yaml(drops, tmp_path: Path) -> None:
    import shutil

    drop = tmp_path / "v0001"
    shutil.copytree(drops["yolo"], drop)
    (drop / "classes.txt").unlink()
    (drop / "data.yaml").write_text(
        "names: {0: cone, 1: barrier, 2: sign, 3: worker, 4: construction_vehicle}\n"
    )
    truth = _truth("v0001")
    rows = _by_index(read_drop(drop, box_classes=["worker"]).candidates)
    assert [rows[i]["label_raw"] for i in range(N)] == [str(int("worker" in k)) for _, k in truth]
    (drop / "data.yaml").write_text("names: 5\n")
    with pytest.raises(ValueError, match="data.yaml: `names` must be a list"):
        read_drop(drop)


def test_coco_bad_annotations_reject_their_image(drops, tmp_path: Path) -> None:
    import shutil

    drop = tmp_path / "v0001"
    shutil.copytree(drops["coco"], drop)
    path = drop / "annotations/instances.json"
    doc = json.loads(path.read_text())
    doc["annotations"] += [
        {"id": 901, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},
        {"id": 902, "image_id": 2, "category_id": 1, "bbox": [-3, 1, 5, 5]},
        {"id": 903, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5000, 5]},
        {"id": 904, "image_id": 777, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    path.write_text(json.dumps(doc))
    listing = read_drop(drop)
    details = {r.file: r.detail for r in listing.rejects}
    assert (
        "category_id 99" in details["images/000000.jpg"] and "annotation 901" in details["images/000000.jpg"]
    )
    assert "x, y >= 0" in details["images/000001.jpg"]
    assert "outside the" in details["images/000002.jpg"]
    orphan = next(r for r in listing.rejects if r.file == "annotations/instances.json#annotation")
    assert orphan.reason == "orphan_annotation" and "(777)" in orphan.detail, orphan
    assert len(listing.candidates) == N - 3


def test_coco_malformed_entries_leftovers_and_a_captions_file_beside_it(drops, tmp_path: Path) -> None:
    """Ids that are lists or objects are named, not a TypeError; annotations of images the file does not
    list are a notice that counts toward no reject limit; a captions json of the same export adds nothing."""
    import shutil

    drop = tmp_path / "v0001"
    shutil.copytree(drops["coco"], drop)
    path = drop / "annotations/instances.json"
    doc = json.loads(path.read_text())
    doc["images"].append({"id": [9], "file_name": "images/000000.jpg"})
    doc["annotations"] += [
        {"id": 905, "image_id": [1], "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 906, "image_id": 1, "category_id": {"a": 1}, "bbox": [1, 1, 5, 5]},
    ] + [{"id": 910 + k, "image_id": 500 + k, "category_id": 1, "bbox": [1, 1, 5, 5]} for k in range(3)]
    path.write_text(json.dumps(doc))
    captions = {
        "images": doc["images"][:N],
        "annotations": [
            {"id": k, "image_id": img["id"], "caption": "a street"} for k, img in enumerate(doc["images"][:N])
        ],
    }
    (drop / "annotations/captions.json").write_text(json.dumps(captions))
    listing = read_drop(drop)
    details = {r.file: (r.reason, r.detail) for r in listing.rejects}
    assert "integer or string `id`" in details["annotations/instances.json#image"][1]
    assert details["annotations/instances.json#annotation"][0] == "orphan_annotation"
    assert "4 annotation(s)" in details["annotations/instances.json#annotation"][1], details
    assert "category_id {'a': 1}" in details["images/000000.jpg"][1]
    assert len(listing.candidates) == N - 1, "each image once, although two files list it"

    bad = json.loads(path.read_text())
    bad["categories"] = ["cone"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"categories\[0\] is 'cone'"):
        read_drop(drop)


def test_leftover_label_files_are_notices_not_rejected_images(drops, tmp_path: Path) -> None:
    import shutil

    drop = tmp_path / "v0001"
    shutil.copytree(drops["yolo"], drop)
    for k in range(3):
        (drop / "labels" / f"gone{k}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (drop / "labels" / "000000.txt").write_bytes(
        b"\xef\xbb\xbf" + (drop / "labels" / "000000.txt").read_bytes()
    )
    result = build_image_table([drop], max_reject_fraction=0.0)  # three stray label files fail nothing
    assert len(result.images) == N
    assert (result.rejects["reason"] == "orphan_label").sum() == 3


def test_image_table_on_a_yolo_drop_keeps_labels_and_mask_points(drops) -> None:
    result = build_image_table([drops["yolo"]])
    m = result.images
    assert len(m) == N and {"mask_x", "mask_y"} <= set(m.columns)
    truth = _truth("v0001")
    by_file = dict(zip(m["file"], m["label"], strict=True))
    assert [by_file[f"images/{i:06d}.jpg"] for i in range(N)] == [label for label, _ in truth]
    pos = m[m["label"] == 1]
    assert np.all(pos["mask_x"].astype(int).between(0, pos["width"] - 1))
    assert np.all(pos["mask_y"].astype(int).between(0, pos["height"] - 1))


def test_detection_drop_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a detection format"):
        make_detection_drop(tmp_path, "v1", n=1, fmt="voc")


# ---------------------------------------------------------------------------------------------
# EXIF-rotated photos: the mask point lands on the object in the image as training sees it

_UNDO = {  # the transpose that stores a displayed image so that `ImageOps.exif_transpose` shows it again
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_90",  # orientation 6 displays with ROTATE_270
    7: "TRANSVERSE",
    8: "ROTATE_270",  # orientation 8 displays with ROTATE_90
}
_MARK = (46, 6, 58, 16)  # the object on the displayed 64 x 48 image: near its top-right corner


def _rotated_photo(orientation: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """A JPEG that displays as 64 x 48 with a red object at _MARK, stored transposed with that EXIF
    orientation; -> (bytes, the object's box on the stored pixel grid)."""
    from PIL import Image

    shown = Image.new("RGB", (64, 48), (0, 0, 0))
    shown.paste((255, 0, 0), _MARK)
    stored = shown.transpose(getattr(Image.Transpose, _UNDO[orientation]))
    ys, xs = np.nonzero(np.asarray(stored)[..., 0] > 128)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _on_the_object(uri: str, row: dict) -> bool:
    from roadwork_core.data.images import load_image

    r, g, _ = load_image(uri).getpixel((int(row["mask_x"]), int(row["mask_y"])))
    return r > 150 and g < 100


@pytest.mark.parametrize("orientation", range(2, 9))
def test_yolo_mask_point_follows_exif_orientation(tmp_path: Path, orientation: int) -> None:
    data, _ = _rotated_photo(orientation)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images/phone.jpg").write_bytes(data)
    x0, y0, x1, y1 = _MARK  # YOLO (Ultralytics) coordinates are normalized to the displayed image
    (tmp_path / "labels/phone.txt").write_text(
        f"0 {(x0 + x1) / 2 / 64} {(y0 + y1) / 2 / 48} {(x1 - x0) / 64} {(y1 - y0) / 48}\n"
    )
    row = read_drop(tmp_path).candidates.to_dict("records")[0]
    assert (int(row["mask_x"]), int(row["mask_y"])) == (52, 11), orientation
    assert _on_the_object(row["uri"], row)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
@pytest.mark.parametrize("grid", ["stored", "displayed"])
def test_coco_mask_point_follows_exif_orientation(tmp_path: Path, orientation: int, grid: str) -> None:
    data, stored_box = _rotated_photo(orientation)
    (tmp_path / "images").mkdir()
    (tmp_path / "images/phone.jpg").write_bytes(data)
    if grid == "stored":  # the json names the stored size: the annotator drew on the stored pixels
        (w, h), (x0, y0, x1, y1) = (48, 64), stored_box
    else:  # the json names the displayed size: boxes are already on the displayed image
        (w, h), (x0, y0, x1, y1) = (64, 48), _MARK
    doc = {
        "images": [{"id": 1, "file_name": "phone.jpg", "width": w, "height": h}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}],
        "categories": [{"id": 1, "name": "cone"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    row = read_drop(tmp_path, fmt="coco").candidates.to_dict("records")[0]
    assert abs(int(row["mask_x"]) - 52) <= 1 and abs(int(row["mask_y"]) - 11) <= 1, (orientation, row)
    assert _on_the_object(row["uri"], row)


# ---------------------------------------------------------------------------------------------
# label files that match no image


def _yolo_tree(root: Path, images: list[str], labels: dict[str, str]) -> Path:
    from PIL import Image

    for rel in images:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (90, 90, 90)).save(root / rel, format="JPEG")
    for rel, text in labels.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_yolo_orphan_label_files_are_reported_with_their_likely_cause(tmp_path: Path) -> None:
    box = "0 0.5 0.5 0.2 0.2\n"
    drop = _yolo_tree(
        tmp_path,
        ["images/train/a.jpg", "images/train/b.jpg", "images/train/c.jpg"],
        {
            "labels/train/a.txt": box,  # pairs with its image
            "labels/Train/b.txt": box,  # case differs from images/train
            "labels/val/c.txt": box,  # the image sits in another folder
            "labels/train/gone.txt": box,  # no image at all
            "labels/classes.txt": "cone\n",  # class names, not a label file
        },
    )
    listing = read_drop(drop)
    assert dict(zip(listing.candidates["file"], listing.candidates["label_raw"], strict=True)) == {
        "images/train/a.jpg": "1",
        "images/train/b.jpg": "0",
        "images/train/c.jpg": "0",
    }
    rejects = {r.file: r for r in listing.rejects}
    assert set(rejects) == {"labels/Train/b.txt", "labels/val/c.txt", "labels/train/gone.txt"}
    assert {r.reason for r in rejects.values()} == {"orphan_label"}
    assert "images/Train/b.<ext>" in rejects["labels/Train/b.txt"].detail
    assert "images/train/b.jpg differs only in upper/lower case" in rejects["labels/Train/b.txt"].detail
    assert "images/train/c.jpg" in rejects["labels/val/c.txt"].detail
    assert "labels/train/c.txt" in rejects["labels/val/c.txt"].detail
    assert "add the image or delete the label file" in rejects["labels/train/gone.txt"].detail


def test_yolo_labels_that_match_no_image_at_all_raise(tmp_path: Path) -> None:
    drop = _yolo_tree(
        tmp_path,
        ["images/Train/f0.jpg", "images/Train/f1.jpg"],
        {"labels/train/f0.txt": "", "labels/train/f1.txt": "0 0.5 0.5 0.2 0.2\n"},
    )
    with pytest.raises(ValueError, match=r"none of the 2 label files under labels/ matches an image") as info:
        read_drop(drop)
    assert "every image would be no_roadwork" in str(info.value)
    assert "images/Train/f0.jpg differs only in upper/lower case" in str(info.value)
