"""Image table: every reject reason on a planted bad file, duplicates, columns, TooManyRejects."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
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


def test_facts_an_earlier_table_recorded_are_reused_and_give_the_same_table(
    planted_drop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version of a growing inbox decodes and hashes only the images no earlier table holds: the
    rest take their facts from the earlier table (same bytes, same facts), and the table, rejects and
    duplicates are exactly those of a build that hashes everything again."""
    import roadwork_core.data.image_table as image_table

    second = tmp_path / "inbox" / "v0002"
    (second / "images").mkdir(parents=True)
    (second / "images" / "new.jpg").write_bytes(_jpeg((1, 200, 30), size=(80, 60)))
    (second / "labels.csv").write_text("file,label,weather\nimages/new.jpg,0,fog\n")
    earlier = build_image_table([planted_drop], max_reject_fraction=1.0)
    scratch = build_image_table([planted_drop, second], max_reject_fraction=1.0)

    inspected: list[str] = []
    real_inspect = image_table._inspect
    monkeypatch.setattr(
        image_table, "_inspect", lambda uri, *a: inspected.append(uri) or real_inspect(uri, *a)
    )
    reused = build_image_table(
        [planted_drop, second], max_reject_fraction=1.0, known=earlier.images, workers=1
    )
    pd.testing.assert_frame_equal(reused.images, scratch.images)
    pd.testing.assert_frame_equal(reused.rejects, scratch.rejects)
    pd.testing.assert_frame_equal(reused.duplicates, scratch.duplicates)
    # (the label-conflict pair is in no table, so it is hashed again)
    accepted = {"good0.jpg", "good1.jpg", "good2.jpg", "good3.jpg", "good4.jpg", "good5.jpg", "alpha.png",
                "gray.png", "cmyk.jpg", "same_a.jpg", "same_b.jpg"}  # fmt: skip
    assert reused.n_reused == len(accepted), "every file whose bytes an earlier table holds is reused"
    assert not {Path(u).name for u in inspected} & accepted, "a reused image was decoded and hashed again"
    assert {"new.jpg", "truncated.jpg", "conflict_a.jpg"} <= {Path(u).name for u in inspected}

    # the size limit applies to reused facts too (min_size may have changed since the earlier table)
    larger = build_image_table([planted_drop], max_reject_fraction=1.0, known=earlier.images, min_size=60)
    assert set(larger.rejects.loc[larger.rejects["reason"] == "too_small", "file"]) >= {"images/good0.jpg"}
    assert larger.n_reused == len(accepted)
    pd.testing.assert_frame_equal(
        larger.images, build_image_table([planted_drop], max_reject_fraction=1.0, min_size=60).images
    )


def test_the_facts_version_follows_the_hashing_code_and_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    import PIL
    import PIL.features

    import roadwork_core.data.image_table as image_table

    def fresh() -> str | None:
        image_table.facts_version.cache_clear()
        return image_table.facts_version()

    before = fresh()
    assert before and before == image_table.facts_version()
    real_source = inspect.getsource
    monkeypatch.setattr(
        inspect, "getsource", lambda m: real_source(m) + ("#" if m.__name__.endswith("neardup") else "")
    )
    assert fresh() != before, "an edit to the hashing code keeps the old facts"
    monkeypatch.setattr(inspect, "getsource", real_source)
    monkeypatch.setattr(PIL, "__version__", "0.0")  # what is imported, whatever the distribution's name
    assert fresh() != before, "another Pillow keeps the old facts"
    monkeypatch.undo()
    real_feature = PIL.features.version
    monkeypatch.setattr(PIL.features, "version", lambda f: "9.9" if f == "libjpeg_turbo" else real_feature(f))
    assert fresh() != before, "another JPEG library under the same Pillow keeps the old facts"
    monkeypatch.undo()
    assert fresh() == before


def test_the_facts_version_without_source_files(monkeypatch: pytest.MonkeyPatch, planted_drop: Path) -> None:
    """An install of bytecode alone fingerprints the compiled code; with no code to read at all nothing is
    reused, and the table is still built (it failed with OSError)."""
    import inspect

    import roadwork_core.data.image_table as image_table

    def no_source(module):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    image_table.facts_version.cache_clear()
    compiled = image_table.facts_version()
    assert compiled and len(compiled) == 16
    monkeypatch.setattr(image_table, "_module_code", lambda name: None)
    image_table.facts_version.cache_clear()
    assert image_table.facts_version() is None
    monkeypatch.undo()
    image_table.facts_version.cache_clear()
