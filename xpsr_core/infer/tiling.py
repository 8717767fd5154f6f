"""Seam-free tiled processing: overlapping tiles blended with Gaussian weights.

One helper, :func:`tiled_apply`, runs a function over overlapping tiles of a [B, C, H, W]
tensor and blends the (possibly rescaled) outputs: the latent noise prediction (scale 1), the
VAE encoder (scale 1/8) and the VAE decoder (scale 8) all go through it. Each output pixel is
``sum_k w_k * out_k / sum_k w_k`` over the tiles ``k`` covering it, with ``w_k`` a separable
Gaussian that is strictly positive everywhere, so the normalised weights sum to exactly 1 and
tile borders fade smoothly into their neighbours instead of leaving a seam.

Tiles have a fixed size (the model's native size); starts are spaced by ``tile - overlap`` and
the last tile is aligned to the end, so any size (not only multiples of the tile) is covered.
An input no larger than one tile is processed in one call, exactly as without tiling.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    overlap = max(0, min(overlap, tile - 1))
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    starts[-1] = length - tile
    return sorted(set(starts))


def tile_boxes(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[Box]:
    return [
        (y, y + min(tile_h, height), x, x + min(tile_w, width))
        for y in tile_starts(height, tile_h, overlap)
        for x in tile_starts(width, tile_w, overlap)
    ]


def gaussian_weights(height: int, width: int, sigma: float = 0.15, device=None) -> torch.Tensor:
    """A separable Gaussian [height, width] centred on the tile, ``sigma`` in tile lengths (never zero)."""

    def profile(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64, device=device)
        centre = (n - 1) / 2
        return torch.exp(-((x - centre) ** 2) / (2 * (sigma * n) ** 2))

    return (profile(height)[:, None] * profile(width)[None, :]).float()


def weight_map(
    height: int, width: int, tile_h: int, tile_w: int, overlap: int, scale: float = 1.0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum of tile weights, per-tile normalised weights pasted on the full canvas) in output coordinates.

    For tests and diagnostics: the normalised maps of all tiles sum to 1 everywhere.
    """
    out_h, out_w = round(height * scale), round(width * scale)
    total = torch.zeros(out_h, out_w)
    placed = []
    for y0, y1, x0, x1 in tile_boxes(height, width, tile_h, tile_w, overlap):
        oy0, oy1, ox0, ox1 = round(y0 * scale), round(y1 * scale), round(x0 * scale), round(x1 * scale)
        canvas = torch.zeros(out_h, out_w)
        canvas[oy0:oy1, ox0:ox1] = gaussian_weights(oy1 - oy0, ox1 - ox0)
        placed.append(canvas)
        total += canvas
    return total, [p / total for p in placed]


def tiled_apply(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor, Box], torch.Tensor],
    tile: int | tuple[int, int],
    overlap: int,
    scale: float = 1.0,
    sigma: float = 0.15,
) -> torch.Tensor:
    """Apply ``fn(tile_tensor, box)`` over overlapping tiles of ``x`` [B, C, H, W] and blend the outputs.

    ``scale`` is the output/input size ratio of ``fn`` (8 for a VAE decoder, 1/8 for its encoder).
    ``box`` is the tile's (y0, y1, x0, x1) in input coordinates, so ``fn`` can crop matching
    side inputs (the conditioning image). Blending is done in float32.
    """
    height, width = x.shape[-2:]
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    boxes = tile_boxes(height, width, tile_h, tile_w, overlap)
    if len(boxes) == 1:
        return fn(x, boxes[0])
    out = None
    total = None
    for box in boxes:
        y0, y1, x0, x1 = box
        result = fn(x[..., y0:y1, x0:x1], box).float()
        if out is None:
            out = torch.zeros(*result.shape[:2], round(height * scale), round(width * scale), device=result.device)
            total = torch.zeros(1, 1, *out.shape[-2:], device=result.device)
        oy0, ox0 = round(y0 * scale), round(x0 * scale)
        oh, ow = result.shape[-2:]
        weights = gaussian_weights(oh, ow, sigma, device=result.device)[None, None]
        out[..., oy0 : oy0 + oh, ox0 : ox0 + ow] += result * weights
        total[..., oy0 : oy0 + oh, ox0 : ox0 + ow] += weights
    return out / total
