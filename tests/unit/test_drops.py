"""Drop readers (labels.csv, ImageFolder, HF parquet), path safety, inbox listing, image decoding."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roadwork_core.data.drops import (
    detect_format,
    drops_up_to,
    list_ready_drops,
    list_unlabelled,
    read_drop,
    unusable_ready_drops,
    version_key,
    version_name_problem,
)
from roadwork_core.data.images import ImageRejected, decode_image, load_image, read_uri_bytes, split_uri

# ---------------------------------------------------------------------------------------------
# image decoding


def test_decode_converts_modes_and_composites_alpha_on_white(image_bytes: Callable[..., bytes]) -> None:
    rgba = decode_image(image_bytes(mode="RGBA", fmt="PNG", colour=(255, 0, 0, 0)), source="a.png")
    assert rgba.mode == "RGB" and rgba.getpixel((3, 3)) == (255, 255, 255), (
        "transparent pixels must become white"
    )
    gray = decode_image(image_bytes(mode="L", fmt="PNG"), source="g.png")
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (128, 128, 128)
    cmyk = decode_image(image_bytes(mode="CMYK", fmt="JPEG"), source="c.jpg")
    assert cmyk.mode == "RGB" and cmyk.size == (64, 48)
    deep = Image.fromarray(np.full((40, 40), 65535, np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), source="d.png").getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_orientation() -> None:
    img = Image.new("RGB", (60, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), source="r.jpg").size == (40, 60), "EXIF orientation must be applied"


def test_decode_rejects_broken_images(image_bytes: Callable[..., bytes]) -> None:
    jpeg = image_bytes(size=(256, 256))
    cases = {
        b"": "unreadable",
        b"not an image at all": "unreadable",
        jpeg[: len(jpeg) // 2]: "truncated",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageRejected) as info:
            decode_image(data, source="x.jpg")
        assert info.value.reason == reason, f"{data[:12]!r}: expected {reason}, got {info.value.reason}"
        assert info.value.source == "x.jpg"
    with pytest.raises(ImageRejected) as info:
        decode_image(jpeg, source="big.jpg", max_pixels=100)
    assert info.value.reason == "too_large" and "256x256" in info.value.detail


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="TIFF")
    return buf.getvalue()


def test_decode_scales_float_and_32_bit_int_images() -> None:
    ramp = np.linspace(0.0, 1.0, 64 * 48).reshape(48, 64)

    def grey(data: bytes) -> np.ndarray:
        return np.asarray(decode_image(data, source="x.tif"))[..., 0].astype(int)

    expected = np.round(ramp * 255).astype(int)
    cases = {
        "F in 0..1": _tiff(ramp.astype(np.float32), "F"),
        "F in 0..255": _tiff((ramp * 255).astype(np.float32), "F"),
        "I in 0..255": _tiff(np.round(ramp * 255).astype(np.int32), "I"),
        "I in 0..65535 (16-bit data)": _tiff(np.round(ramp * 65535).astype(np.int32), "I"),
        "I in 0..255000 (own range)": _tiff(np.round(ramp * 255).astype(np.int32) * 1000, "I"),
        "F in -5..5 (own range)": _tiff((ramp * 10 - 5).astype(np.float32), "F"),
    }
    for name, data in cases.items():
        assert np.abs(grey(data) - expected).max() <= 1, name
    nan = (ramp * 0.5).astype(np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(ImageRejected) as info:
        decode_image(_tiff(nan, "F"), source="nan.tif")
    assert info.value.reason == "unreadable" and "NaN or infinite" in info.value.detail
    assert "8-bit image" in info.value.detail


def test_unsupported_formats_and_unreadable_bytes_get_clean_details() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200
    with pytest.raises(ImageRejected) as info:
        decode_image(heic, source="IMG_0001.HEIC")
    assert info.value.reason == "unreadable"
    assert info.value.detail.startswith("HEIC/HEIF image (ftyp brand 'heic'): this format is not supported")
    assert "convert it to JPEG" in info.value.detail
    with pytest.raises(ImageRejected) as info:
        decode_image(b"[.ShellClassInfo]\r\n", source="desktop.ini")
    assert info.value.detail == "not a readable image: cannot identify image file", (
        "no <_io.BytesIO object at 0x..>"
    )


def test_row_marker_only_after_a_parquet_path(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    assert split_uri("/d/data/train.parquet#row=3") == ("/d/data/train.parquet", 3)
    assert split_uri("/d/roadwork/frame#row=1.jpg") == ("/d/roadwork/frame#row=1.jpg", None)
    assert split_uri("/d/roadwork/cam#row=7/3") == ("/d/roadwork/cam#row=7/3", None)
    with pytest.raises(ValueError, match="bad image uri"):
        split_uri("/d/train.parquet#row=x")
    (tmp_path / "roadwork" / "cam#row=7").mkdir(parents=True)
    (tmp_path / "roadwork" / "cam#row=7" / "3").write_bytes(image_bytes())
    uri = read_drop(tmp_path).candidates["uri"].item()
    assert read_uri_bytes(uri) == image_bytes() and load_image(uri).size == (64, 48)


# ---------------------------------------------------------------------------------------------
# readers


def test_labels_csv_drop(demo_drop: Path) -> None:
    assert detect_format(demo_drop) == "labels_csv"
    listing = read_drop(demo_drop)
    cands = listing.candidates
    assert list(cands.columns) == [
        "uri", "file", "label_raw", "source", "time_of_day", "weather", "scene", "mask_x", "mask_y"
    ]  # fmt: skip
    assert len(cands) == 48 and listing.rejects == []
    assert (cands["source"] == "v0001").all()
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in cands["uri"])
    assert cands["file"].str.startswith("images/").all()
    assert len(list_unlabelled(demo_drop)) == 4


def test_imagefolder_with_custom_class_names(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    for folder, n in (("works", 2), ("clear", 3)):
        (tmp_path / folder / "nested").mkdir(parents=True)
        for i in range(n):
            (tmp_path / folder / "nested" / f"{i}.jpg").write_bytes(image_bytes())
    (tmp_path / "works" / ".DS_Store").write_bytes(b"junk")
    names = {"works": 1, "clear": 0}
    assert detect_format(tmp_path, names) == "imagefolder"
    cands = read_drop(tmp_path, class_names=names).candidates
    assert sorted(cands["label_raw"]) == ["clear"] * 3 + ["works"] * 2
    assert "works/nested/0.jpg" in set(cands["file"]), "file must be relative to the drop root"
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(tmp_path)  # default names roadwork/no_roadwork are absent


def _write_hf_shard(
    path: Path, images: list[bytes | None], labels: list, hf_names: list[str] | None = None
) -> None:
    table = pa.table(
        {
            "image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
            "label": labels,
            "scene_level_tags": [{"weather": "rain", "light": {"kind": "day"}} for _ in images],
            "camera": ["cam-a"] * len(images),
        }
    )
    if hf_names is not None:
        feats = {"label": {"_type": "ClassLabel", "names": hf_names}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)


def test_hf_parquet_drop(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    imgs = [image_bytes(colour=(i * 40, 0, 0)) for i in range(4)]
    _write_hf_shard(
        tmp_path / "data" / "train-00000.parquet", [*imgs, None], ["roadwork", "no_roadwork", "1", "0", "1"]
    )
    assert detect_format(tmp_path) == "hf_parquet"
    listing = read_drop(tmp_path)
    cands = listing.candidates
    assert list(cands["file"]) == [f"data/train-00000.parquet#row={i}" for i in range(4)]
    assert list(cands["label_raw"]) == ["roadwork", "no_roadwork", "1", "0"], "labels are kept as found"
    assert (cands["scene_level_tags.weather"] == "rain").all(), "nested dicts must be flattened with dots"
    assert (cands["scene_level_tags.light.kind"] == "day").all()
    assert (cands["camera"] == "cam-a").all()
    assert [(r.file, r.reason) for r in listing.rejects] == [("data/train-00000.parquet#row=4", "unreadable")]
    for i in (3, 0, 2):  # rows across row groups, out of order
        assert read_uri_bytes(cands["uri"][i]) == imgs[i]
    assert load_image(cands["uri"][1]).size == (64, 48)


def test_hf_classlabel_indices_become_names(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    # index 0 is "roadwork" here: mapping by name keeps the meaning instead of trusting the index
    _write_hf_shard(
        tmp_path / "s.parquet", [image_bytes(), image_bytes()], [0, 1], ["roadwork", "no_roadwork"]
    )
    assert list(read_drop(tmp_path).candidates["label_raw"]) == ["roadwork", "no_roadwork"]


def test_paths_escaping_the_drop_are_rejected_unread(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(image_bytes())
    drop = tmp_path / "drop"
    (drop / "images").mkdir(parents=True)
    (drop / "images" / "ok.jpg").write_bytes(image_bytes())
    (drop / "images" / "link.jpg").symlink_to(outside)
    (drop / "labels.csv").write_text(
        f"file,label\nimages/ok.jpg,1\n../outside.jpg,0\n{outside},1\nimages/../../outside.jpg,0\nimages/link.jpg,1\n"
    )
    listing = read_drop(drop)
    assert list(listing.candidates["file"]) == ["images/ok.jpg"]
    reasons = {r.file: r.reason for r in listing.rejects}
    assert reasons == {
        "../outside.jpg": "path_escape",
        str(outside): "path_escape",
        "images/../../outside.jpg": "path_escape",
        "images/link.jpg": "symlink_outside",
    }


def test_bad_labels_csv_raises_naming_file_and_fix(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,target\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv lacks column\(s\) \['file', 'label'\].*file,label"):
        read_drop(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,1\nb.jpg,0,extra,fields\n")
    with pytest.raises(ValueError, match=r"labels\.csv is not a readable CSV"):
        read_drop(tmp_path)
    with pytest.raises(ValueError, match="unknown drop format 'voc'"):
        read_drop(tmp_path, fmt="voc")
    with pytest.raises(ValueError, match="no COCO json with images found"):
        read_drop(tmp_path, fmt="coco")


def test_inbox_ready_drops_and_accumulation(tmp_path: Path) -> None:
    for name, ready in (("v0001", True), ("v0002", False), ("v0003", True), (".tmp-v0004.x", True)):
        (tmp_path / name).mkdir()
        if ready:
            (tmp_path / name / "_READY").write_text("")
    assert list_ready_drops(tmp_path) == ["v0001", "v0003"], "only complete, non-temporary drops are listed"
    assert drops_up_to(tmp_path, "v0003") == [tmp_path / "v0001", tmp_path / "v0003"]
    assert drops_up_to(tmp_path, "v0001") == [tmp_path / "v0001"]
    with pytest.raises(ValueError, match="'v0002' is not a ready drop.*_READY"):
        drops_up_to(tmp_path, "v0002")
    assert list_ready_drops(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# ImageFolder: loose class folder names, images outside every class folder, symlinked folders, junk


def _put(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_imagefolder_names_match_loosely_and_stray_images_are_rejected(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    jpg = image_bytes()
    drop = _put(
        tmp_path,
        {
            "Roadwork/r.jpg": jpg,
            "Roadwork/site A/2024/x.JPG": jpg,
            "No-Roadwork/n.jpg": jpg,
            "no roadwork/m.png": jpg,
            "unsure/u.jpg": jpg,
            "NoRoadwork/z.jpg": jpg,
            "top.jpg": jpg,
            "unlabelled/p.jpg": jpg,  # the unlabelled pool, not a stray
            "notes.txt": b"not an image",  # not an image file: not reported
            "Roadwork/Thumbs.db": b"\xd0\xcf\x11\xe0",  # OS junk: skipped everywhere
            "No-Roadwork/desktop.ini": b"[.ShellClassInfo]\r\n",
            "Roadwork/__MACOSX/._r.jpg": b"\x00\x05\x16\x07",
            "__MACOSX/Roadwork/._r.jpg": b"\x00\x05\x16\x07",
        },
    )
    assert detect_format(drop) == "imagefolder"
    listing = read_drop(drop)
    assert dict(zip(listing.candidates["file"], listing.candidates["label_raw"], strict=True)) == {
        "No-Roadwork/n.jpg": "no_roadwork",
        "Roadwork/r.jpg": "roadwork",
        "Roadwork/site A/2024/x.JPG": "roadwork",
        "no roadwork/m.png": "no_roadwork",
    }
    rejects = {r.file: r for r in listing.rejects}
    assert set(rejects) == {"unsure/u.jpg", "NoRoadwork/z.jpg", "top.jpg"}
    assert {r.reason for r in rejects.values()} == {"no_class_folder"}
    assert "in folder 'unsure/', which is not a class folder" in rejects["unsure/u.jpg"].detail
    assert "no_roadwork/, roadwork/" in rejects["unsure/u.jpg"].detail
    assert "rename it to no_roadwork/" in rejects["NoRoadwork/z.jpg"].detail
    assert "at the top of the drop" in rejects["top.jpg"].detail


def test_imagefolder_follows_symlinked_folders_that_stay_inside_the_drop(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    jpg = image_bytes()
    outside = _put(tmp_path / "outside", {"secret.jpg": jpg})
    drop = _put(
        tmp_path / "drop",
        {"roadwork/r.jpg": jpg, "no_roadwork/n.jpg": jpg, "incoming/batch2/z.jpg": jpg},
    )
    (drop / "roadwork" / "batch2").symlink_to(drop / "incoming" / "batch2")  # inside: followed
    (drop / "roadwork" / "ext").symlink_to(outside)  # outside: reported, never read
    (drop / "roadwork" / "up").symlink_to(drop)  # a way back up: not followed (no loop, no relabelling)
    (drop / "roadwork" / "self").symlink_to(drop / "roadwork")
    listing = read_drop(drop)
    assert dict(zip(listing.candidates["file"], listing.candidates["label_raw"], strict=True)) == {
        "no_roadwork/n.jpg": "no_roadwork",
        "roadwork/r.jpg": "roadwork",
        "roadwork/batch2/z.jpg": "roadwork",
    }
    assert [(r.file, r.reason) for r in listing.rejects] == [("roadwork/ext", "symlink_outside")]
    assert str(outside) in listing.rejects[0].detail


def test_os_junk_is_skipped_by_every_reader(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    hf = tmp_path / "hf"
    _write_hf_shard(hf / "data" / "train.parquet", [image_bytes()], ["roadwork"])
    _put(hf, {"__MACOSX/data/train.parquet": b"\x00\x05\x16\x07 resource fork", "data/Thumbs.db": b"x"})
    assert list(read_drop(hf).candidates["file"]) == ["data/train.parquet#row=0"]
    pool = _put(tmp_path / "pool", {"unlabelled/a.jpg": image_bytes(), "unlabelled/Thumbs.db": b"x"})
    _put(pool, {"unlabelled/DESKTOP.INI": b"x", "unlabelled/__MACOSX/._a.jpg": b"x"})
    assert [Path(p).name for p in list_unlabelled(pool)] == ["a.jpg"]


def test_labels_csv_counts_images_it_does_not_list(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    jpg = image_bytes()
    drop = _put(
        tmp_path / "drop",
        {f"roadwork/r{i}.jpg": jpg for i in range(3)}
        | {"no_roadwork/n0.jpg": jpg, "unlabelled/p.jpg": jpg, "roadwork/Thumbs.db": b"x"},
    )
    (tmp_path / "secret.jpg").write_bytes(jpg)
    (drop / "roadwork" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (drop / "labels.csv").write_text(
        "file,label\nroadwork/r0.jpg,1\n./roadwork/r1.jpg,1\nroadwork/link.jpg,1\n"
    )
    listing = read_drop(drop)
    assert list(listing.candidates["file"]) == ["roadwork/r0.jpg", "./roadwork/r1.jpg"], "labels.csv wins"
    rejects = {r.file: r for r in listing.rejects}
    assert rejects["roadwork/link.jpg"].reason == "symlink_outside"
    summary = rejects["labels.csv"]
    assert summary.reason == "not_in_labels_csv"
    assert summary.detail.startswith("2 image file(s) in the drop are not listed in labels.csv")
    assert "no_roadwork/n0.jpg, roadwork/r2.jpg;" in summary.detail, (
        "listed, junk and unlabelled/ files are not"
    )
    assert len(listing.rejects) == 2, "one row for all unlisted images, not one each"


# ---------------------------------------------------------------------------------------------
# version order: natural (v2 < v10) everywhere versions are ordered or compared


def test_version_key_is_natural_and_keeps_zero_padded_order() -> None:
    names = ["v10", "v2", "v1", "v9", "v0010", "v0002", "2025-1-5", "2024-12-01", "2025-01-10", "V3"]
    assert sorted(names, key=version_key) == [
        "2024-12-01", "2025-1-5", "2025-01-10", "V3", "v1", "v0002", "v2", "v9", "v0010", "v10"
    ]  # fmt: skip
    padded = [f"v{i:04d}" for i in (1, 2, 9, 10, 11, 100)]
    assert sorted(padded, key=version_key) == sorted(padded), "zero-padded names keep their string order"
    assert version_key("v1") != version_key("v01"), "distinct names never compare equal"


def test_inbox_orders_and_accumulates_versions_naturally(tmp_path: Path) -> None:
    for name in ("v1", "v2", "v9", "v10", "v11"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "_READY").write_text("")
    assert list_ready_drops(tmp_path) == ["v1", "v2", "v9", "v10", "v11"]
    assert [p.name for p in drops_up_to(tmp_path, "v2")] == ["v1", "v2"], "v10 and v11 come after v2"
    assert [p.name for p in drops_up_to(tmp_path, "v10")] == ["v1", "v2", "v9", "v10"]


def test_assets_order_versions_naturally(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import dagster as dg

    from roadwork_assets import _util, automation, data
    from roadwork_assets.partitions import dataset_version

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(dataset_version.name, ["v1", "v10", "v2", "v9"])
        assert automation._latest_version(instance) == "v10", "weekly_retrain retrains the newest version"
        # v11 added from the UI while its drop is still uploading (no _READY yet): passed over, not retrained
        monkeypatch.setenv("ROADWORK_INBOX", str(tmp_inbox := Path(instance.root_directory) / "inbox"))
        (tmp_inbox / "v11").mkdir(parents=True)
        instance.add_dynamic_partitions(dataset_version.name, ["v11"])
        assert automation._latest_version(instance) == "v10", (
            "a drop still uploading is not the newest version"
        )
        (tmp_inbox / "v11" / "_READY").write_text("v11\n")
        assert automation._latest_version(instance) == "v11"

        # the previous version with an artifact: every version has one here
        monkeypatch.setattr(_util, "latest_materialization_metadata", lambda _i, _k, v: {"path": f"/a/{v}"})
        monkeypatch.setattr(instance, "get_materialized_partitions", lambda _key: {"v1", "v10", "v2", "v9"})
        monkeypatch.setattr(
            "roadwork_resources.io_manager.read_artifact",
            lambda path: pd.DataFrame({"image_id": [str(path)], "split": ["train"]}),
        )
        version, history = _util.previous_split_history(
            instance, "v10"
        )  # the newest first, then the older ones
        assert version == "v9" and history["image_id"].tolist() == ["/a/v9", "/a/v2", "/a/v1"], history
        version, history = _util.previous_split_history(instance, "v2")
        assert version == "v1" and history["image_id"].tolist() == ["/a/v1"]

        # splits of every version between the previous one and this one must exist first
        context = types.SimpleNamespace(partition_key="v10", instance=instance)
        with pytest.raises(dg.Failure, match=r"earlier dataset version\(s\) \['v1', 'v2', 'v9'\]"):
            data._require_earlier_splits(context, None)
        with pytest.raises(dg.Failure, match=r"earlier dataset version\(s\) \['v9'\]"):
            data._require_earlier_splits(context, "v2")
        data._require_earlier_splits(context, "v9")  # nothing in between


# ---------------------------------------------------------------------------------------------
# metadata columns named like the columns later steps add


def test_split_and_group_id_metadata_flow_through_as_meta_columns(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    from roadwork_core.data.image_table import build_image_table
    from roadwork_core.data.splits import assign_splits

    rows = []
    for i in range(12):
        (tmp_path / f"{i}.png").write_bytes(
            image_bytes(fmt="PNG", colour=(i * 20, 255 - i * 20, (i * 57) % 256))
        )
        rows.append(f"{i}.png,{i % 2},{'train' if i < 9 else 'test'},g{i // 3}")
    (tmp_path / "labels.csv").write_text("file,label,split,group_id\n" + "\n".join(rows) + "\n")
    table = build_image_table([tmp_path], workers=1).images
    assert {"meta.split", "meta.group_id"} <= set(table.columns)
    assert "split" not in table.columns and "group_id" not in table.columns
    splits = assign_splits(table)  # failed with "image table already has columns ['split']"
    assert set(splits["split"]) <= {"train", "val_select", "val_calib", "val_test"}
    by_file = dict(zip(splits["file"], splits["meta.split"], strict=True))
    assert by_file["0.png"] == "train" and by_file["11.png"] == "test", "the export's own split is kept"
    assert (splits.groupby("meta.group_id")["split"].nunique() == 1).all(), "one group_id, one split"
    hf = tmp_path / "hf"
    _write_hf_shard(hf / "s.parquet", [image_bytes()], ["roadwork"])
    pq.write_table(
        pq.read_table(hf / "s.parquet").append_column("split", pa.array(["test"])), hf / "s.parquet"
    )
    assert read_drop(hf).candidates["meta.split"].tolist() == ["test"]


@pytest.mark.parametrize("header", ["Group_ID", "GROUP_ID", "group id", " Group-Id "])
def test_a_group_column_spelt_another_way_still_groups_the_frames_of_one_video(
    tmp_path: Path, image_bytes: Callable[..., bytes], header: str
) -> None:
    """The default group column is a drop's `group_id`; a header `Group_ID` (Excel, pandas exports) was
    kept as it was spelt, and the frames of one video were spread over the splits without a word."""
    from roadwork_core.data.image_table import build_image_table
    from roadwork_core.data.splits import assign_splits

    rows = []
    for i in range(24):
        (tmp_path / f"{i}.png").write_bytes(
            image_bytes(fmt="PNG", colour=(i * 10, 255 - i * 10, (i * 57) % 256))
        )
        rows.append(f"{i}.png,{i % 2},video{i // 6}")
    (tmp_path / "labels.csv").write_text(f"file,label,{header}\n" + "\n".join(rows) + "\n")
    table = build_image_table([tmp_path], workers=1).images
    assert "meta.group_id" in table.columns and header not in table.columns, list(table.columns)
    splits = assign_splits(table)
    spread = splits.groupby("meta.group_id")["split"].nunique()
    assert (spread == 1).all(), f"frames of one video in several splits: {spread.to_dict()}"


def test_metadata_columns_that_would_share_a_name_are_refused_naming_both(tmp_path: Path) -> None:
    """`split` is kept as `meta.split`, which the csv also holds: pandas failed later, in the image
    table's output handler, with 'Duplicate column names found' naming neither the csv nor the columns."""
    (tmp_path / "labels.csv").write_text("file,label,Split,meta.split\na.jpg,1,train,x\n")
    with pytest.raises(ValueError, match="metadata columns clash") as info:
        read_drop(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "'Split' and 'meta.split' would both be 'meta.split'" in msg, msg
    assert "defines, ['split'], is kept" in msg, msg

    hf = tmp_path / "hf"
    _write_hf_shard(hf / "s.parquet", [b"x"], ["roadwork"])
    table = pq.read_table(hf / "s.parquet")
    table = table.append_column("split", pa.array(["test"])).append_column(
        "meta", pa.array([{"split": "a"}], type=pa.struct([("split", pa.string())]))
    )
    pq.write_table(table, hf / "s.parquet")
    with pytest.raises(ValueError, match="'split' and 'meta.split' would both be 'meta.split'"):
        read_drop(hf)


def test_a_csv_column_named_twice_is_refused_naming_its_positions(tmp_path: Path) -> None:
    """`note, note` (spaces around a name ignored): one of the two was dropped with only a pandas warning."""
    (tmp_path / "labels.csv").write_text("file,label,note, note\na.jpg,1,first,second\n")
    with pytest.raises(ValueError, match=r"names a column more than once.*'note' \(columns 3, 4\)"):
        read_drop(tmp_path)


# ---------------------------------------------------------------------------------------------
# labels.csv dialects and file entries


def test_labels_csv_row_with_extra_fields_is_an_error_naming_its_line(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text('file,label,notes\n"multi\nline.jpg",1,n\nb.jpg,0,n\nc.jpg,1,a, b\n')
    with pytest.raises(ValueError, match="not a readable CSV") as info:
        read_drop(tmp_path)
    msg = str(info.value)
    assert str(csv_path) in msg and "header has 3 fields" in msg
    assert "line 5: 'c.jpg,1,a, b' (4 fields)" in msg, "the line of the file, after a two-line record"
    assert 'Quote a value that contains the separator (comma), e.g. "a, b"' in msg
    # an extra but empty field (a trailing comma) carries nothing: read, not misparsed
    csv_path.write_text("file,label\na.jpg,1,\nb.jpg,0\n")
    cands = read_drop(tmp_path).candidates
    assert list(zip(cands["file"], cands["label_raw"], strict=True)) == [("a.jpg", "1"), ("b.jpg", "0")]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_labels_csv_semicolon_or_tab_separated_is_read(tmp_path: Path, sep: str) -> None:
    rows = [["file", "label", "camera"], ["a, b.jpg", "1", "cam 1"], ["c.jpg", "0", ""]]  # a comma in a name
    (tmp_path / "labels.csv").write_text("".join(sep.join(r) + "\n" for r in rows))
    cands = read_drop(tmp_path).candidates
    assert list(cands["file"]) == ["a, b.jpg", "c.jpg"]
    assert list(cands["label_raw"]) == ["1", "0"] and list(cands["camera"]) == ["cam 1", ""]


def test_labels_csv_file_entries_match_the_file_on_disk(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    import unicodedata

    from roadwork_core.data.image_table import build_image_table

    nfc, nfd = (unicodedata.normalize(f, "café.jpg") for f in ("NFC", "NFD"))
    names = {  # csv entry -> file on disk
        "sub\\a.jpg": "sub/a.jpg",  # written on Windows
        nfc: nfd,  # the csv says NFC, macOS stored NFD
        f"sub\\{nfc}": f"sub/{nfd}",
        " lead.jpg": " lead.jpg",  # the name really starts with a space
        " trail.jpg ": "trail.jpg",  # padding around a name that has none
    }
    for i, on_disk in enumerate(names.values()):
        (tmp_path / on_disk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / on_disk).write_bytes(image_bytes(colour=(i * 40, 10, 10)))
    entries = [*names, "sub\\missing.jpg"]
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f'"{e}",1\n' for e in entries))
    result = build_image_table([tmp_path], max_reject_fraction=1.0, workers=1)
    assert sorted(result.images["file"]) == sorted(names.values())
    assert all(Path(u).is_file() for u in result.images["uri"])
    assert result.rejects[["file", "reason", "detail"]].values.tolist() == [
        ["sub/missing.jpg", "unreadable", "file does not exist; fix the file entry or add the file"]
    ]


def test_fingerprint_ignores_os_litter_and_sees_every_real_change(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    from roadwork_core.data.fingerprint import drop_fingerprint

    drop = _put(tmp_path / "v0001", {"roadwork/a.jpg": image_bytes(), "no_roadwork/b.jpg": image_bytes()})
    before = drop_fingerprint(drop)
    _put(drop, {"roadwork/Thumbs.db": b"x", "__MACOSX/roadwork/._a.jpg": b"y", ".DS_Store": b"z"})
    assert drop_fingerprint(drop) == before, "OS litter is skipped by every reader: it changes no version"
    _put(drop, {"roadwork/c.jpg": image_bytes()})
    assert drop_fingerprint(drop) != before


def test_labels_csv_header_names_are_case_insensitive(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    drop = _put(tmp_path, {"a.jpg": image_bytes(), "b.jpg": image_bytes()})
    (drop / "labels.csv").write_text("File,LABEL,Weather\na.jpg,1,rain\nb.jpg,0,sun\n")
    listing = read_drop(drop)
    assert listing.candidates["file"].tolist() == ["a.jpg", "b.jpg"] and not listing.rejects
    assert listing.candidates["label_raw"].tolist() == ["1", "0"]
    assert listing.candidates["Weather"].tolist() == ["rain", "sun"], "metadata keeps its spelling"


def test_labels_csv_in_utf16_with_a_bom_is_read(tmp_path: Path, image_bytes: Callable[..., bytes]) -> None:
    drop = _put(tmp_path, {"café.jpg": image_bytes(), "b.jpg": image_bytes()})
    (drop / "labels.csv").write_bytes("file,label\ncafé.jpg,1\nb.jpg,0\n".encode("utf-16"))  # BOM first
    listing = read_drop(drop)
    assert listing.candidates["file"].tolist() == ["café.jpg", "b.jpg"] and not listing.rejects
    (drop / "labels.csv").write_bytes("file,label\ncafé.jpg,1\n".encode("latin-1"))  # no BOM: ambiguous
    with pytest.raises(ValueError, match="write it as UTF-8"):
        read_drop(drop)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("v0001", None),
        ("2026-12-01 night", None),
        ("v2.1_fix", None),
        ("v0002...copy", "'...'"),
        ("v1,2", "','"),
        ("v1\tcopy", "control character"),
        ("v1\n", "control character"),
        (" v3", "whitespace"),
        (os.fsdecode(b"caf\xe9"), "not UTF-8"),
    ],
)
def test_version_name_problem_names_what_dagster_cannot_take(name, problem) -> None:
    found = version_name_problem(name)
    if problem is None:
        assert found is None, f"{name!r} should be a valid version: {found}"
    else:
        assert found is not None and problem in found, f"{name!r}: {found}"


def test_ready_drops_with_unusable_names_are_listed_apart_with_the_fix(tmp_path) -> None:
    """A drop folder whose name cannot be a dataset version is in no version (it would crash the storage,
    or make the UI launch the wrong partitions) and is listed with the problem and the fix instead."""
    for name in ("v0001", "v0002...copy", "v1,2", os.fsdecode(b"caf\xe9")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "_READY").write_text("\n")
    (tmp_path / "v0003").mkdir()  # not ready: in neither list
    assert list_ready_drops(tmp_path) == ["v0001"]
    unusable = unusable_ready_drops(tmp_path)
    assert sorted(unusable) == ["caf\\xe9", "v0002...copy", "v1,2"], unusable
    assert all("rename the folder" in why for why in unusable.values()), unusable
    assert drops_up_to(tmp_path, "v0001") == [tmp_path / "v0001"]


def test_a_drop_of_unlabelled_images_only_adds_to_the_pool_and_blocks_nothing(tmp_path: Path) -> None:
    """v0002 holds only `unlabelled/` (new pool images): every version from v0002 on failed with `cannot tell
    the format of drop`. It now adds no labelled image, and v0003 builds on v0001 and v0003."""
    from roadwork_core.data.drops import drops_up_to, list_unlabelled, read_drop
    from roadwork_core.data.image_table import build_image_table
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=12, seed=1, scale=0.5)
    make_demo_drop(inbox, "v0003", n=12, seed=3, scale=0.5)
    pool = inbox / "v0002" / "unlabelled"
    pool.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), (10 * i, 90, 140)).save(pool / f"p{i}.jpg")
    (inbox / "v0002" / ".DS_Store").write_bytes(b"junk")
    (inbox / "v0002" / "_READY").touch()
    assert len(read_drop(inbox / "v0002").candidates) == 0
    assert len(read_drop(inbox / "v0002", fmt="labels_csv").candidates) == 0
    assert len(list_unlabelled(inbox / "v0002")) == 3
    table = build_image_table(drops_up_to(inbox, "v0003")).images
    assert sorted(table["source"].unique()) == ["v0001", "v0003"] and len(table) == 24
    (inbox / "v0002" / "notes.txt").write_text("a stray file")  # anything else: the format must be named
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_drop(inbox / "v0002")


