"""Multi-view geometry and extraction: coverage, overlap, symmetry, equality with a per-tile reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from roadwork_core.models.multiview import (
    MultiViewConfig,
    extract_views,
    num_views,
    resolve_canvas_size,
    tile_boxes,
)

GEOMETRIES = [
    (canvas, grid, overlap)
    for canvas in (86, 97, 100, 604, 605)
    for grid in (1, 2, 3, 4)
    for overlap in (0.0, 0.15, 0.3)
]


@pytest.mark.parametrize(("canvas", "grid", "overlap"), GEOMETRIES)
def test_tiles_cover_every_pixel(canvas: int, grid: int, overlap: float) -> None:
    boxes = tile_boxes(canvas, MultiViewConfig(grid=grid, overlap=overlap))
    assert boxes.shape == (grid * grid, 4)
    assert boxes.min() >= 0 and boxes.max() <= canvas, f"box outside the canvas: {boxes.tolist()}"
    covered = torch.zeros(canvas, canvas, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        covered[y0:y1, x0:x1] = True
    assert covered.all(), f"{(~covered).sum()} uncovered pixels for canvas={canvas} grid={grid}"


@pytest.mark.parametrize(("canvas", "grid", "overlap"), GEOMETRIES)
def test_tiles_are_symmetric_under_mirroring(canvas: int, grid: int, overlap: float) -> None:
    boxes = tile_boxes(canvas, MultiViewConfig(grid=grid, overlap=overlap))
    x0, y0, x1, y1 = boxes.unbind(1)
    as_set = {tuple(b) for b in boxes.tolist()}
    h_mirror = {tuple(b) for b in torch.stack([canvas - x1, y0, canvas - x0, y1], 1).tolist()}
    v_mirror = {tuple(b) for b in torch.stack([x0, canvas - y1, x1, canvas - y0], 1).tolist()}
    assert h_mirror == as_set, f"not symmetric left-right: {sorted(as_set)}"
    assert v_mirror == as_set, f"not symmetric top-bottom: {sorted(as_set)}"


@pytest.mark.parametrize(("canvas", "grid", "overlap"), [g for g in GEOMETRIES if g[1] > 1])
def test_neighbours_overlap_by_the_configured_fraction(canvas: int, grid: int, overlap: float) -> None:
    boxes = tile_boxes(canvas, MultiViewConfig(grid=grid, overlap=overlap))
    tile = int(boxes[0, 2] - boxes[0, 0])
    assert ((boxes[:, 2] - boxes[:, 0]) == tile).all() and ((boxes[:, 3] - boxes[:, 1]) == tile).all()
    xs = boxes[:grid]  # first row, left to right
    shared = (xs[:-1, 2] - xs[1:, 0]).float()  # pixels shared by horizontal neighbours
    # integer boxes: within 2 pixels of the exact fraction (rounding + centring the middle tile)
    assert (shared - overlap * tile).abs().max() <= 2.0, f"overlaps {shared.tolist()} vs {overlap}*{tile}"


def test_default_canvas_makes_tiles_exactly_view_size() -> None:
    for view_size, grid, overlap in [(224, 3, 0.15), (32, 3, 0.15), (256, 2, 0.25), (32, 4, 0.0)]:
        cfg = MultiViewConfig(view_size=view_size, grid=grid, overlap=overlap)
        canvas = resolve_canvas_size(cfg)
        assert abs(canvas - view_size * (grid - (grid - 1) * overlap)) <= grid, f"canvas {canvas} for {cfg}"
        boxes = tile_boxes(canvas, cfg)
        assert ((boxes[:, 2] - boxes[:, 0]) == view_size).all(), f"tiles {boxes.tolist()} for {cfg}"
    assert resolve_canvas_size(MultiViewConfig(canvas_size=300)) == 300


def test_num_views() -> None:
    assert num_views(MultiViewConfig()) == 10
    assert num_views(MultiViewConfig(include_global=False)) == 9
    assert num_views(MultiViewConfig(hflip_tta=True)) == 20
    assert num_views(MultiViewConfig(grid=2, include_global=False, hflip_tta=True)) == 8


def _reference_views(canvas: torch.Tensor, cfg: MultiViewConfig) -> torch.Tensor:
    """Per-image, per-tile slicing: the obvious loop the vectorized version must equal."""

    def resize(img: torch.Tensor) -> torch.Tensor:
        if img.shape[-1] == cfg.view_size:
            return img
        size = (cfg.view_size, cfg.view_size)
        return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]

    out = []
    for image in canvas:
        views = [resize(image)] if cfg.include_global else []
        for x0, y0, x1, y1 in tile_boxes(image.shape[-1], cfg).tolist():
            views.append(resize(image[:, y0:y1, x0:x1]))
        if cfg.hflip_tta:
            views += [v.flip(-1) for v in views]
        out.append(torch.stack(views))
    return torch.stack(out)


@pytest.mark.parametrize(
    "cfg",
    [
        MultiViewConfig(view_size=32),
        MultiViewConfig(view_size=32, hflip_tta=True),
        MultiViewConfig(view_size=32, include_global=False, grid=2, overlap=0.3),
        MultiViewConfig(view_size=32, canvas_size=101),  # tiles resized to the view size
        MultiViewConfig(view_size=24, grid=4, overlap=0.0, canvas_size=64, hflip_tta=True),
    ],
    ids=["default", "hflip", "no-global-2x2", "resized-tiles", "4x4-hflip"],
)
def test_vectorized_extraction_equals_per_tile_reference(cfg: MultiViewConfig) -> None:
    torch.manual_seed(0)
    side = resolve_canvas_size(cfg)
    canvas = torch.rand(3, 3, side, side)
    views = extract_views(canvas, cfg)
    assert views.shape == (3, num_views(cfg), 3, cfg.view_size, cfg.view_size)
    torch.testing.assert_close(views, _reference_views(canvas, cfg), atol=1e-5, rtol=1e-5)


def test_view_order_global_then_row_major_tiles() -> None:
    cfg = MultiViewConfig(view_size=8, grid=3, overlap=0.0, canvas_size=24)
    canvas = torch.arange(24.0).repeat(24, 1)[None, None].repeat(1, 3, 1, 1)  # value = column index
    canvas = canvas + 100.0 * torch.arange(24.0)[:, None]  # + 100 * row index
    views = extract_views(canvas, cfg)[0]  # (10, 3, 8, 8)
    assert views[1, 0, 0, 0] == 0.0 and views[2, 0, 0, 0] == 8.0, "second tile should be to the right"
    assert views[4, 0, 0, 0] == 800.0, "fourth tile starts the second row"
    assert views[9, 0, -1, -1] == 2323.0, "last tile is the bottom-right corner"


def test_non_square_canvas_is_rejected() -> None:
    with pytest.raises(ValueError, match="square canvas"):
        extract_views(torch.rand(1, 3, 32, 40), MultiViewConfig(view_size=16))


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="overlap"):
        MultiViewConfig(overlap=1.0)
    with pytest.raises(ValueError, match="grid"):
        MultiViewConfig(grid=0)
