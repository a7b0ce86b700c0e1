"""The ExPLoRA unlabelled pool is filtered by perceptual hash against the evaluation splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from roadwork_core.contracts import SplitContractViolation, SplitReader
from roadwork_core.contracts.splits import audit_hashes_read
from roadwork_core.data.pool import cap_explora_images, filter_unlabelled_pool
from tests.unit.test_splits import phash_of, resized_reencoded, textured_jpeg


def test_pool_drops_near_copies_of_evaluation_images_and_unreadable_files(tmp_path: Path) -> None:
    test_img, calib_img, train_img = textured_jpeg(1), textured_jpeg(2), textured_jpeg(3)
    pool = tmp_path / "unlabelled"
    pool.mkdir()
    (pool / "copy_of_test.jpg").write_bytes(resized_reencoded(test_img))
    (pool / "fresh.jpg").write_bytes(textured_jpeg(4))
    (pool / "copy_of_train.jpg").write_bytes(resized_reencoded(train_img))  # train copies are fine
    (pool / "broken.jpg").write_bytes(b"not a jpeg")
    reference = pd.DataFrame(
        {
            "image_id": ["t1", "c1"],
            "split": ["val_test", "val_calib"],
            "phash": [phash_of(test_img), phash_of(calib_img)],
            "file": ["images/t1.jpg", "images/c1.jpg"],
        }
    )
    uris = sorted(str(p) for p in pool.iterdir())
    result = filter_unlabelled_pool(uris, reference, radius=6)
    assert sorted(Path(u).name for u in result.kept) == ["copy_of_train.jpg", "fresh.jpg"], result.kept
    dropped = result.dropped.set_index(result.dropped["uri"].map(lambda u: Path(u).name))
    assert set(dropped.index) == {"copy_of_test.jpg", "broken.jpg"}, dropped
    copy = dropped.loc["copy_of_test.jpg"]
    assert (copy["reason"], copy["image_id"], copy["split"]) == ("near_duplicate_of_eval", "t1", "val_test")
    assert "images/t1.jpg" in copy["detail"] and copy["distance"] <= 6, copy
    assert dropped.loc["broken.jpg", "reason"] == "unreadable"
    one_thread = filter_unlabelled_pool(uris, reference, radius=6, workers=1)
    assert one_thread.kept == result.kept, "the threads must not change what is kept"
    pd.testing.assert_frame_equal(
        one_thread.dropped.drop(columns="detail"), result.dropped.drop(columns="detail")
    )
    with pytest.raises(ValueError, match="phash"):
        filter_unlabelled_pool(uris, reference.drop(columns="phash"))


def test_explora_reads_only_hashes_of_the_other_splits_and_the_audit_checks_it() -> None:
    table = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "split": ["train", "val_select", "val_calib", "val_test"],
            "label": [1, 0, 1, 0],
            "uri": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "phash": ["0" * 16, "1" * 16, "2" * 16, "3" * 16],
        }
    )
    reader = SplitReader("explora_backbone", table)
    hashes = reader.read_phashes("val_test")
    assert list(hashes.columns) == ["image_id", "split", "phash"] and hashes["image_id"].tolist() == ["d"]
    assert reader.hashes_read == ["val_test"] and reader.splits_read == [], "hashes are not a split read"
    with pytest.raises(SplitContractViolation):
        reader.read("val_test")
    with pytest.raises(SplitContractViolation):
        SplitReader("calibrator", table).read_phashes("val_test")
    assert audit_hashes_read("explora_backbone", ["val_test"]) == [
        "did not filter against val_calib (no hashes of it read)",
        "did not filter against val_select (no hashes of it read)",
    ]
    assert len(audit_hashes_read("explora_backbone", None)) == 3, "recording nothing must fail the audit"
    assert audit_hashes_read("explora_backbone", ["val_select", "val_calib", "val_test"]) == []
    assert audit_hashes_read("classifier", ["val_test"]) == [
        "read the hashes of val_test, which its contract does not grant"
    ]


def test_explora_cap_keeps_train_first_and_counts_the_pool_images_it_keeps() -> None:
    train = [f"train/{i}.jpg" for i in range(100)]
    pool = [f"unlabelled/{i}.jpg" for i in range(20)]
    assert cap_explora_images(train, pool, 110) == ([*train, *pool[:10]], 10)
    assert cap_explora_images(train, pool, 64) == (train[:64], 0), "a cap below train leaves the pool out"
    assert cap_explora_images(train, pool, None) == ([*train, *pool], 20), "no cap: everything"
    assert cap_explora_images(train, pool, 500) == ([*train, *pool], 20)
    with pytest.raises(ValueError, match="max_images = 0"):
        cap_explora_images(train, pool, 0)
