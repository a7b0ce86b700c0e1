"""Split checks with planted leakage: each plant is caught by the right check with an actionable message."""

from __future__ import annotations

import io
import json

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from roadwork_core.data.split_checks import (
    CheckOutcome,
    check_label_balance,
    check_min_per_class,
    check_no_near_duplicates_across_splits,
    check_no_shared_images,
    check_sticky,
)
from roadwork_core.data.splits import SplitConfig, assign_splits


def images(seed: int, n: int, pos_rate: float = 0.5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = [rng.bytes(32).hex() for _ in range(n)]
    return pd.DataFrame(
        {
            "image_id": ids,
            "uri": [f"file:///inbox/v1/img_{k:04d}.jpg" for k in range(n)],
            "file": [f"img_{k:04d}.jpg" for k in range(n)],
            "label": (rng.random(n) < pos_rate).astype(int),
            "phash": [f"{int(x):016x}" for x in rng.integers(0, 2**64, size=n, dtype=np.uint64)],
            "source": "synthetic",
        }
    )


def clean_splits(n: int = 400, seed: int = 0) -> pd.DataFrame:
    return assign_splits(images(seed, n), SplitConfig())


def assert_json_small(outcome: CheckOutcome) -> None:
    text = json.dumps(outcome.metadata)
    assert len(text) < 20_000, f"metadata too large ({len(text)} chars)"


def textured_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-30, 31, (256, 256, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_clean_splits_pass_every_check() -> None:
    splits = clean_splits()
    outcomes = {
        "shared": check_no_shared_images(splits),
        "neardup": check_no_near_duplicates_across_splits(splits, 6),
        "balance": check_label_balance(splits, 0.05),
        "min": check_min_per_class(splits, 10),
        "sticky_none": check_sticky(splits, None),
        "sticky_self": check_sticky(splits, splits[["image_id", "split"]]),
    }
    for name, outcome in outcomes.items():
        assert outcome.passed, f"{name} failed on clean splits: {outcome.message}"
        assert_json_small(outcome)


def test_same_bytes_under_two_names_is_caught() -> None:
    splits = clean_splits()
    victim = splits[splits["split"] == "train"].iloc[0]
    copy = victim.copy()
    copy["file"], copy["uri"], copy["split"] = (
        "renamed_copy.jpg",
        "file:///inbox/v2/renamed_copy.jpg",
        "val_test",
    )
    leaky = pd.concat([splits, copy.to_frame().T], ignore_index=True)
    outcome = check_no_shared_images(leaky)
    assert not outcome.passed
    assert victim["image_id"][:16] in outcome.message
    assert victim["file"] in outcome.message and "renamed_copy.jpg" in outcome.message, outcome.message
    assert "[train]" in outcome.message and "[val_test]" in outcome.message, outcome.message
    assert outcome.metadata["n_cross_split"] == 1
    assert_json_small(outcome)
    # the same bytes under two names in one split still double-counts: caught too
    copy["split"] = "train"
    same = check_no_shared_images(pd.concat([splits, copy.to_frame().T], ignore_index=True))
    assert not same.passed and same.metadata["n_cross_split"] == 0, same.message


def test_resized_reencoded_near_duplicate_across_splits_is_caught() -> None:
    original = textured_jpeg(3)
    img = Image.open(io.BytesIO(original))
    buf = io.BytesIO()
    img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.BILINEAR).save(buf, "JPEG", quality=70)
    ph_a = str(imagehash.phash(Image.open(io.BytesIO(original))))
    ph_b = str(imagehash.phash(Image.open(io.BytesIO(buf.getvalue()))))
    distance = imagehash.hex_to_hash(ph_a) - imagehash.hex_to_hash(ph_b)
    assert distance <= 6, f"planted near-duplicate should be within radius 6, is {distance}"

    splits = clean_splits()
    train_row = splits.index[splits["split"] == "train"][0]
    calib_row = splits.index[splits["split"] == "val_calib"][0]
    splits.loc[train_row, ["phash", "file"]] = [ph_a, "street_0001.jpg"]
    splits.loc[calib_row, ["phash", "file"]] = [ph_b, "street_0001_small.jpg"]
    outcome = check_no_near_duplicates_across_splits(splits, radius=6)
    assert not outcome.passed
    assert "street_0001.jpg [train]" in outcome.message, outcome.message
    assert "street_0001_small.jpg [val_calib]" in outcome.message, outcome.message
    assert f"distance {distance}" in outcome.message, outcome.message
    assert outcome.metadata["n_cross_split_pairs"] == 1
    assert_json_small(outcome)
    # and assign_splits keeps such a pair together, so rebuilding fixes it
    rebuilt = assign_splits(splits.drop(columns=["split", "group_id"]))
    assert check_no_near_duplicates_across_splits(rebuilt, 6).passed


def test_near_duplicate_listing_is_capped() -> None:
    splits = clean_splits(200)
    names = ["train", "val_test"]
    shared_hash = "00000000000000ff"
    rows = splits.index[:40]
    splits.loc[rows, "phash"] = shared_hash
    splits.loc[rows, "split"] = [names[k % 2] for k in range(40)]
    outcome = check_no_near_duplicates_across_splits(splits, 6)
    assert not outcome.passed
    assert outcome.metadata["n_cross_split_pairs"] == 20 * 20
    assert len(outcome.metadata["examples"]) == 20 and "and 380 more" in outcome.message
    assert_json_small(outcome)


def test_moved_image_is_caught_by_sticky() -> None:
    previous = clean_splits()
    current = previous.copy()
    row = current.index[current["split"] == "val_test"][0]
    current.loc[row, "split"] = "train"
    outcome = check_sticky(current, previous)
    assert not outcome.passed
    moved_file = current.loc[row, "file"]
    assert f"{moved_file}: val_test -> train" in outcome.message, outcome.message
    assert outcome.metadata["n_moved"] == 1
    assert outcome.metadata["moved"][0]["from"] == "val_test"
    assert_json_small(outcome)


def test_sticky_ignores_dropped_and_new_images() -> None:
    previous = clean_splits(300)
    current = assign_splits(
        pd.concat([images(0, 300).iloc[10:], images(9, 50)], ignore_index=True), previous=previous
    )
    outcome = check_sticky(current, previous)
    assert outcome.passed, outcome.message
    assert outcome.metadata["n_dropped"] == 10


def test_class_too_small_for_minimum() -> None:
    # 300 images, only 20 roadwork: val_select gets ~2 of them
    m = images(4, 300, pos_rate=0.0)
    m.loc[:19, "label"] = 1
    splits = assign_splits(m)
    outcome = check_min_per_class(splits, min_count=10)
    assert not outcome.passed
    short = {(d["split"], d["class"]): d for d in outcome.metadata["shortfall"]}
    assert ("val_select", "roadwork") in short, outcome.metadata
    need = short[("val_select", "roadwork")]["need_more"]
    have = short[("val_select", "roadwork")]["have"]
    assert have + need == 10
    assert f"split 'val_select' has {have} roadwork (label 1) images, needs {need} more" in outcome.message
    assert "more roadwork images overall" in outcome.message, outcome.message
    assert not any(d["class"] == "no_roadwork" for d in outcome.metadata["shortfall"])
    assert_json_small(outcome)


def test_label_balance_names_split_and_rates() -> None:
    splits = clean_splits(600)
    overall_before = splits["label"].mean()
    rows = splits.index[(splits["split"] == "val_calib") & (splits["label"] == 0)]
    splits.loc[rows, "label"] = 1  # val_calib becomes all roadwork
    outcome = check_label_balance(splits, tolerance=0.05)
    assert not outcome.passed
    overall = splits["label"].mean()
    assert overall > overall_before
    assert "split 'val_calib' has positive rate 1.000" in outcome.message, outcome.message
    assert f"overall is {overall:.3f}" in outcome.message, outcome.message
    assert outcome.metadata["positive_rate"]["val_calib"] == 1.0


def test_empty_split_fails_balance_and_minimum() -> None:
    splits = clean_splits()
    splits.loc[splits["split"] == "val_select", "split"] = "train"
    assert not check_label_balance(splits).passed
    outcome = check_min_per_class(splits, 10)
    assert not outcome.passed and "'val_select' is empty" in outcome.message, outcome.message


def test_messages_name_an_image_with_its_drop_when_drops_reuse_file_names() -> None:
    """Exported and synthetic series name files alike in every drop (images/000004.jpg in v0001 and v0002):
    a message naming only the file pointed at another version's image."""
    from roadwork_core.data.split_checks import check_near_duplicate_labels_agree

    table = images(3, 2)
    table["phash"] = table["phash"].iloc[0]  # the same photo, labelled both ways
    table["label"] = [1, 0]
    table["file"] = "images/000004.jpg"
    table["source"] = ["v0001", "v0002"]
    table["split"] = "train"
    outcome = check_near_duplicate_labels_agree(table)
    assert not outcome.passed
    assert "v0001/images/000004.jpg (roadwork) ~ v0002/images/000004.jpg (no_roadwork)" in outcome.message, (
        outcome.message
    )
