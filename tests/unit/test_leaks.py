"""Planted leaks: copies of evaluation images that a perceptual hash alone misses (mirror images, EXIF
rotations, letterboxes and frames), copies of images that vanished from a later version, a relabelled copy that would evict an
evaluation image, near-copies labelled both ways, and the ExPLoRA pool."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from roadwork_core.data.image_table import build_image_table
from roadwork_core.data.neardup import content_box, dihedral_phashes, near_duplicate_pairs, pair_distances
from roadwork_core.data.pool import filter_unlabelled_pool
from roadwork_core.data.split_checks import (
    check_near_duplicate_labels_agree,
    check_no_near_duplicates_across_splits,
    check_sticky,
)
from roadwork_core.data.splits import SplitConfig, assign_splits


def scene(seed: int, size=(320, 240)) -> Image.Image:
    """A photo-like image without symmetry: smooth random structure plus noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-25, 26, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, exif_orientation: int | None = None, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def write_drop(inbox: Path, version: str, files: dict[str, tuple[bytes, int]]) -> Path:
    drop = inbox / version
    drop.mkdir(parents=True)
    lines = ["file,label"]
    for name, (data, label) in files.items():
        (drop / name).write_bytes(data)
        lines.append(f"{name},{label}")
    (drop / "labels.csv").write_text("\n".join(lines) + "\n")
    (drop / "_READY").touch()
    return drop


def cfg() -> SplitConfig:
    return SplitConfig()


def test_mirror_and_rotated_copies_are_near_duplicates_only_with_the_dihedral_hashes() -> None:
    original = scene(0)
    copies = {
        "mirror": original.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "upside_down": original.transpose(Image.Transpose.ROTATE_180),
        "quarter_turn": original.transpose(Image.Transpose.ROTATE_90),
    }
    hashes = [dihedral_phashes(original)] + [dihedral_phashes(c) for c in copies.values()]
    hashes.append(dihedral_phashes(scene(1)))  # an unrelated image
    phashes, variants = [h for h, _ in hashes], [v for _, v in hashes]
    upright = near_duplicate_pairs(phashes, 6)
    assert not any(0 in pair for pair in upright.tolist()), (
        "a plain phash does not see mirrors (why this exists)"
    )
    pairs = near_duplicate_pairs(phashes, 6, variants)
    assert {(0, 1), (0, 2), (0, 3)} <= set(map(tuple, pairs.tolist())), pairs.tolist()
    assert not any(4 in pair for pair in pairs.tolist()), "an unrelated image must not pair"
    dist = pair_distances(phashes, np.array([[0, 1], [0, 2], [0, 3]]), variants)
    assert dist.max() <= 2, dist
    assert dihedral_phashes(original)[0] == phashes[0]


def framed(img: Image.Image, how: str) -> Image.Image:
    """`img` with an added border: the ways a copy gets one (export padding, letterboxing, a frame)."""
    w, h = img.size
    if how == "black_2pct":
        return ImageOps.expand(img, border=round(0.02 * w), fill=(0, 0, 0))
    if how == "white_5pct":
        return ImageOps.expand(img, border=round(0.05 * w), fill=(255, 255, 255))
    if how == "grey_right":
        out = Image.new("RGB", (w + round(0.08 * w), h), (128, 128, 128))
        out.paste(img, (0, 0))
        return out
    if how == "screenshot":  # pasted off-centre on a white page under a grey title bar
        page = Image.new("RGB", (round(1.5 * w), round(1.6 * h)), (255, 255, 255))
        page.paste(img, (round(0.1 * w), round(0.35 * h)))
        page.paste((128, 128, 128), (0, 0, page.width, round(0.12 * h)))
        return page
    if how == "mirror_white":  # a mirrored copy in a frame: a flip and a border at once
        return ImageOps.expand(
            img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), border=round(0.05 * w), fill=(255,) * 3
        )
    side = max(w, h)  # "square": letterboxed into a black square, as a resize-with-padding export does
    out = Image.new("RGB", (side, side), (0, 0, 0))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


