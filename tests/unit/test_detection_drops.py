"""YOLO and COCO drops: labels from boxes, class filters, mask points, bad label lines rejected."""

from __future__ import annotations

import functools
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
    assert "image_id 777 is not in images" in details["annotations/instances.json#annotation"]
    assert len(listing.candidates) == N - 3


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
