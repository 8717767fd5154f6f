"""Side-by-side sample grids (LR upsampled | SR | HR) for evaluation and training validation."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image


def _as_image(pixels) -> Image.Image:
    if isinstance(pixels, Image.Image):
        return pixels.convert("RGB")
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def make_grid(lr_up, sr, hr=None, gap: int = 4, background: tuple = (255, 255, 255)) -> Image.Image:
    """One row: LR upsampled | SR | HR (HR optional). Panels are resized (bicubic) to the SR size.

    Accepts PIL images, uint8 H x W x 3 arrays, or float arrays in [0, 1].
    """
    panels = [_as_image(p) for p in (lr_up, sr, hr) if p is not None]
    size = panels[1].size
    panels = [p if p.size == size else p.resize(size, Image.BICUBIC) for p in panels]
    width = len(panels) * size[0] + (len(panels) - 1) * gap
    grid = Image.new("RGB", (width, size[1]), background)
    for index, panel in enumerate(panels):
        grid.paste(panel, (index * (size[0] + gap), 0))
    return grid


def stack_rows(rows: Sequence[Image.Image], gap: int = 4, background: tuple = (255, 255, 255), max_width: Optional[int] = None) -> Image.Image:
    """Stack grid rows vertically (rows of different widths are left-aligned); optionally shrink to ``max_width``."""
    width = max(r.size[0] for r in rows)
    height = sum(r.size[1] for r in rows) + gap * (len(rows) - 1)
    sheet = Image.new("RGB", (width, height), background)
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.size[1] + gap
    if max_width and width > max_width:
        sheet = sheet.resize((max_width, max(1, round(height * max_width / width))), Image.BICUBIC)
    return sheet