FRAMES = ("black_2pct", "white_5pct", "grey_right", "square", "mirror_white", "screenshot")


def test_framed_and_letterboxed_copies_are_near_duplicates_through_the_content_hash() -> None:
    originals = [scene(i) for i in range(12)]
    rows = [dihedral_phashes(img) for img in originals]
    for img in originals:
        for how in FRAMES:
            copy = Image.open(io.BytesIO(jpeg(framed(img, how), quality=85))).convert("RGB")
            rows.append(dihedral_phashes(copy))
    phashes, variants = [h for h, _ in rows], [v for _, v in rows]
    n = len(originals)
    copy_of = {n + i * len(FRAMES) + k: i for i in range(n) for k in range(len(FRAMES))}
    upright = {tuple(p) for p in near_duplicate_pairs(phashes, 6).tolist()}
    missed_upright = [c for c, o in copy_of.items() if (o, c) not in upright]
    assert len(missed_upright) > len(copy_of) // 2, "the frames must defeat a plain phash (why this exists)"
    pairs = {tuple(p) for p in near_duplicate_pairs(phashes, 6, variants).tolist()}
    missed = [(c, o) for c, o in copy_of.items() if (o, c) not in pairs]
    assert not missed, f"framed copies not paired with their original: {missed}"
    strangers = [(a, b) for a, b in pairs if copy_of.get(a, a) != copy_of.get(b, b)]
    assert not strangers, f"distinct scenes paired: {strangers}"
    dist = pair_distances(phashes, np.array([(o, c) for c, o in copy_of.items()]), variants)
    assert dist.max() <= 6, dist


def test_copies_cropped_5_or_10_percent_from_one_side_pair_through_the_crop_variants() -> None:
    """A crop moves a phash 8-14 bits (11 of 20 planted 5 % crops and 17 of 20 10 % crops left val_test).
    The crop variants (5 % and 10 % cut from each side) catch most at 1 bit; a 30 % crop stays unpaired."""
    from roadwork_core.data.neardup import N_VARIANTS

    originals = [scene(40 + i, size=(400, 300)) for i in range(10)]
    rows = [dihedral_phashes(img) for img in originals]
    copies = {}
    for i, img in enumerate(originals):
        w, h = img.size
        for fraction in (0.05, 0.10, 0.30):
            d = round(fraction * (w if i % 2 == 0 else h))
            box = [(d, 0, w, h), (0, d, w, h), (0, 0, w - d, h), (0, 0, w, h - d)][i % 4]
            copies[len(rows)] = (i, fraction)
            rows.append(dihedral_phashes(Image.open(io.BytesIO(jpeg(img.crop(box)))).convert("RGB")))
    phashes, variants = [h for h, _ in rows], [v for _, v in rows]
    pairs = {tuple(p) for p in near_duplicate_pairs(phashes, 6, variants).tolist()}
    for fraction in (0.05, 0.10):
        missed = [c for c, (o, f) in copies.items() if f == fraction and (o, c) not in pairs]
        assert len(missed) <= 2, f"{fraction:.0%} crops not paired: {missed}"
    no_crops = [" ".join(v.split()[:N_VARIANTS]) for v in variants]
    without = {tuple(p) for p in near_duplicate_pairs(phashes, 6, no_crops).tolist()}
    assert sum((o, c) not in without for c, (o, f) in copies.items() if f < 0.3) >= 5, (
        "crops must defeat the rest"
    )
    strangers = [(a, b) for a, b in pairs if copies.get(a, (a,))[0] != copies.get(b, (b,))[0]]
    assert not strangers, f"distinct scenes paired: {strangers}"


