"""Side-by-side sample grids (LR upsampled | SR | HR) for evaluation and training validation."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image


def as_rgb_image(pixels) -> Image.Image:
    """An RGB PIL image from a PIL image, a uint8 H x W x 3 array or a float array in [0, 1]."""
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
    panels = [as_rgb_image(p) for p in (lr_up, sr, hr) if p is not None]
    size = panels[1].size
    panels = [p if p.size == size else p.resize(size, Image.BICUBIC) for p in panels]
    return join_row(panels, gap, background)


def join_row(panels: Sequence[Image.Image], gap: int = 4, background: tuple = (255, 255, 255)) -> Image.Image:
    """Equal-sized panels side by side, ``gap`` pixels apart."""
    width, height = panels[0].size
    row = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * gap, height), background)
    for index, panel in enumerate(panels):
        row.paste(panel, (index * (width + gap), 0))
    return row


def stack_rows(
    rows: Sequence[Image.Image], gap: int = 4, background: tuple = (255, 255, 255), max_width: Optional[int] = None
) -> Image.Image:
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
