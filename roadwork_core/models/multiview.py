"""Multi-view geometry: one global view plus a grid x grid set of overlapping tiles of a square canvas.

The tiles cover the canvas symmetrically: the first tile starts at 0, the last ends at the canvas
edge, and the layout is the same under horizontal and vertical mirroring (the original sketch only
extended tiles right and down). With the default canvas size every tile is exactly `view_size`
pixels, so tiles are pixel-exact crops; any other canvas size resizes tiles to `view_size`.

View order (V = num_views): global first, then tiles row-major, then (hflip_tta) the flipped copy
of every view in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roadwork_core.config import MultiViewConfig

__all__ = [
    "MultiViewConfig",
    "extract_views",
    "merge_flipped_views",
    "num_views",
    "resolve_canvas_size",
    "tile_boxes",
]


def _view_size(cfg: MultiViewConfig) -> int:
    if cfg.view_size is None:
        raise ValueError(
            "MultiViewConfig.view_size is None (= the backbone's input size): build the model with "
            "build_classifier, which fills it in, or set view_size explicitly"
        )
    return cfg.view_size


def num_views(cfg: MultiViewConfig) -> int:
    return (int(cfg.include_global) + cfg.grid * cfg.grid) * (2 if cfg.hflip_tta else 1)


def resolve_canvas_size(cfg: MultiViewConfig) -> int:
    """Canvas side: `cfg.canvas_size`, else view_size + (grid-1) * round(view_size * (1 - overlap)).

    That is round(view_size * (grid - (grid-1) * overlap)) up to rounding of the tile stride, chosen
    so that tiles are exactly view_size pixels and the layout is exactly symmetric.
    """
    if cfg.canvas_size is not None:
        return int(cfg.canvas_size)
    view_size = _view_size(cfg)
    return view_size + (cfg.grid - 1) * round(view_size * (1.0 - cfg.overlap))


def _tile_starts(canvas: int, grid: int, overlap: float) -> tuple[list[int], int]:
    """Start offsets along one axis and the tile side, symmetric about the canvas centre."""
    if grid == 1:
        return [0], canvas
    tile = round(canvas / (grid - (grid - 1) * overlap))
    tile = max(tile, -(-canvas // grid))  # never a gap: grid tiles must span the canvas
    if grid % 2 == 1 and (canvas - tile) % 2 == 1:
        tile += 1  # the middle tile must be centred exactly: canvas - tile even
    tile = min(tile, canvas)
    stride = (canvas - tile) / (grid - 1)
    starts = [0] * grid
    for i in range((grid + 1) // 2):
        starts[i] = round(i * stride)
        starts[grid - 1 - i] = canvas - tile - starts[i]
    return starts, tile


def tile_boxes(canvas: int, cfg: MultiViewConfig) -> torch.LongTensor:
    """(grid*grid, 4) boxes x0, y0, x1, y1 (x1 / y1 exclusive), row-major (y outer, x inner)."""
    starts, tile = _tile_starts(canvas, cfg.grid, cfg.overlap)
    s = torch.tensor(starts, dtype=torch.long)
    y0, x0 = torch.meshgrid(s, s, indexing="ij")  # (g, g) each
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    return torch.stack([x0, y0, x0 + tile, y0 + tile], dim=1)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size), antialiased bilinear; identity when already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def extract_views(canvas: torch.Tensor, cfg: MultiViewConfig) -> torch.Tensor:
    """(B, 3, C, C) float canvas -> (B, V, 3, S, S) views, on the canvas's device, no per-tile loop.

    Tiles are gathered with one advanced-indexing op over precomputed row / column indices.
    """
    B, ch, H, W = canvas.shape
    if H != W:
        raise ValueError(f"extract_views expects a square canvas, got {H}x{W}; resize with load_canvas first")
    S, g = _view_size(cfg), cfg.grid
    starts, tile = _tile_starts(H, g, cfg.overlap)
    offsets = torch.arange(tile, device=canvas.device)
    idx = torch.tensor(starts, device=canvas.device)[:, None] + offsets  # (g, tile)
    rows = idx[:, None, :, None]  # (g, 1, tile, 1)
    cols = idx[None, :, None, :]  # (1, g, 1, tile)
    tiles = canvas[:, :, rows, cols]  # (B, 3, g, g, tile, tile)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(B * g * g, ch, tile, tile)
    tiles = _resize(tiles, S).reshape(B, g * g, ch, S, S)
    views = tiles
    if cfg.include_global:
        views = torch.cat([_resize(canvas, S)[:, None], tiles], dim=1)  # (B, 1 + g*g, 3, S, S)
    if cfg.hflip_tta:
        views = torch.cat([views, views.flip(-1)], dim=1)
    return views


def merge_flipped_views(
    view_logits: torch.Tensor, feats: torch.Tensor, cfg: MultiViewConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """With hflip_tta, fuse every view with its flipped copy before the aggregator sees them.

    view_logits (B, V), feats (B, V, D) in extract_views order -> (B, V/2), (B, V/2, D): a view's
    probability is the mean of its own and its flip's, its features the mean of both. Without this,
    the flipped twin of the best tile took one of the top-k slots, so k = 3 covered about two distinct
    views. Identity when hflip_tta is off.
    """
    if not cfg.hflip_tta:
        return view_logits, feats
    B, V = view_logits.shape
    pair_probs = view_logits.float().sigmoid().reshape(B, 2, V // 2)  # (B, 2, V/2): [views, flipped]
    prob = pair_probs.mean(dim=1).clamp(1e-6, 1.0 - 1e-6)  # (B, V/2)
    return torch.logit(prob), feats.reshape(B, 2, V // 2, -1).mean(dim=1)
