"""Synthetic scenes: deterministic per seed, positives really show their cues, metadata in range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_core.data.synthetic import (
    CUE_KINDS,
    SCENES,
    TIMES_OF_DAY,
    WEATHERS,
    draw_scene,
    make_demo_drop,
    plan_scene,
    render_scene,
)


def _drop_bytes(drop: Path) -> dict[str, bytes]:
    return {p.relative_to(drop).as_posix(): p.read_bytes() for p in sorted(drop.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_different_seed_or_version_differs(tmp_path: Path) -> None:
    a = _drop_bytes(make_demo_drop(tmp_path / "a", "v0001", n=6, seed=3, n_unlabelled=2))
    b = _drop_bytes(make_demo_drop(tmp_path / "b", "v0001", n=6, seed=3, n_unlabelled=2))
    assert a == b, "the same (version, seed) must reproduce every file byte for byte"
    parallel = _drop_bytes(make_demo_drop(tmp_path / "p", "v0001", n=6, seed=3, n_unlabelled=2, workers=2))
    assert parallel == a, "drawing in worker processes must give the same drop, file for file"
    c = _drop_bytes(make_demo_drop(tmp_path / "c", "v0001", n=6, seed=4))
    d = _drop_bytes(make_demo_drop(tmp_path / "d", "v0002", n=6, seed=3))
    images = [k for k in a if k.startswith("images/")]
    for other, what in ((c, "seed"), (d, "version")):
        same = [k for k in images if a[k] == other[k]]
        assert not same, f"a different {what} must give different images, identical: {same}"


def test_drop_layout_labels_and_ready_marker(tmp_path: Path) -> None:
    drop = make_demo_drop(tmp_path, "2026-01-01", n=40, seed=0, positive_rate=0.5, n_unlabelled=3)
    assert drop == tmp_path / "2026-01-01"
    assert (drop / "_READY").is_file(), "a finished drop must carry _READY"
    labels = pd.read_csv(drop / "labels.csv", dtype=str, keep_default_na=False)
    assert list(labels.columns) == ["file", "label", "time_of_day", "weather", "scene", "mask_x", "mask_y"]
    # the mask point: inside the image for every positive, blank for every negative
    for rec in labels.to_dict("records"):
        if rec["label"] == "0":
            assert rec["mask_x"] == rec["mask_y"] == "", rec
        else:
            w, h = Image.open(drop / rec["file"]).size
            assert 0 <= int(rec["mask_x"]) < w and 0 <= int(rec["mask_y"]) < h, rec
    assert len(labels) == 40
    assert all((drop / f).is_file() for f in labels["file"]), "every labels.csv row must point at a file"
    assert set(labels["label"]) == {"0", "1"}, "a 40-image drop at rate 0.5 must hold both classes"
    assert set(labels["time_of_day"]) <= set(TIMES_OF_DAY)
    assert set(labels["weather"]) <= set(WEATHERS)
    assert set(labels["scene"]) <= set(SCENES)
    assert len(list((drop / "unlabelled").glob("*.jpg"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "no temporary folder may remain"
    sizes = {Image.open(drop / f).size for f in labels["file"]}
    assert len(sizes) >= 3, f"image sizes should vary, got {sizes}"


def test_a_scaled_drop_draws_the_same_scenes_smaller(tmp_path: Path) -> None:
    full = make_demo_drop(tmp_path / "full", "v0001", n=8, seed=5)
    half = make_demo_drop(tmp_path / "half", "v0001", n=8, seed=5, scale=0.5)
    a = pd.read_csv(full / "labels.csv", dtype=str, keep_default_na=False)
    b = pd.read_csv(half / "labels.csv", dtype=str, keep_default_na=False)
    cols = ["file", "label", "time_of_day", "weather", "scene"]
    assert a[cols].equals(b[cols]), "a scale must not change which scenes are drawn"
    for f in a["file"]:
        (w, h), (hw, hh) = Image.open(full / f).size, Image.open(half / f).size
        assert (hw, hh) == (round(w / 2), round(h / 2)), f"{f}: {w}x{h} at scale 0.5 is {hw}x{hh}"
    with pytest.raises(ValueError, match=r"scale=0.1 draws a 320x240 scene at 32x24.*at least 0.27"):
        make_demo_drop(tmp_path / "tiny", "v0001", n=2, scale=0.1)
    assert not (tmp_path / "tiny").exists(), "a refused scale must not leave a drop behind"


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive_rate"):
        make_demo_drop(tmp_path, "v1", n=2, positive_rate=1.5)
    with pytest.raises(ValueError, match="workers=0"):
        make_demo_drop(tmp_path, "v1", n=2, workers=0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("index", range(16))
def test_positive_scenes_show_their_cues(index: int, scale: float) -> None:
    plan = plan_scene(np.random.default_rng([7, index]), positive=True, scale=scale)
    assert plan.label == 1 and plan.cues, "a positive must carry at least one cue"
    with_cues = np.asarray(render_scene(plan), dtype=np.int16)  # (H, W, 3)
    without = np.asarray(render_scene(plan, cues=False), dtype=np.int16)
    w, h = plan.size
    for cue, _ in plan.cues:
        x0, y0, x1, y1 = cue.box
        assert cue.kind in CUE_KINDS
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, f"{cue} must lie inside the {w}x{h} image"
        diff = np.abs(with_cues[y0:y1, x0:x1] - without[y0:y1, x0:x1]).mean()
        assert diff > 1.0, f"{cue} is not visible: mean pixel change {diff:.2f} in its box ({plan.metadata})"


def test_draw_scene_matches_plan_and_negatives_have_no_cues() -> None:
    for i in range(12):
        scene = draw_scene(np.random.default_rng([1, i]), positive=False, hard_negative=i % 2 == 0)
        assert scene.label == 0 and scene.cues == [], "negatives must carry no cues"
        assert set(scene.metadata) == {"time_of_day", "weather", "scene"}
        assert scene.metadata["time_of_day"] in TIMES_OF_DAY
        assert scene.metadata["weather"] in WEATHERS
        assert scene.metadata["scene"] in SCENES
        assert scene.image.mode == "RGB"
    a = draw_scene(np.random.default_rng(5), positive=True, size=(320, 240))
    b = draw_scene(np.random.default_rng(5), positive=True, size=(320, 240))
    assert a.image.size == (320, 240)
    assert a.image.tobytes() == b.image.tobytes() and a.cues == b.cues, (
        "same rng state must draw the same scene"
    )


def _orange_fraction(img: Image.Image) -> float:
    rgb = np.asarray(img, dtype=np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(((r > 200) & (g > 60) & (g < 170) & (b < 60)).mean())


def test_hard_negatives_carry_orange_distractors() -> None:
    def share(hard: bool) -> float:
        return float(
            np.mean(
                [
                    _orange_fraction(
                        draw_scene(np.random.default_rng([2, i]), positive=False, hard_negative=hard).image
                    )
                    > 0
                    for i in range(30)
                ]
            )
        )

    hard, plain = share(True), share(False)
    assert hard > plain + 0.3, (
        f"hard negatives should show orange things far more often ({hard:.2f} vs {plain:.2f})"
    )
