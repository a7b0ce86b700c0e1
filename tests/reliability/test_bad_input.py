"""Bad input at every entry point: the user gets an error (or a reject row) naming the input.

One case here = one row of docs/bad_inputs.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from roadwork_core.bundle.bundle import Bundle
from roadwork_core.bundle.predict_cli import add_predict_arguments, run_predict
from roadwork_core.bundle.schema import BundleError, manifest_digest
from roadwork_core.data.drops import drops_up_to
from roadwork_core.data.image_table import TooManyRejects, build_image_table

torch.set_num_threads(1)


def _jpeg(colour=(200, 90, 20), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _drop(root: Path, files: dict[str, bytes], csv: str | None, ready: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if csv is not None:
        (root / "labels.csv").write_text(csv)
    if ready:
        (root / "_READY").touch()
    return root


# ---------------------------------------------------------------------------------------------------
# drops (labels.csv)


@pytest.mark.parametrize(
    "csv, match",
    [
        ("name,label\na.jpg,1\n", r"labels\.csv lacks column\(s\) \['file'\]"),
        ("file,class\na.jpg,1\n", r"labels\.csv lacks column\(s\) \['label'\]"),
        ("", r"labels\.csv is not a readable CSV"),
        ("file,label\n", r"no images found in drops"),
    ],
    ids=["no-file-column", "no-label-column", "empty-file", "header-only"],
)
def test_labels_csv_structure_errors_name_the_csv(tmp_path: Path, csv: str, match: str) -> None:
    drop = _drop(tmp_path / "v0001", {"a.jpg": _jpeg()}, csv)
    with pytest.raises(ValueError, match=match) as info:
        build_image_table([drop])
    assert str(drop) in str(info.value), f"the error must name the drop or its csv: {info.value}"
    if csv == "file,label\n":  # and it says which image file the csv left out
        assert "1 image file(s) in the drop are not listed in labels.csv" in str(info.value), info.value


def test_a_labels_csv_that_lists_a_subset_is_a_notice_not_a_reject_storm(tmp_path: Path) -> None:
    files = {f"img{i}.jpg": _jpeg((20 * i, 90, 20)) for i in range(8)}
    drop = _drop(tmp_path / "v0001", files, "file,label\nimg0.jpg,1\nimg1.jpg,0\nimg2.jpg,1\n")
    result = build_image_table([drop])  # 5 unlisted of 8: far above the 5 % limit were they rejects
    assert sorted(result.images["file"]) == ["img0.jpg", "img1.jpg", "img2.jpg"]
    notice = result.rejects.set_index("reason").loc["not_in_labels_csv"]
    assert "5 image file(s)" in notice["detail"] and result.n_candidates == 3, notice["detail"]


def _noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    PIL.Image.effect_noise((128, 128), 64).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A 9000x9000 1-bit PNG (~10 kB on disk, 81 Mpx decoded): over the 8192^2 pixel limit."""
    buf = io.BytesIO()
    PIL.Image.new("1", (9000, 9000), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_rows_are_rejected_each_naming_file_and_reason(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(_jpeg((1, 2, 3)))
    good = {f"ok{i}.jpg": _jpeg((10 * i, 100, 50)) for i in range(4)}
    bad = {
        "page.jpg": b"<!doctype html><html><body>404 Not Found</body></html>",
        "notes.jpg": b"just some text\n",
        "empty.jpg": b"",
        "cut.jpg": _noisy_jpeg()[:2000],
        "bomb.png": _bomb_png(),
        "tiny.jpg": _jpeg(size=(8, 8)),
    }
    drop = _drop(tmp_path / "v0001", {**good, **bad}, None)
    (drop / "link.jpg").symlink_to(outside)
    (drop / "folder.jpg").mkdir()
    rows = [f"{n},{i % 2}" for i, n in enumerate(good)]
    rows += [f"{n},1" for n in bad]
    rows += [
        "ok0.jpg,maybe",
        "ok1.jpg,2",
        "../outside.jpg,1",
        "/etc/hostname,1",
        "link.jpg,0",
        "folder.jpg,0",
    ]
    rows += ["missing.jpg,1"]
    (drop / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")

    result = build_image_table([drop], max_reject_fraction=1.0)
    got = {(r.file, r.reason) for r in result.rejects.itertuples()}
    expected = {
        ("page.jpg", "unreadable"), ("notes.jpg", "unreadable"), ("empty.jpg", "unreadable"),
        ("cut.jpg", "truncated"), ("bomb.png", "too_large"), ("tiny.jpg", "too_small"),
        ("ok0.jpg", "bad_label"), ("ok1.jpg", "bad_label"), ("../outside.jpg", "path_escape"),
        ("/etc/hostname", "path_escape"), ("link.jpg", "symlink_outside"), ("folder.jpg", "unreadable"),
        ("missing.jpg", "unreadable"),
    }  # fmt: skip
    assert expected <= got, f"missing rejects: {expected - got}"
    assert all(r.detail for r in result.rejects.itertuples()), "every reject must say why"
    assert set(result.images["file"]) == set(good), "only the good images are accepted"

    with pytest.raises(TooManyRejects, match=r"(?s)rejected .*By reason:.*Fix or remove") as info:
        build_image_table([drop], max_reject_fraction=0.05)
    assert "v0001/../outside.jpg: path_escape" in str(info.value), (
        f"the run error must name the first bad files: {info.value}"
    )


def test_drop_without_ready_is_not_a_version(tmp_path: Path) -> None:
    _drop(tmp_path / "v0001", {"a.jpg": _jpeg()}, "file,label\na.jpg,1\n", ready=False)
    with pytest.raises(ValueError, match=r"'v0001' is not a ready drop.*v0001/_READY") as info:
        drops_up_to(tmp_path, "v0001")
    assert "ready: none" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Hugging Face parquet drops


def _image_struct(data: bytes | None) -> dict:
    return {"bytes": data, "path": "x.jpg"}


def _shard(drop: Path, table: pa.Table) -> Path:
    (drop / "data").mkdir(parents=True, exist_ok=True)
    path = drop / "data" / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    (drop / "_READY").touch()
    return path


@pytest.mark.parametrize(
    "table, match",
    [
        (
            pa.table({"img": [_image_struct(_jpeg())], "label": [1]}),
            r"has columns \['img', 'label'\].*`image`",
        ),
        (pa.table({"image": ["x.jpg"], "label": [1]}), r"column `image` has type string; expected a struct"),
        (None, r"is not a readable parquet file"),
    ],
    ids=["missing-image-column", "image-column-wrong-type", "not-parquet"],
)
def test_parquet_structure_errors_name_the_shard(tmp_path: Path, table, match: str) -> None:
    drop = tmp_path / "v0001"
    if table is None:
        path = drop / "data" / "train.parquet"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"<html>rate limited</html>")
    else:
        path = _shard(drop, table)
    with pytest.raises(ValueError, match=match) as info:
        build_image_table([drop], fmt="hf_parquet")
    assert str(path) in str(info.value), f"the error must name the shard: {info.value}"


def test_parquet_bad_rows_are_rejected_by_row(tmp_path: Path) -> None:
    good = [_image_struct(_jpeg((20 * i, 90, 40))) for i in range(4)]
    table = pa.table(
        {
            "image": [
                *good,
                _image_struct(None),
                _image_struct(b"\x00" * 64),
                _image_struct(_jpeg((5, 5, 5))),
            ],
            "label": pa.array(["0", "1", "0", "1", "1", "0", "0.5"]),
        }
    )
    drop = tmp_path / "v0001"
    _shard(drop, table)
    result = build_image_table([drop], fmt="hf_parquet", max_reject_fraction=1.0)
    got = {(r.file, r.reason) for r in result.rejects.itertuples()}
    shard = "data/train-00000-of-00001.parquet#row="
    assert {(shard + "4", "unreadable"), (shard + "5", "unreadable"), (shard + "6", "bad_label")} <= got, got
    assert len(result.images) == 4


# ---------------------------------------------------------------------------------------------------
# roadwork predict


def _predict(bundle_dir: Path, images: list[str], stdin: str | None = None) -> tuple[int, list[dict], str]:
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(["--bundle", str(bundle_dir), *images])
    out, err = io.StringIO(), io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        code = run_predict(args, stdout=out, stdin=io.StringIO(stdin) if stdin is not None else None)
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def test_predict_bad_files_each_get_an_error_line_naming_them(tiny_bundle: dict, tmp_path: Path) -> None:
    text = tmp_path / "readme.jpg"
    text.write_text("not an image")
    folder = tmp_path / "a_directory"
    folder.mkdir()
    missing = tmp_path / "nope.jpg"
    good = str(tiny_bundle["images"][0])
    inputs = [good, str(missing), str(text), str(folder), good]
    code, lines, _ = _predict(tiny_bundle["bundle_dir"], inputs)
    assert code == 1, "a bad image must make the exit code 1"
    assert [line["image"] for line in lines] == inputs, "one line per input, in order"
    for line, name in zip(lines[1:4], ["nope.jpg", "readme.jpg", "a_directory"], strict=True):
        assert name in line.get("error", ""), f"the error line must name {name}: {line}"
    assert "decision" in lines[0] and "decision" in lines[4], "good images are still predicted"


def test_predict_stdin_bad_base64_and_non_image(tiny_bundle: dict) -> None:
    good = base64.b64encode(tiny_bundle["images"][0].read_bytes()).decode()
    stdin = f"{good}\n%%% not base64 %%%\n{base64.b64encode(b'hello').decode()}\n"
    code, lines, _ = _predict(tiny_bundle["bundle_dir"], [], stdin)
    assert code == 1 and [line["image"] for line in lines] == ["stdin:0", "stdin:1", "stdin:2"]
    assert "stdin:1" in lines[1]["error"] and "base64" in lines[1]["error"]
    assert "stdin:2" in lines[2]["error"] and "not a readable image" in lines[2]["error"]


def test_predict_stdin_wrapped_base64_says_how_to_send_it(tiny_bundle: dict) -> None:
    import textwrap

    wrapped = textwrap.fill(base64.b64encode(tiny_bundle["images"][0].read_bytes()).decode(), 76)  # `base64`
    assert len(wrapped.splitlines()) > 2
    code, lines, _ = _predict(tiny_bundle["bundle_dir"], [], wrapped + "\n")
    assert code == 1 and "base64 -w0" in lines[0]["error"] and "wrapped" in lines[0]["error"], lines[0]

    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        ["--bundle", str(tiny_bundle["bundle_dir"]), "--answer"]
    )
    out, err = io.StringIO(), io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        run_predict(args, stdout=out, stdin=io.StringIO("%%%\n"))
    assert err.getvalue().count("stdin:0") == 1, f"the image is named once: {err.getvalue()}"


def test_predict_empty_stdin_says_so(tiny_bundle: dict) -> None:
    code, lines, err = _predict(tiny_bundle["bundle_dir"], [], "")
    assert lines == [], "no input, no prediction lines"
    assert code == 1 and "no images" in err and "stdin" in err, (
        f"empty stdin must be reported: {code} {err!r}"
    )


def test_predict_refuses_unusable_bundles_naming_them(tiny_bundle: dict, tmp_path: Path) -> None:
    image = str(tiny_bundle["images"][0])
    a_file = tmp_path / "bundle.tar"
    a_file.write_bytes(b"not a directory")
    for bundle_dir, expect in [
        (tmp_path / "does-not-exist", "is not a directory"),
        (a_file, "is not a directory"),
        (tmp_path, "manifest.json is missing"),
    ]:
        code, lines, err = _predict(bundle_dir, [image])
        assert code == 2 and lines == [], f"{bundle_dir}: expected exit 2 and no predictions"
        assert str(bundle_dir) in err and expect in err, f"stderr must name {bundle_dir}: {err!r}"


# ---------------------------------------------------------------------------------------------------
# bundle load


def _copy_bundle(tiny_bundle: dict, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_bundle["bundle_dir"], tmp_path / "bundle"))