def test_crops_that_were_also_mirrored_turned_or_framed_pair_with_their_original() -> None:
    """Each change alone was caught, together they were not: a mirrored copy cut 10 % (missed 39 of 40
    scenes), a quarter turn of a 5 % crop, a 5 % crop in a white frame. A crop variant of one image is also
    compared with the other's flips, quarter turns and content inside a frame (at the crop's 1 bit)."""
    originals = [scene(60 + i, size=(400, 300)) for i in range(10)]
    rows = [dihedral_phashes(img) for img in originals]
    kinds = {
        "mirror+crop10": lambda im: ImageOps.mirror(im.crop((0, 0, im.width, im.height - im.height // 10))),
        "rot90+crop5": lambda im: im.crop((im.width // 20, 0, im.width, im.height)).transpose(
            Image.Transpose.ROTATE_90
        ),
        "flip+crop5": lambda im: ImageOps.flip(im.crop((0, im.height // 20, im.width, im.height))),
    }
    copies = {}
    for i, img in enumerate(originals):
        for kind, make in kinds.items():
            copies[len(rows)] = (i, kind)
            rows.append(dihedral_phashes(Image.open(io.BytesIO(jpeg(make(img)))).convert("RGB")))
    phashes, variants = [h for h, _ in rows], [v for _, v in rows]
    pairs = {tuple(p) for p in near_duplicate_pairs(phashes, 6, variants).tolist()}
    for kind in kinds:
        missed = [c for c, (o, k) in copies.items() if k == kind and (o, c) not in pairs]
        assert len(missed) <= 2, f"{kind} copies not paired with their original: {missed}"
    strangers = [(a, b) for a, b in pairs if copies.get(a, (a,))[0] != copies.get(b, (b,))[0]]
    assert not strangers, f"distinct scenes paired: {strangers}"
    linked = np.array([(o, c) for c, (o, _) in copies.items() if (o, c) in pairs])
    assert pair_distances(phashes, linked, variants).max() <= 1, "a crop pair's distance is the crop's 1 bit"


def test_centre_square_copies_resized_to_224_pair_with_their_original() -> None:
    """A copy centre-cropped to a square and resized to 224 x 224 (the validator's image, `ImageOps.fit`):
    10 of 10 planted ones left val_test with every check green. The centre square's hash is compared with
    the other image's phash at 1 bit; rows hashed before it (16 entries) still compare as before."""
    originals = [scene(80 + i, size=(400 + 40 * (i % 3), 300)) for i in range(10)]
    rows = [dihedral_phashes(img) for img in originals]
    copies = {}
    for i, img in enumerate(originals):
        copies[len(rows)] = i
        rows.append(
            dihedral_phashes(Image.open(io.BytesIO(jpeg(ImageOps.fit(img, (224, 224))))).convert("RGB"))
        )
    phashes, variants = [h for h, _ in rows], [v for _, v in rows]
    pairs = {tuple(p) for p in near_duplicate_pairs(phashes, 6, variants).tolist()}
    missed = [c for c, o in copies.items() if (o, c) not in pairs]
    assert len(missed) <= 2, f"centre-square copies not paired with their original: {missed}"
    strangers = [(a, b) for a, b in pairs if copies.get(a, a) != copies.get(b, b)]
    assert not strangers, f"distinct scenes paired: {strangers}"
    old = [" ".join(v.split()[:16]) for v in variants]  # a table written before the centre square
    assert len(near_duplicate_pairs(phashes, 6, old)) < len(pairs), "the centre square is what pairs them"


def test_content_box_finds_neutral_frames_only() -> None:
    img = scene(3, size=(400, 300))
    assert content_box(img) is None
    left, top, right, bottom = content_box(ImageOps.expand(img, border=20, fill=(0, 0, 0)))
    assert abs(left - 20) <= 2 and abs(top - 20) <= 2 and abs(right - 420) <= 2 and abs(bottom - 320) <= 2
    # a flat coloured band (a blue sky) is content, not a frame: trimming it grouped distinct scenes
    sky = img.copy()
    sky.paste((70, 130, 200), (0, 0, 400, 90))
    assert content_box(sky) is None
    # an almost plain image keeps its frame: what is left would be too small to hash
    plain = Image.new("RGB", (400, 300), (255, 255, 255))
    plain.paste(img.resize((60, 40)), (170, 130))
    assert content_box(plain) is None
    # the dihedral hashes are unchanged; the content hash is appended, equal to the phash without a frame
    phash, variants = dihedral_phashes(img)
    assert len(variants.split()) == 17 and variants.split()[7] == phash


def test_rows_hashed_before_the_content_hash_still_compare() -> None:
    """Split histories written by an earlier version hold 7 hashes per row: their content hash is the
    upright one, so a framed copy of such an image still pairs with it."""
    img = scene(5)
    old_phash, new_variants = dihedral_phashes(img)
    old_variants = " ".join(new_variants.split()[:7])
    copy_phash, copy_variants = dihedral_phashes(framed(img, "square"))
    pairs = near_duplicate_pairs([old_phash, copy_phash], 6, [old_variants, copy_variants])
    assert pairs.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="expected 17 space-separated"):
        near_duplicate_pairs([old_phash, copy_phash], 6, [" ".join(new_variants.split()[:5]), copy_variants])


def test_framed_copies_of_val_test_follow_it_into_val_test(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    v1 = write_drop(inbox, "v0001", {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(80)})
    splits1 = assign_splits(build_image_table([v1]).images, cfg())
    test_rows = splits1[splits1["split"] == "val_test"].head(4)
    planted = {
        f"{how}_{k}.jpg": (jpeg(framed(scene(int(row.file[1:4])), how)), row.label)
        for k, row in enumerate(test_rows.itertuples())
        for how in FRAMES
    }
    v2 = write_drop(inbox, "v0002", planted)
    splits2 = assign_splits(build_image_table([v1, v2]).images, cfg(), previous=splits1)
    where = dict(zip(splits2["file"], splits2["split"]))
    assert {where[name] for name in planted} == {"val_test"}, {name: where[name] for name in planted}
    leaked = splits2.copy()
    leaked.loc[leaked["file"].isin(planted), "split"] = "train"
    outcome = check_no_near_duplicates_across_splits(leaked)
    assert not outcome.passed and outcome.metadata["n_cross_split_pairs"] >= len(planted), outcome.message


def test_mirrored_and_exif_rotated_copies_of_val_test_follow_it_into_val_test(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    v1 = write_drop(inbox, "v0001", {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(80)})
    images1 = build_image_table([v1]).images
    splits1 = assign_splits(images1, cfg())
    test_rows = splits1[splits1["split"] == "val_test"].head(4)
    by_file = {row.file: row.label for row in test_rows.itertuples()}
    planted = {}
    for k, (name, label) in enumerate(by_file.items()):
        img = scene(int(name[1:4]))
        planted[f"mirror_{k}.jpg"] = (jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), label)
        planted[f"exif6_{k}.jpg"] = (jpeg(img, exif_orientation=6), label)  # same pixels, new tag
    v2 = write_drop(inbox, "v0002", planted)
    images2 = build_image_table([v1, v2]).images
    splits2 = assign_splits(images2, cfg(), previous=splits1)
    where = dict(zip(splits2["file"], splits2["split"]))
    assert {where[name] for name in planted} == {"val_test"}, {name: where[name] for name in planted}
    assert check_no_near_duplicates_across_splits(splits2).passed
    assert check_sticky(splits2, splits1).passed

    # the check catches the same copies put elsewhere by hand
    leaked = splits2.copy()
    leaked.loc[leaked["file"].isin(planted), "split"] = "train"
    outcome = check_no_near_duplicates_across_splits(leaked)
    assert not outcome.passed and outcome.metadata["n_cross_split_pairs"] >= len(planted), outcome.message
    assert "mirror_0.jpg" in outcome.message


def test_a_copy_of_a_vanished_val_test_image_still_follows_it(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    v1 = write_drop(inbox, "v0001", {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(80)})
    splits1 = assign_splits(build_image_table([v1]).images, cfg())
    gone = splits1[splits1["split"] == "val_test"].iloc[0]
    (v1 / gone["file"]).unlink()  # the original leaves the drop
    csv = v1 / "labels.csv"
    csv.write_text(
        "".join(line for line in csv.read_text().splitlines(True) if not line.startswith(gone["file"]))
    )
    copy = jpeg(scene(int(gone["file"][1:4])).transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=70)
    v2 = write_drop(inbox, "v0002", {"copy.jpg": (copy, int(gone["label"]))})
    splits2 = assign_splits(build_image_table([v1, v2]).images, cfg(), previous=splits1)
    assert gone["image_id"] not in set(splits2["image_id"]), "a vanished image is not in the output"
    assert splits2.loc[splits2["file"] == "copy.jpg", "split"].item() == "val_test"
    assert len(splits2) == len(splits1), "one image left, one arrived"
    assert splits2["label"].dtype == np.int64

    leaked = splits2.copy()
    leaked.loc[leaked["file"] == "copy.jpg", "split"] = "train"
    assert check_no_near_duplicates_across_splits(leaked).passed, "without the previous table it cannot see"
    outcome = check_no_near_duplicates_across_splits(leaked, previous=splits1)
    assert not outcome.passed and "no longer in the table" in outcome.message, outcome.message


def test_a_relabelled_copy_in_a_later_drop_cannot_evict_the_earlier_image(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    v1 = write_drop(inbox, "v0001", {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(80)})
    splits1 = assign_splits(build_image_table([v1]).images, cfg())
    target = splits1[splits1["split"] == "val_test"].iloc[0]
    data = (v1 / target["file"]).read_bytes()
    v2 = write_drop(inbox, "v0002", {"relabelled.jpg": (data, 1 - int(target["label"]))})
    result = build_image_table([v1, v2])
    kept = result.images.set_index("image_id").loc[target["image_id"]]
    assert kept["file"] == target["file"] and kept["label"] == target["label"], "the earlier copy stays"
    reject = result.rejects.set_index("file").loc["relabelled.jpg"]
    assert reject["reason"] == "label_conflict" and target["file"] in reject["detail"], reject["detail"]
    splits2 = assign_splits(result.images, cfg(), previous=splits1)
    assert check_sticky(splits2, splits1).metadata["n_dropped"] == 0

    # within one drop, nobody's label is settled: every copy is rejected, naming the other
    v3 = write_drop(inbox, "v0003", {"a.jpg": (jpeg(scene(500)), 1), "b.jpg": (jpeg(scene(500)), 0)})
    rejects = build_image_table([v3], max_reject_fraction=1.0).rejects.set_index("file")
    assert set(rejects.loc[["a.jpg", "b.jpg"], "reason"]) == {"label_conflict"}
    assert "v0003/b.jpg (label 0)" in rejects.loc["a.jpg", "detail"]


def test_near_copies_labelled_both_ways_are_reported() -> None:
    img = scene(7)
    small = img.resize((160, 120), Image.BILINEAR)
    rows = []
    for name, pic, label in [("a.jpg", img, 1), ("a_small.jpg", small, 0), ("b.jpg", scene(8), 0)]:
        phash, variants = dihedral_phashes(pic)
        rows.append(
            {"image_id": name, "file": name, "label": label, "phash": phash, "phash_dihedral": variants}
        )
    table = pd.DataFrame(rows).assign(split="train")
    outcome = check_near_duplicate_labels_agree(table)
    assert not outcome.passed and outcome.metadata["n_label_conflicts"] == 1, outcome.message
    assert "a.jpg (roadwork) ~ a_small.jpg (no_roadwork)" in outcome.message
    table.loc[1, "label"] = 1
    assert check_near_duplicate_labels_agree(table).passed


def test_pool_drops_mirrored_copies_and_chains_of_evaluation_images(tmp_path: Path) -> None:
    evaluation = scene(3)
    phash, variants = dihedral_phashes(evaluation)
    reference = pd.DataFrame(
        [{"image_id": "e", "split": "val_test", "phash": phash, "phash_dihedral": variants, "file": "e.jpg"}]
    )
    pool = {
        "mirror.jpg": evaluation.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "unrelated.jpg": scene(4),
    }
    # a chain: blends from the evaluation image towards another scene, each a few bits from the last,
    # the far end much more than the radius from the evaluation image
    for k, t in enumerate(np.linspace(0.05, 0.6, 12)):
        pool[f"chain_{k:02d}.jpg"] = Image.blend(evaluation, scene(5), float(t))
    uris = []
    for name, img in pool.items():
        path = tmp_path / name
        path.write_bytes(jpeg(img))
        uris.append(str(path))
    out = filter_unlabelled_pool(uris, reference, radius=6, workers=1)
    dropped = {Path(u).name: d for u, d in zip(out.dropped["uri"], out.dropped["detail"])}
    assert "mirror.jpg" in dropped and "unrelated.jpg" not in dropped, dropped
    far = [n for n in pool if n.startswith("chain_") and "by a chain" in dropped.get(n, "")]
    assert far, f"no chain image beyond the radius was dropped: {dropped}"
    assert "chain_00.jpg" in dropped and "within" in dropped["chain_00.jpg"], dropped


def _without(drop: Path, name: str) -> None:
    """Delete one image from a drop and its labels.csv row."""
    (drop / name).unlink()
    csv = drop / "labels.csv"
    csv.write_text("".join(line for line in csv.read_text().splitlines(True) if not line.startswith(name)))


def test_a_vanished_val_test_image_anchors_every_later_version_through_the_split_history(
    tmp_path: Path,
) -> None:
    from roadwork_core.data.splits import split_history

    inbox = tmp_path / "inbox"
    v1 = write_drop(inbox, "v0001", {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(80)})
    splits1 = assign_splits(build_image_table([v1]).images, cfg())
    history1 = split_history(splits1, None, "v0001")
    gone = splits1[splits1["split"] == "val_test"].iloc[0]
    original = (v1 / gone["file"]).read_bytes()
    _without(v1, gone["file"])  # deleted before v0002 ...
    v2 = write_drop(inbox, "v0002", {f"t{i:03d}.jpg": (jpeg(scene(100 + i)), i % 2) for i in range(20)})
    splits2 = assign_splits(build_image_table([v1, v2]).images, cfg(), previous=history1)
    history2 = split_history(splits2, history1, "v0002")
    assert gone["image_id"] not in set(splits2["image_id"])
    assert history2.set_index("image_id").loc[gone["image_id"], ["split", "last_version"]].tolist() == [
        "val_test",
        "v0001",
    ], "the history keeps the vanished image, its split and where it was last"
    assert len(history2) == len(splits2) + 1

    # ... and two versions later a mirrored copy arrives, and the original's bytes come back under a new name
    label = int(gone["label"])
    mirror = jpeg(scene(int(gone["file"][1:4])).transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=70)
    v3 = write_drop(inbox, "v0003", {"copy.jpg": (mirror, label), "restored.jpg": (original, label)})
    images3 = build_image_table([v1, v2, v3]).images
    splits3 = assign_splits(images3, cfg(), previous=history2)
    where = dict(zip(splits3["file"], splits3["split"]))
    assert where["copy.jpg"] == "val_test"
    assert splits3.loc[splits3["image_id"] == gone["image_id"], "split"].item() == "val_test"
    assert check_sticky(splits3, history2).passed

    # what the history prevents: with only the previous version's table, both went elsewhere or could
    leaked = splits3.copy()
    leaked.loc[leaked["image_id"] == gone["image_id"], "split"] = "train"
    sticky = check_sticky(leaked, history2)
    assert not sticky.passed and "val_test -> train" in sticky.message, sticky.message
    moved_copy = splits3[splits3["image_id"] != gone["image_id"]].copy()  # the copy alone, moved by hand
    moved_copy.loc[moved_copy["file"] == "copy.jpg", "split"] = "train"
    outcome = check_no_near_duplicates_across_splits(moved_copy, previous=history2)
    assert not outcome.passed and "last in v0001, no longer in the table" in outcome.message, outcome.message
    # the vanished image is named with its drop (drops of a series reuse file names)
    assert f"v0001/{gone['file']}" in outcome.message, outcome.message


def test_a_pair_with_a_vanished_image_counts_only_when_the_other_image_is_new(tmp_path: Path) -> None:
    """The check's advice for a reported pair is to remove one image; once removed, the pair is no leak."""
    inbox = tmp_path / "inbox"
    v1 = write_drop(inbox, "v0001", {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(40)})
    splits1 = assign_splits(build_image_table([v1]).images, cfg())
    a, b = splits1[splits1["split"] == "train"].iloc[0], splits1[splits1["split"] == "val_test"].iloc[0]
    # a pair across splits, as a wider radius or an older table can leave behind: b's hashes made a's
    planted = splits1.copy()
    for col in ("phash", "phash_dihedral"):
        planted.loc[planted["image_id"] == a["image_id"], col] = b[col]
    assert not check_no_near_duplicates_across_splits(planted).passed
    # the user removes b, as the message says: what is left is no leak
    after = planted[planted["image_id"] != b["image_id"]]
    outcome = check_no_near_duplicates_across_splits(after, previous=planted)
    assert outcome.passed, outcome.message
    # but a new image that copies the vanished b, outside b's split, is one
    newcomer = after.iloc[[0]].assign(image_id="f" * 64, split="train", phash=b["phash"], file="new.jpg")
    newcomer["phash_dihedral"] = b["phash_dihedral"]
    outcome = check_no_near_duplicates_across_splits(pd.concat([after, newcomer]), previous=planted)
    assert not outcome.passed and "new.jpg [train]" in outcome.message, outcome.message


def test_frames_of_one_video_share_a_split_through_their_group_id(tmp_path: Path) -> None:
    """A camera panning 2 % of the width a frame: neighbours differ by more than the hash radius, so only the
    drop's `group_id` column can keep the video in one split (measured by a planted-leak audit: 5 groups)."""
    street = scene(999, size=(960, 240))
    frames = {f"f{k:02d}.jpg": (jpeg(street.crop((12 * k, 0, 12 * k + 320, 240))), 1) for k in range(24)}
    others = {f"s{i:03d}.jpg": (jpeg(scene(i)), i % 2) for i in range(150)}
    drop = write_drop(tmp_path / "inbox", "v0001", {**others, **frames})
    csv = drop / "labels.csv"
    lines = csv.read_text().splitlines()
    csv.write_text(
        "\n".join(
            [lines[0] + ",group_id"] + [f"{ln},{'video1' if ln.startswith('f') else ''}" for ln in lines[1:]]
        )
        + "\n"
    )
    images = build_image_table([drop]).images
    by_hash = assign_splits(images, SplitConfig(group_column=None))
    assert by_hash.loc[by_hash["file"].str.startswith("f"), "group_id"].nunique() > 1, (
        "the hash alone splits it"
    )
    grouped = assign_splits(images, cfg())
    video = grouped["file"].str.startswith("f")
    assert grouped.loc[video, "split"].nunique() == 1
    assert grouped.loc[~video, "group_id"].nunique() > 100, "blank keys group nothing"
    assert check_no_near_duplicates_across_splits(grouped).passed

    moved = grouped.copy()
    elsewhere = "val_test" if grouped.loc[video, "split"].iloc[0] != "val_test" else "train"
    moved.loc[moved["file"] == "f07.jpg", "split"] = elsewhere
    outcome = check_no_near_duplicates_across_splits(moved)
    assert not outcome.passed and "same meta.group_id 'video1'" in outcome.message, outcome.message

    one_group = images.assign(**{"meta.group_id": "shard-0"})  # a column that means something else
    with pytest.raises(ValueError, match=r"share meta\.group_id 'shard-0'.*group_column: ''"):
        assign_splits(one_group, cfg())

    # a column asked for by name that the table lacks (a typo, or `meta.video` for a csv column `vid`) turned
    # grouping off without a word: the video's frames were split by hash alone
    from roadwork_core.data.splits import missing_group_column

    for typo in ("meta.group_idd", "scene"):
        warning = missing_group_column(images, typo)
        assert warning and f"group_column is '{typo}'" in warning and "['meta.group_id']" in warning, warning
    assert missing_group_column(images, "meta.group_id") is None
    assert (
        missing_group_column(images.drop(columns=["meta.group_id"]), "meta.group_id") is None
    )  # the default
