"""Image table: every reject reason on a planted bad file, duplicates, columns, TooManyRejects."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roadwork_core.data.image_table import IMAGE_TABLE_COLUMNS, TooManyRejects, build_image_table


def _jpeg(colour: tuple[int, int, int], size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def planted_drop(tmp_path: Path, image_bytes: Callable[..., bytes]) -> Path:
    """A labels.csv drop with one file per reject reason, next to good and accepted-but-odd files."""
    drop = tmp_path / "inbox" / "v0001"
    img = drop / "images"
    img.mkdir(parents=True)
    rows = []

    def put(name: str, data: bytes, label: str, weather: str = "clear") -> None:
        (img / name).write_bytes(data)
        rows.append(f"images/{name},{label},{weather}")

    for i in range(6):
        put(f"good{i}.jpg", _jpeg((i * 40, 100, 50)), str(i % 2))
    put("alpha.png", image_bytes(mode="RGBA", fmt="PNG"), "roadwork")
    put("gray.png", image_bytes(mode="L", fmt="PNG"), "no_roadwork")
    put("cmyk.jpg", image_bytes(mode="CMYK", fmt="JPEG"), "1")
    big = _jpeg((9, 9, 9), size=(256, 256))
    put("truncated.jpg", big[: len(big) // 2], "1")
    put("empty.jpg", b"", "0")
    put("tiny.jpg", _jpeg((1, 2, 3), size=(10, 10)), "0")
    put("badlabel.jpg", _jpeg((200, 200, 0)), "maybe")
    put("same_a.jpg", _jpeg((0, 0, 250)), "1")
    put("same_b.jpg", _jpeg((0, 0, 250)), "1", weather="rain")
    put("conflict_a.jpg", _jpeg((0, 250, 0)), "1")
    put("conflict_b.jpg", _jpeg((0, 250, 0)), "0")
    (tmp_path / "secret.jpg").write_bytes(_jpeg((5, 5, 5)))
    (img / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    rows += ["images/link.jpg,1,clear", "../secret.jpg,0,clear", "images/missing.jpg,1,clear"]
    (drop / "labels.csv").write_text("file,label,weather\n" + "\n".join(rows) + "\n")
    (drop / "_READY").write_text("")
    return drop


def test_every_reject_reason_on_planted_files(planted_drop: Path) -> None:
    result = build_image_table([planted_drop], max_reject_fraction=1.0)
    reasons = dict(zip(result.rejects["file"], result.rejects["reason"], strict=True))
    assert reasons == {
        "images/truncated.jpg": "truncated",
        "images/empty.jpg": "unreadable",
        "images/missing.jpg": "unreadable",
        "images/tiny.jpg": "too_small",
        "images/badlabel.jpg": "bad_label",
        "../secret.jpg": "path_escape",
        "images/link.jpg": "symlink_outside",
        "images/conflict_a.jpg": "label_conflict",
        "images/conflict_b.jpg": "label_conflict",
    }
    assert list(result.rejects.columns) == ["file", "source", "reason", "detail"]
    assert (result.rejects["source"] == "v0001").all()
    assert result.rejects["detail"].str.len().gt(0).all(), "every reject says why in words"
    accepted = set(result.images["file"])
    assert {"images/alpha.png", "images/gray.png", "images/cmyk.jpg"} <= accepted, "odd modes are converted"
    assert "images/same_a.jpg" in accepted and "images/same_b.jpg" not in accepted, "duplicates collapse"
    assert len(result.images) == 6 + 3 + 1
    assert result.n_candidates == 20


def test_image_table_columns_ids_and_order(planted_drop: Path) -> None:
    m = build_image_table([planted_drop], max_reject_fraction=1.0).images
    assert list(m.columns) == [*IMAGE_TABLE_COLUMNS, "weather"]
    assert m["image_id"].is_monotonic_increasing and m["image_id"].is_unique
    for row in m.itertuples():
        assert row.image_id == hashlib.sha256(Path(row.uri).read_bytes()).hexdigest(), row.file
        assert len(row.phash) == 16 and int(row.phash, 16) >= 0, row.phash
    assert set(m["label"]) == {0, 1} and m["label"].dtype.kind == "i"
    assert m.loc[m["file"] == "images/alpha.png", "label"].item() == 1, "class names map through class_names"
    assert (m[["width", "height"]].to_numpy() == [64, 48]).all()


def test_duplicates_table(planted_drop: Path) -> None:
    dups = build_image_table([planted_drop], max_reject_fraction=1.0).duplicates
    agree = dups[~dups["conflict"]]
    assert list(zip(agree["kept_file"], agree["dropped_file"], strict=True)) == [
        ("images/same_a.jpg", "images/same_b.jpg")
    ]
    clash = dups[dups["conflict"]]
    assert sorted(clash["dropped_file"]) == ["images/conflict_a.jpg", "images/conflict_b.jpg"]
    assert clash["image_id"].nunique() == 1


def test_too_many_rejects_message(planted_drop: Path) -> None:
    with pytest.raises(TooManyRejects) as info:
        build_image_table([planted_drop], max_reject_fraction=0.05)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in ("9 of 20", "45.0%", "5.0%", "images/truncated.jpg", "max_reject_fraction"):
        assert part in msg, f"{part!r} missing from: {msg}"


def test_union_of_drops_with_cross_drop_duplicates(demo_inbox: Path, tmp_path: Path) -> None:
    first = demo_inbox / "v0001"
    second = tmp_path / "v0002"
    (second / "images").mkdir(parents=True)
    shutil.copy(first / "images" / "000000.jpg", second / "images" / "again.jpg")
    (second / "images" / "new.jpg").write_bytes(_jpeg((1, 200, 30), size=(80, 60)))
    label0 = (first / "labels.csv").read_text().splitlines()[1].split(",")[1]
    (second / "labels.csv").write_text(
        f"file,label,camera\nimages/again.jpg,{label0},x\nimages/new.jpg,0,y\n"
    )
    result = build_image_table([first, second])
    m = result.images
    assert len(m) == 48 + 1, "the copy in the newer drop collapses onto the original"
    assert list(m.columns) == [
        *IMAGE_TABLE_COLUMNS,
        "time_of_day",
        "weather",
        "scene",
        "mask_x",
        "mask_y",
        "camera",
    ]
    assert (m.loc[m["source"] == "v0001", "camera"] == "").all(), "missing metadata is an empty string"
    assert m.loc[m["file"] == "images/new.jpg", "time_of_day"].item() == ""
    dup = result.duplicates.iloc[0]
    assert (dup.kept_source, dup.dropped_source, dup.dropped_file) == ("v0001", "v0002", "images/again.jpg")


def test_hf_parquet_manifest(tmp_path: Path) -> None:
    images = [_jpeg((i * 30, 0, 90)) for i in range(5)]
    table = pa.table(
        {
            "image": [{"bytes": b, "path": None} for b in images],
            "label": [1, 0, 1, 7, 0],
            "scene_level_tags": [{"weather": w} for w in ("rain", "fog", "clear", "snow", "rain")],
        }
    )
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hf" / "data" / "train.parquet")
    result = build_image_table([tmp_path / "hf"], max_reject_fraction=0.5)
    assert list(result.rejects["reason"]) == ["bad_label"], "label 7 is neither 0/1 nor a class name"
    assert list(result.images.columns) == [*IMAGE_TABLE_COLUMNS, "scene_level_tags.weather"]
    assert sorted(result.images["scene_level_tags.weather"]) == ["clear", "fog", "rain", "rain"]
    assert result.images["file"].str.startswith("data/train.parquet#row=").all()


@pytest.mark.parametrize(
    "raw, label",
    [("1", 1), (" 0 ", 0), ("1.0", 1), ("0.0", 0), ("TRUE", 1), ("false", 0), (True, 1), (0.0, 0),
     ("Roadwork", 1), (" no-roadwork ", 0), ("No Roadwork", 0), ("roadwork", 1),
     ("maybe", None), ("2", None), ("0.5", None), (0.5, None), (2, None), ("", None), (None, None)],
)  # fmt: skip
def test_label_spellings_read_the_same_in_every_format(raw, label) -> None:
    from roadwork_core.data.drops import DEFAULT_CLASS_NAMES
    from roadwork_core.data.image_table import parse_label

    assert parse_label(raw, DEFAULT_CLASS_NAMES) == label