def test_bundle_load_bad_schema_versions(tiny_bundle: dict, tmp_path: Path) -> None:
    bundle_dir = _copy_bundle(tiny_bundle, tmp_path)
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for value, match in [
        ("1", "expected an integer"),
        (None, "expected an integer"),
        (99, "Upgrade roadwork"),
    ]:
        doc = {**manifest, "schema_version": value}
        doc["content_sha256"] = manifest_digest(doc)
        manifest_path.write_text(json.dumps(doc))
        with pytest.raises(BundleError, match=match) as info:
            Bundle.load(bundle_dir)
        assert str(manifest_path) in str(info.value)
    manifest_path.write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        Bundle.load(bundle_dir)


def test_a_file_name_that_is_not_utf8_is_rejected_and_every_table_still_writes(tmp_path: Path) -> None:
    import os

    from roadwork_core.data.pool import filter_unlabelled_pool
    from roadwork_resources.io_manager import write_artifact

    drop = _drop(tmp_path / "v0001", {f"roadwork/r{i}.jpg": _jpeg((10 * i, 90, 20)) for i in range(20)}, None)
    _drop(drop, {f"no_roadwork/n{i}.jpg": _jpeg((20, 10 * i, 90)) for i in range(20)}, None)
    latin1 = os.path.join(os.fsencode(drop / "roadwork"), b"caf\xe9.jpg")  # a Latin-1 name from an old zip
    with open(latin1, "wb") as f:
        f.write(_jpeg((1, 2, 3)))
    result = build_image_table([drop])
    assert len(result.images) == 40
    reject = result.rejects.set_index("reason").loc["bad_filename"]
    assert reject["file"] == "roadwork/caf\\xe9.jpg" and "convmv" in reject["detail"], reject.to_dict()
    write_artifact(tmp_path / "images", result.images)  # parquet takes only UTF-8
    write_artifact(tmp_path / "rejects", result.rejects)

    pool = filter_unlabelled_pool([os.fsdecode(latin1)], result.images.assign(split="val_test").head(1))
    assert pool.kept == [] and pool.dropped["reason"].tolist() == ["bad_filename"]
    write_artifact(tmp_path / "pool_rejects", pool.dropped)