def test_drop_signature_sees_what_the_sensor_must_and_keeps_the_digest_stored_cursors_hold(
    tmp_path: Path,
) -> None:
    """The new-drop sensor compares each launched drop's signature with the one in its cursor: a changed
    file, size or mtime, or an added or removed image changes it; `_READY`, OS litter and symlinked folders
    do not count. The digest is the one the earlier rglob-based signature wrote (the reference below), so
    a cursor written by it does not see every launched drop as changed after an upgrade."""
    import hashlib

    from roadwork_core.data.fingerprint import _junk, drop_signature

    drop = tmp_path / "v0001"
    for rel in ("a/b/1.jpg", "a-b/2.jpg", "a.jpg", "a-c.jpg", "sub/_x/3.jpg", "real/4.jpg", "Ä.jpg", "sp ace.jpg",
                "__MACOSX/x.jpg", ".hidden/y.jpg", "Thumbs.db", ".DS_Store", "_READY", "sub/_READY"):  # fmt: skip
        (drop / rel).parent.mkdir(parents=True, exist_ok=True)
        (drop / rel).write_bytes(b"x" * len(rel))
    (drop / "sub" / "linkdir").symlink_to(drop / "real")
    (drop / "link.jpg").symlink_to(drop / "real" / "4.jpg")
    (drop / "broken.jpg").symlink_to(drop / "nowhere")

    def reference(d: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(p for p in d.rglob("*") if p.is_file() and p.name != "_READY" and not _junk(p, d)):
            info = p.stat()
            h.update(f"{p.relative_to(d).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return h.hexdigest()

    first = drop_signature(drop)
    assert first == reference(drop)
    for litter in ("Thumbs.db", "_READY", "__MACOSX/x.jpg", "real/.DS_Store"):
        (drop / litter).write_bytes(b"changed litter")
    assert drop_signature(drop) == first, "litter, _READY or a symlinked folder changed the signature"
    os.utime(drop / "a.jpg", ns=(1, 1))
    touched = drop_signature(drop)
    assert touched != first, "a new mtime must change the signature"
    (drop / "a" / "b" / "5.jpg").write_bytes(b"new")
    assert drop_signature(drop) not in (first, touched), "an added image must change the signature"
    assert drop_signature(drop) == reference(drop)


def test_splits_wait_for_a_started_earlier_version_but_not_forever_for_a_queued_one() -> None:
    """An earlier version's run that is only queued may sit behind this run (retrain runs go one at a time):
    waiting 10 minutes for it used to end in a bare 'Exceeded max_retries of 60'. Now: wait while it runs,
    give a queued one three tries, then fail naming the run and what to do."""
    import logging
    import types
    import uuid

    import dagster as dg

    from roadwork_assets import data
    from roadwork_assets.partitions import dataset_version

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(dataset_version.name, ["v1", "v2", "v3"])

        def context(attempt: int):
            return types.SimpleNamespace(
                partition_key="v3", instance=instance, retry_number=attempt, log=logging.getLogger("t")
            )

        def add_run(status: dg.DagsterRunStatus) -> str:
            run_id = str(uuid.uuid4())
            tags = {"dagster/partition": "v2"}
            instance.add_run(dg.DagsterRun(job_name="retrain_job", run_id=run_id, status=status, tags=tags))
            return run_id

        queued = add_run(
            dg.DagsterRunStatus.NOT_STARTED
        )  # QUEUED needs a code location origin; same handling
        with pytest.raises(dg.RetryRequested):
            data._require_earlier_splits(context(0), "v1")
        with pytest.raises(
            dg.Failure, match=rf"\{{'v2': \['{queued[:8]}'\]\}} are still queued .*behind this run"
        ):
            data._require_earlier_splits(context(data._QUEUED_WAITS), "v1")
        started = add_run(dg.DagsterRunStatus.STARTED)
        with pytest.raises(dg.RetryRequested):  # a started run is waited for, past the queued tries
            data._require_earlier_splits(context(data._QUEUED_WAITS), "v1")
        with pytest.raises(dg.Failure, match=rf"{started[:8]}.* are still running after 600 s"):
            data._require_earlier_splits(context(data._MAX_WAITS), "v1")


def test_a_named_pipe_or_an_outside_link_in_a_class_folder_is_not_opened(
    tmp_path: Path, image_bytes: Callable[..., bytes]
) -> None:
    """Files of an unusual suffix are identified by their content: that must not open a named pipe (the
    read blocks for ever) nor follow a link out of the drop."""
    import threading

    drop = tmp_path / "drop"
    for folder in ("roadwork", "no_roadwork"):
        (drop / folder).mkdir(parents=True)
        (drop / folder / f"{folder}.jpg").write_bytes(image_bytes())
    os.mkfifo(drop / "roadwork" / "cam.stream")
    outside = tmp_path / "outside_fifo"
    os.mkfifo(outside)
    (drop / "no_roadwork" / "x.dat").symlink_to(outside)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(read_drop(drop, "imagefolder")), daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        for fifo in (drop / "roadwork" / "cam.stream", outside):  # unblock the reader so the thread ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_drop blocked on a named pipe")
    [listing] = result
    assert sorted(listing.candidates["file"]) == ["no_roadwork/no_roadwork.jpg", "roadwork/roadwork.jpg"]
    notice = {r.reason: r.detail for r in listing.rejects}["not_an_image_file"]
    assert "roadwork/cam.stream" in notice and "no_roadwork/x.dat" in notice, notice
