"""Near-duplicate search and split assignment: correctness, determinism, stratification, stickiness."""

from __future__ import annotations

import io
import time

import imagehash
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from roadwork_core.data.neardup import (
    hamming_distance,
    near_duplicate_groups,
    near_duplicate_pairs,
    pair_distances,
    phash_to_uint64,
)
from roadwork_core.data.splits import SplitConfig, assign_splits, split_summary, validate_ratios

SPLITS = ["train", "val_select", "val_calib", "val_test"]
RATIOS = SplitConfig().ratios


def random_hashes(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{int(x):016x}" for x in rng.integers(0, 2**64, size=n, dtype=np.uint64)]


def flip_bits(h: str, bits: list[int]) -> str:
    value = int(h, 16)
    for b in bits:
        value ^= 1 << b
    return f"{value:016x}"


def synthetic_image_table(seed: int, n: int, pos_rate: float = 0.4) -> pd.DataFrame:
    """n images with random sha256-like ids and random (far apart) phashes."""
    rng = np.random.default_rng(seed)
    ids = [rng.bytes(32).hex() for _ in range(n)]
    return pd.DataFrame(
        {
            "image_id": ids,
            "uri": [f"file:///inbox/v1/{i[:8]}.jpg" for i in ids],
            "file": [f"{i[:8]}.jpg" for i in ids],
            "label": (rng.random(n) < pos_rate).astype(int),
            "phash": random_hashes(rng, n),
            "width": 224,
            "height": 224,
            "source": "synthetic",
            "city": rng.choice(["a", "b", "c"], size=n),
        }
    )


def textured_jpeg(seed: int) -> bytes:
    """A 256x256 JPEG with smooth structure plus noise, so its phash is stable under resizing."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-30, 31, (256, 256, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def resized_reencoded(jpeg: bytes, scale: float = 0.8, quality: int = 70) -> bytes:
    img = Image.open(io.BytesIO(jpeg))
    small = img.resize((int(img.width * scale), int(img.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def phash_of(jpeg: bytes) -> str:
    return str(imagehash.phash(Image.open(io.BytesIO(jpeg))))


# ---------------------------------------------------------------- near duplicates


@pytest.mark.parametrize("radius", [0, 3, 6, 10])
def test_pairs_match_brute_force(radius: int) -> None:
    rng = np.random.default_rng(radius)
    hashes = random_hashes(rng, 400)
    for _ in range(150):  # plant neighbours at distances 0..9
        src = hashes[int(rng.integers(len(hashes)))]
        k = int(rng.integers(0, 10))
        hashes.append(flip_bits(src, rng.choice(64, size=k, replace=False).tolist()))
    h = phash_to_uint64(hashes)
    dist = hamming_distance(h[:, None], h[None, :])
    i, j = np.nonzero(np.triu(dist <= radius, k=1))
    expected = np.stack([i, j], axis=1)
    got = near_duplicate_pairs(hashes, radius)
    assert got.shape[1] == 2
    assert np.array_equal(got, expected), (
        f"radius {radius}: {len(got)} pairs found, brute force {len(expected)}"
    )
    assert (pair_distances(hashes, got) <= radius).all()


def test_groups_are_connected_components_with_content_ids() -> None:
    base = "0123456789abcdef"
    a1 = flip_bits(base, [0, 1, 2, 3, 4])  # 5 from base
    a2 = flip_bits(a1, [10, 11, 12, 13, 14])  # 5 from a1, 10 from base: joined through a1
    far = "fedcba9876543210"
    phashes = [a2, far, base, a1]
    ids = ["d", "c", "b", "a"]
    labels = near_duplicate_groups(phashes, radius=6)
    assert labels.tolist() == [0, 1, 0, 0], f"chain base~a1~a2 must be one group, got {labels}"
    gids = near_duplicate_groups(phashes, radius=6, ids=ids)
    assert gids.tolist() == ["a", "c", "a", "a"], f"group id is the smallest id in the group, got {gids}"
    assert near_duplicate_groups(phashes, radius=4).tolist() == [0, 1, 2, 3]


def test_bad_phash_names_the_row() -> None:
    with pytest.raises(ValueError, match="row 1"):
        near_duplicate_pairs(["0123456789abcdef", "xyz"], 6)
    with pytest.raises(ValueError, match="radius"):
        near_duplicate_pairs(["0123456789abcdef"], 64)


def test_resized_reencoded_jpeg_is_a_near_duplicate() -> None:
    original = textured_jpeg(0)
    copy = resized_reencoded(original)
    other = textured_jpeg(1)
    phashes = [phash_of(original), phash_of(copy), phash_of(other)]
    pairs = near_duplicate_pairs(phashes, 6)
    assert pairs.tolist() == [[0, 1]], (
        f"resized+re-encoded copy should pair with its original only: {phashes}"
    )


def test_near_duplicates_fast_at_50k() -> None:
    hashes = random_hashes(np.random.default_rng(7), 50_000)
    start = time.perf_counter()
    groups = near_duplicate_groups(hashes, 6)
    elapsed = time.perf_counter() - start
    assert len(groups) == 50_000
    assert elapsed < 10.0, f"near_duplicate_groups on 50k hashes took {elapsed:.1f}s"


# ---------------------------------------------------------------- config


def test_ratios_validated() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(ratios={"train": 0.5, "val_select": 0.1, "val_calib": 0.15, "val_test": 0.15})
    with pytest.raises(ValueError, match="> 0"):
        SplitConfig(ratios={"train": 0.85, "val_select": 0.0, "val_calib": 0.15, "val_test": 0.0})
    with pytest.raises(ValueError, match="miss"):
        SplitConfig(ratios={"train": 0.85, "val_calib": 0.15})
    with pytest.raises(ValueError, match="not a split"):
        validate_ratios({"train": 0.6, "valid": 0.4})


def test_image_table_errors_are_actionable() -> None:
    m = synthetic_image_table(0, 5)
    with pytest.raises(ValueError, match="missing columns \\['phash'\\]"):
        assign_splits(m.drop(columns="phash"))
    m.loc[2, "label"] = 3
    with pytest.raises(ValueError, match="row 2"):
        assign_splits(m)


# ---------------------------------------------------------------- assignment


def test_output_columns_and_groups_assigned_as_one_unit() -> None:
    m = synthetic_image_table(1, 300)
    # plant near-duplicate chains of 3 under different names
    extra = []
    for k in range(20):
        src = m.iloc[k]
        for d in range(1, 3):
            row = src.copy()
            row["image_id"] = f"{k:02d}{d}" + src["image_id"][3:]
            row["file"] = f"copy{d}_{src['file']}"
            row["phash"] = flip_bits(src["phash"], list(range(d * 2)))
            extra.append(row)
    m = pd.concat([m, pd.DataFrame(extra)], ignore_index=True)
    out = assign_splits(m, SplitConfig())
    assert list(out.columns[:4]) == ["image_id", "split", "group_id", "label"]
    assert set(m.columns) <= set(out.columns), "every image table column is kept"
    assert len(out) == len(m)
    assert set(out["split"]) == set(SPLITS)
    per_group = out.groupby("group_id")["split"].nunique()
    assert (per_group == 1).all(), "a near-duplicate group must land in one split"
    assert (out.groupby("group_id").size() == 3).sum() == 20
    assert (out["group_id"] == out.groupby("group_id")["image_id"].transform("min")).all()


def test_mixed_label_group_follows_majority() -> None:
    m = synthetic_image_table(2, 3)
    m["phash"] = ["0000000000000000", "0000000000000001", "0000000000000003"]
    m["label"] = [1, 0, 1]
    out = assign_splits(m)
    assert out["group_id"].nunique() == 1 and out["split"].nunique() == 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1000, 1400), pos=st.floats(0.2, 0.8))
def test_deterministic_order_independent_and_stratified(seed: int, n: int, pos: float) -> None:
    m = synthetic_image_table(seed, n, pos)
    cfg = SplitConfig()
    out = assign_splits(m, cfg)
    shuffled = m.sample(frac=1.0, random_state=seed % 1000).reset_index(drop=True)
    again = assign_splits(shuffled, cfg)
    pd.testing.assert_frame_equal(out, again, obj="splits from a shuffled image table")
    assert out["image_id"].is_unique
    overall = out["label"].mean()
    for name in SPLITS:
        rows = out[out["split"] == name]
        frac = len(rows) / n
        assert abs(frac - RATIOS[name]) < 0.01, f"{name}: fraction {frac:.3f} vs ratio {RATIOS[name]}"
        rate = rows["label"].mean()
        assert abs(rate - overall) < 0.03, f"{name}: positive rate {rate:.3f} vs overall {overall:.3f}"


def test_salt_changes_assignment() -> None:
    m = synthetic_image_table(3, 500)
    a = assign_splits(m, SplitConfig(salt="a"))
    b = assign_splits(m, SplitConfig(salt="b"))
    assert (a["split"] != b["split"]).mean() > 0.2, "a different salt should reshuffle free groups"


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_new=st.integers(1, 800))
def test_sticky_across_versions(seed: int, n_new: int) -> None:
    v1 = synthetic_image_table(seed, 1000)
    s1 = assign_splits(v1)
    new = synthetic_image_table(seed + 1, n_new)
    # some new images are near-duplicates of old ones: they must follow their group's old split
    joiners = new.head(min(10, n_new)).copy()
    joiners["phash"] = [flip_bits(h, [5, 9]) for h in v1["phash"].head(len(joiners))]
    new.loc[joiners.index, "phash"] = joiners["phash"]
    v2 = pd.concat([v1, new], ignore_index=True)
    s2 = assign_splits(v2, previous=s1)
    merged = s1[["image_id", "split"]].merge(s2[["image_id", "split"]], on="image_id", suffixes=("_1", "_2"))
    assert len(merged) == len(s1), "every old image is still in the table"
    moved = merged[merged["split_1"] != merged["split_2"]]
    assert moved.empty, f"{len(moved)} old images moved split"
    old_split = dict(zip(s1["image_id"], s1["split"]))
    new_split = dict(zip(s2["image_id"], s2["split"]))
    for old_id, new_id in zip(v1["image_id"].head(len(joiners)), joiners["image_id"]):
        assert new_split[new_id] == old_split[old_id], "a new near-duplicate takes its group's split"
    counts = split_summary(s2)
    total = len(s2)
    for name in SPLITS:
        frac = counts[name]["n"] / total
        assert abs(frac - RATIOS[name]) < 0.02, f"after growth {name} holds {frac:.3f}, ratio {RATIOS[name]}"


def test_sticky_conflict_is_reported_and_kept() -> None:
    m = synthetic_image_table(4, 2)
    m["phash"] = ["0000000000000000", "ffffffffffffffff"]
    previous = pd.DataFrame({"image_id": m["image_id"], "split": ["train", "val_test"]})
    m2 = m.copy()
    m2.loc[1, "phash"] = "0000000000000003"  # recomputed hash now joins the two images
    out = assign_splits(m2, previous=previous)
    assert dict(zip(out["image_id"], out["split"])) == dict(zip(previous["image_id"], previous["split"]))
    assert out.attrs["sticky_conflicts"] == [min(m["image_id"])]


def test_previous_table_validated() -> None:
    m = synthetic_image_table(5, 3)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        assign_splits(m, previous=pd.DataFrame({"image_id": m["image_id"], "split": "holdout"}))


def test_a_new_image_bridging_two_splits_is_quarantined_not_deadlocked() -> None:
    from roadwork_core.data.split_checks import check_no_near_duplicates_across_splits, check_sticky

    v1 = synthetic_image_table(6, 40)
    a_hash = v1.loc[0, "phash"]
    v1.loc[1, "phash"] = flip_bits(a_hash, list(range(12)))  # b: 12 bits from a, its own group
    s1 = assign_splits(v1)
    s1.loc[s1["image_id"] == v1.loc[0, "image_id"], "split"] = "train"
    s1.loc[s1["image_id"] == v1.loc[1, "image_id"], "split"] = "val_select"
    assert check_no_near_duplicates_across_splits(s1).passed, "a and b are 12 bits apart: no leak yet"
    x = synthetic_image_table(7, 1)
    x["phash"] = flip_bits(a_hash, list(range(6)))  # 6 bits from a and 6 from b: joins both
    v2 = pd.concat([v1, x], ignore_index=True)
    s2 = assign_splits(v2, previous=s1)
    x_id = x.loc[0, "image_id"]
    assert x_id not in set(s2["image_id"]), "the bridging image must be left out of every split"
    assert len(s2) == len(v1) and check_sticky(s2, s1).passed
    assert check_no_near_duplicates_across_splits(s2).passed, "quarantine must leave no cross-split pair"
    (q,) = s2.attrs["quarantined"]
    assert q["image_id"] == x_id and q["reason"] == "bridges_splits", q
    pair = set(q["bridges"].split(" ~ "))
    assert pair == {f"{v1.loc[0, 'image_id']} [train]", f"{v1.loc[1, 'image_id']} [val_select]"}, q
    assert "distance 6" in q["detail"] and q["file"] == f"{x.loc[0, 'source']}/{x.loc[0, 'file']}", q
    # the next version builds on this one and stays unblocked, with the same quarantine
    s3 = assign_splits(v2, previous=s2)
    assert s3.attrs["quarantined"] == s2.attrs["quarantined"]
    assert check_no_near_duplicates_across_splits(s3).passed and check_sticky(s3, s2).passed