def test_a_tiff_whose_tag_has_the_wrong_type_is_rejected_not_a_crash(tiny_bundle: dict) -> None:
    """Bytes from a fuzzing run: Pillow's TIFF plugin raises TypeError (not OSError) while decoding them.
    Every entry point must still turn that into a reject naming the input: never a 500 or a traceback."""
    from fastapi.testclient import TestClient

    from roadwork_core.data.images import ImageRejected, decode_image
    from roadwork_core.serving.app import create_app
    from roadwork_core.serving.slot import BundleSlot, Candidate, load_verified

    data = (Path(__file__).resolve().parents[1] / "data" / "hostile_tiff_tag_type.tif").read_bytes()
    with pytest.raises(ImageRejected) as info:
        decode_image(data, source="fuzz.tif")
    assert info.value.reason == "unreadable" and "TypeError" in info.value.detail, info.value

    slot = BundleSlot(load_verified(Candidate(path=tiny_bundle["bundle_dir"])))
    with TestClient(create_app(slot)) as client:
        reply = client.post("/predict", json={"image": base64.b64encode(data).decode()})
    assert reply.status_code == 422 and "unreadable" in reply.json()["error"], reply.text


def test_a_pil_image_keeps_its_exif_orientation_like_a_path_does(tiny_bundle: dict, tmp_path: Path) -> None:
    bundle = Bundle.load(tiny_bundle["bundle_dir"])
    # a left-to-right gradient: turned a quarter, the canvas is a top-to-bottom one (not noise, which the
    # tiny bundle's 86 px canvas would average to grey either way)
    ramp = np.broadcast_to(np.linspace(0, 255, 160, dtype=np.float32)[None, :, None], (90, 160, 3))
    upright = PIL.Image.fromarray(np.ascontiguousarray(ramp).astype(np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees
    path = tmp_path / "phone.jpg"
    upright.save(path, quality=95, exif=exif.tobytes())
    from roadwork_core.bundle.decode import to_canvas

    size = bundle.canvas_size
    from_pil, from_path = to_canvas(PIL.Image.open(path), "pil", size), to_canvas(path, "path", size)
    assert torch.equal(from_pil, from_path), "a PIL image and its file must give the same canvas"
    sideways = to_canvas(PIL.Image.fromarray(np.asarray(PIL.Image.open(path))), "pixels", size)  # no EXIF
    assert not torch.equal(sideways, from_path), "the test must see the rotation"
    p_pil, p_path = bundle.predict([PIL.Image.open(path), path])
    assert p_pil.p_roadwork == pytest.approx(p_path.p_roadwork, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# hostile drops (an audit's findings): each was a crash, a hang, or silently wrong labels


def test_a_second_label_column_in_another_case_is_an_error_not_silent_relabelling(tmp_path: Path) -> None:
    files = {f"{n}.jpg": _jpeg((60 * i, 90, 20)) for i, n in enumerate("abc")}
    drop = _drop(tmp_path / "v0001", files, "file,label,Label\na.jpg,1,0\nb.jpg,0,1\nc.jpg,1,0\n")
    with pytest.raises(
        ValueError, match=r"2 columns named label .*'label' \(column 2\), 'Label' \(column 3\)"
    ):
        build_image_table([drop])


@pytest.mark.parametrize(
    "raw",
    [
        b"sep=;\nfile;label\na.jpg;1\nb.jpg;0\n",  # Excel's separator line
        "file,label\na.jpg,1\nb.jpg,0\n".encode("utf-16-le"),  # UTF-16 without its BOM
        b"file,label\nA.JPG,1\nB.jpg,0\n",  # written where file names ignore case
    ],
    ids=["excel-sep-line", "utf16-no-bom", "case-of-names"],
)
def test_labels_csv_variants_that_excel_and_windows_write_are_read(tmp_path: Path, raw: bytes) -> None:
    drop = _drop(tmp_path / "v0001", {"a.jpg": _jpeg((200, 9, 9)), "b.jpg": _jpeg((9, 9, 200))}, None)
    (drop / "labels.csv").write_bytes(raw)
    result = build_image_table([drop], max_reject_fraction=0.0)
    assert dict(zip(result.images["file"], result.images["label"])) == {"a.jpg": 1, "b.jpg": 0}


def test_loops_pipes_huge_and_nameless_entries_are_rejects_not_crashes_or_hangs(tmp_path: Path) -> None:
    import os

    from roadwork_core.data.drops import list_unlabelled

    good = {f"ok{i}.jpg": _jpeg((30 * i, 100, 50)) for i in range(4)}
    drop = _drop(tmp_path / "v0001", good, None)
    (drop / "loop_a.jpg").symlink_to(drop / "loop_b.jpg")
    (drop / "loop_b.jpg").symlink_to(drop / "loop_a.jpg")
    os.mkfifo(drop / "pipe.jpg")  # read whole, it blocks for ever
    with open(drop / "huge.jpg", "wb") as f:  # sparse: no disk used
        f.truncate((512 << 20) + 1)
    (drop / "unlabelled").mkdir()
    (drop / "unlabelled" / "u.jpg").write_bytes(_jpeg())
    (drop / "unlabelled" / "self.jpg").symlink_to(drop / "unlabelled" / "self.jpg")
    rows = [f"{n},{i % 2}" for i, n in enumerate(good)] + ["loop_a.jpg,1", "pipe.jpg,0", "huge.jpg,1", ",1"]
    (drop / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")

    result = build_image_table([drop], max_reject_fraction=1.0)
    got = {r.file: (r.reason, r.detail) for r in result.rejects.itertuples()}
    assert got["loop_a.jpg"][0] == "unreadable" and "symlink loop" in got["loop_a.jpg"][1], got
    assert got["pipe.jpg"] == (
        "unreadable",
        "a named pipe, not a regular file; replace it with the image file",
    )
    assert got["huge.jpg"][0] == "too_large" and "536870913 bytes" in got["huge.jpg"][1], got
    assert "labels.csv row 8" in got and "empty file entry" in got["labels.csv row 8"][1], got
    assert set(result.images["file"]) == set(good)
    assert list_unlabelled(drop) == [str(drop / "unlabelled" / "u.jpg")], "the looping pool file is left out"


def test_too_many_rejects_are_all_written_to_the_rejects_file_by_the_asset(
    tmp_path: Path, monkeypatch
) -> None:
    import dagster as dg

    from roadwork_assets.data import ImageTableConfig, image_table
    from roadwork_resources.artifact_store import ArtifactStore
    from roadwork_resources.dataset import DatasetSource

    files = {f"ok{i}.jpg": _jpeg((30 * i, 100, 50)) for i in range(4)}
    files |= {f"bad{i}.jpg": b"not an image" for i in range(9)}
    inbox = tmp_path / "inbox"
    _drop(inbox / "v0001", files, "file,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(files)))
    store = ArtifactStore(root=str(tmp_path / "state"))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("dataset_version", ["v0001"])
        context = dg.build_asset_context(partition_key="v0001", instance=instance)
        with pytest.raises(dg.Failure) as info:
            image_table(context, ImageTableConfig(), DatasetSource(inbox=str(inbox)), store)
    path = Path(info.value.metadata["rejects_path"].value)
    assert f"All 9 rejects (file, source, reason, detail): {path}" in info.value.description
    import pandas as pd

    assert sorted(pd.read_parquet(path)["file"]) == [f"bad{i}.jpg" for i in range(9)], "every reject is kept"


def test_sidecars_in_class_folders_are_a_notice_and_mpo_files_are_images(tmp_path: Path) -> None:
    drop = tmp_path / "v0001"
    for i, folder in enumerate(("roadwork", "no_roadwork") * 3):
        _drop(drop / folder, {f"IMG_{i}.JPG": _jpeg((40 * i, 90, 20))}, None, ready=False)
        (drop / folder / f"IMG_{i}.AAE").write_text("<?xml version='1.0'?><plist/>")  # iPhone edits
        (drop / folder / f"IMG_{i}.JPG.json").write_text("{}")  # Google Takeout
    (drop / "stray.MPO").write_bytes(_jpeg())
    # images whose suffix is not a usual one (a browser's `photo.jpg_large`, an editor's backup `~`, PPM,
    # TGA): identified by their content and read; they were a notice, so a whole class could vanish
    odd = {"roadwork/frame.ppm": "PPM", "roadwork/sign.tga": "TGA", "no_roadwork/street.jpg_large": "JPEG"}
    for i, (rel, fmt) in enumerate(odd.items()):
        buf = io.BytesIO()
        PIL.Image.new("RGB", (48, 40), (30 * i, 200, 90)).save(buf, fmt)
        (drop / rel).write_bytes(buf.getvalue())
    (drop / "_READY").touch()
    result = build_image_table([drop], max_reject_fraction=1 / 10)  # the stray image only
    assert len(result.images) == 6 + len(odd), sorted(result.images["file"])
    assert set(odd) <= set(result.images["file"])
    notice = result.rejects.set_index("reason").loc["not_an_image_file"]
    assert "12 file(s)" in notice["detail"] and ".AAE" in notice["detail"], notice["detail"]
    # an image outside every class folder is named, whatever camera suffix it has
    assert "stray.MPO" in set(result.rejects.loc[result.rejects["reason"] == "no_class_folder", "file"])


def test_transparency_colour_profiles_and_closed_images_decode_like_a_browser(tmp_path: Path) -> None:
    from PIL import ImageCms

    from roadwork_core.bundle.decode import to_canvas
    from roadwork_core.data.images import ImageRejected, decode_image

    rgb = np.full((40, 60, 3), 90, np.uint8)
    rgb[:, :20] = 0  # the colour a tRNS chunk marks transparent
    for img, key in ((PIL.Image.fromarray(rgb), (0, 0, 0)), (PIL.Image.fromarray(rgb[..., 0]), 0)):
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=key)
        assert np.asarray(decode_image(buf.getvalue(), source="t.png"))[:, :20].min() == 255, img.mode

    # Display P3 pixels of an sRGB orange, tagged with their profile (as an iPhone writes): read back as that
    # orange, not as P3 numbers taken for sRGB ones
    p3 = _matrix_trc_profile(
        "Display P3", [(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)]
    )
    srgb = ImageCms.createProfile("sRGB")
    orange = PIL.Image.new("RGB", (32, 32), (255, 110, 0))
    as_p3 = ImageCms.applyTransform(
        orange, ImageCms.buildTransform(srgb, ImageCms.ImageCmsProfile(io.BytesIO(p3)), "RGB", "RGB")
    )
    assert np.abs(np.asarray(as_p3)[0, 0].astype(int) - [255, 110, 0]).max() > 10, "P3 numbers differ"
    buf = io.BytesIO()
    as_p3.save(buf, "PNG", icc_profile=p3)
    read = np.asarray(decode_image(buf.getvalue(), source="p3.png")).astype(int)
    assert np.abs(read[0, 0] - [255, 110, 0]).max() <= 3, read[0, 0]

    path = tmp_path / "a.jpg"
    PIL.Image.fromarray(rgb).save(path)
    with PIL.Image.open(path) as closed:
        pass
    with pytest.raises(ImageRejected, match=r"closed\.jpg: unreadable .*file was closed"):
        to_canvas(closed, "closed.jpg", 64)


def test_grey_palette_and_16_bit_images_with_a_colour_profile_decode_like_a_colour_managed_viewer() -> None:
    """A Photoshop greyscale JPEG (Gray Gamma 1.8), its 16-bit PNG and LA forms, and a pngquant palette PNG
    of a P3 screenshot: their profiles were ignored (mean pixel error 17 against a colour-managed viewer),
    while the same pixels saved as RGB with the same profile were converted."""
    from PIL import ImageCms

    from roadwork_core.data.images import decode_image

    def saved(img: PIL.Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    gamma18 = _grey_profile(1.8)
    grey = PIL.Image.new("L", (16, 16), 100)  # (100 / 255) ** 1.8 linear light is sRGB 119
    for name, img in (
        ("grey.jpg", grey),
        ("grey.png", grey),
        ("grey16.png", PIL.Image.fromarray(np.full((16, 16), 100 * 257, np.uint16))),
        ("grey_alpha.png", grey.convert("LA")),
    ):
        data = saved(img, "JPEG" if name.endswith(".jpg") else "PNG", icc_profile=gamma18)
        got = np.asarray(decode_image(data, source=name)).astype(int)
        assert np.abs(got - 119).max() <= 1, (name, got[0, 0])
        assert np.asarray(decode_image(saved(img, "PNG"), source=name)).max() == 100, "no profile: as stored"

    p3 = _matrix_trc_profile(
        "Display P3", [(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)]
    )
    to_p3 = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(io.BytesIO(p3)), "RGB", "RGB"
    )
    as_p3 = ImageCms.applyTransform(PIL.Image.new("RGB", (32, 32), (255, 110, 0)), to_p3)
    palette = as_p3.quantize(colors=16)
    rgb_read = np.asarray(
        decode_image(saved(palette.convert("RGB"), "PNG", icc_profile=p3), source="rgb.png")
    )
    palette_read = np.asarray(decode_image(saved(palette, "PNG", icc_profile=p3), source="palette.png"))
    assert np.array_equal(palette_read, rgb_read), "a palette image must convert as its RGB twin does"
    assert np.abs(palette_read[0, 0].astype(int) - [255, 110, 0]).max() <= 3, palette_read[0, 0]

    # a profile that does not fit the pixels (an RGB profile on a grey image, a grey one on RGB) is ignored,
    # as a browser does: LittleCMS's error (a plain Exception in Pillow 13) made these `unreadable` rejects
    for name, img, profile, want in (
        ("grey_rgb_profile.jpg", grey, p3, [100, 100, 100]),
        (
            "grey16_rgb_profile.png",
            PIL.Image.fromarray(np.full((16, 16), 100 * 257, np.uint16)),
            p3,
            [100] * 3,
        ),
        ("rgb_grey_profile.png", PIL.Image.new("RGB", (16, 16), (200, 10, 10)), gamma18, [200, 10, 10]),
    ):
        data = saved(img, "JPEG" if name.endswith(".jpg") else "PNG", icc_profile=profile)
        got = np.asarray(decode_image(data, source=name)).astype(int)
        assert np.abs(got[0, 0] - want).max() <= 2, (name, got[0, 0])


def _grey_profile(gamma: float) -> bytes:
    """A minimal ICC v2 grey display profile (D50 white, one gamma curve) as bytes."""
    import struct

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    text = b"Gray Gamma\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    white = b"XYZ \0\0\0\0" + s15(0.9642) + s15(1.0) + s15(0.8249)
    tags = [(b"desc", desc), (b"wtpt", white), (b"kTRC", curve)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrGRAYXYZ "
        + bytes(12) + b"acsp" + bytes(24) + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48)
    )  # fmt: skip
    return header + struct.pack(">I", len(tags)) + table + body


def _matrix_trc_profile(
    name: str, primaries_xyz: list[tuple[float, float, float]], gamma: float = 2.2
) -> bytes:
    """A minimal ICC v2 RGB display profile (D50 white, three primaries, one gamma curve) as bytes."""
    import struct

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    text = name.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    tags += [(sig, xyz(*p)) for sig, p in zip((b"rXYZ", b"gXYZ", b"bXYZ"), primaries_xyz, strict=True)]
    tags += [(sig, curve) for sig in (b"rTRC", b"gTRC", b"bTRC")]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
        + bytes(12) + b"acsp" + bytes(24) + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48)
    )  # fmt: skip
    return header + struct.pack(">I", len(tags)) + table + body


def test_a_long_thin_image_is_resized_without_a_huge_intermediate() -> None:
    """A 1 x 4,000,000 image (a PNG of a few KB) went through an antialiased resize whose first pass holds
    (long side x canvas) pixels: 5 GB here; at Pillow's pixel limit torch asked for 35 GB and /predict
    answered 500. It is reduced along its long side first."""
    from tests.reliability.conftest import python_child

    child = python_child(
        """
        import json
        import resource
        import PIL.Image
        from roadwork_core.data.loading import pil_to_canvas

        img = PIL.Image.new("RGB", (1, 4_000_000), (10, 120, 30))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        canvas = pil_to_canvas(img, 448)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MB
        print(json.dumps({"shape": list(canvas.shape), "colour": canvas[:, 0, 0].tolist(), "grew": grew}))
        """
    )
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["shape"] == [3, 448, 448] and got["colour"] == [10, 120, 30], got
    assert got["grew"] < 500, f"resizing a 1 x 4,000,000 image took {got['grew']:.0f} MB more"


def test_a_jpeg_of_thousands_of_repeated_scans_is_refused_not_decoded_for_minutes() -> None:
    """The last scan of a progressive JPEG repeated: libjpeg only warns and decodes each copy over the
    whole image (13.6 s for 300 copies of 99 bytes at 8192 px; an 8 MiB request could hold a server core
    for an hour). An honest progressive JPEG still decodes."""
    from roadwork_core.data.images import MAX_JPEG_SCANS, ImageRejected, decode_image

    buf = io.BytesIO()
    PIL.Image.new("L", (256, 256), 128).save(buf, format="JPEG", progressive=True)
    honest = buf.getvalue()
    assert decode_image(honest, source="progressive.jpg").size == (256, 256)
    last_scan = honest.rindex(b"\xff\xda")
    bomb = honest[:-2] + honest[last_scan:-2] * (MAX_JPEG_SCANS * 10) + b"\xff\xd9"
    with pytest.raises(
        ImageRejected, match=r"bomb\.jpg: too_large \(a JPEG of \d+ scans \(more than 128\)"
    ) as info:
        decode_image(bomb, source="bomb.jpg")
    assert "baseline JPEG" in info.value.detail
    from roadwork_core.bundle.decode import decode_or_error  # a PIL image handed to Bundle.predict too

    refused = decode_or_error(PIL.Image.open(io.BytesIO(bomb)), "images[0]", 224)
    assert isinstance(refused, ImageRejected) and refused.reason == "too_large", refused
    assert tuple(decode_or_error(PIL.Image.open(io.BytesIO(honest)), "images[1]", 224).shape) == (3, 224, 224)


def test_a_long_thin_palette_or_16_bit_image_makes_a_canvas_too() -> None:
    """The long-side reduce refuses palette, 1-bit and 16-bit modes; the image is made RGB first."""
    from roadwork_core.data.loading import pil_to_canvas

    for mode in ("P", "1", "I;16", "L", "RGBA"):
        canvas = pil_to_canvas(PIL.Image.new(mode, (1, 400_000)), 448)
        assert tuple(canvas.shape) == (3, 448, 448), mode
