"""HR crop planning: random crops or a non-overlapping grid, with reflect padding for small images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    size: int
    hflip: bool

    @property
    def box(self) -> list[int]:
        """[left, top, right, bottom] in the (possibly padded) image, as PIL orders boxes."""
        return [self.left, self.top, self.left + self.size, self.top + self.size]


def reflect_pad_to(pixels: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad an H x W x C image so both sides are at least ``size``; centred.

    Returns the padded image and the (top, left) padding, so crop boxes can be mapped back to
    source coordinates. Repeats the reflection when the image is smaller than half the target.
    """
    height, width = pixels.shape[:2]
    need_y, need_x = max(size - height, 0), max(size - width, 0)
    pad_top, pad_left = need_y // 2, need_x // 2
    before = [pad_top, pad_left]
    after = [need_y - pad_top, need_x - pad_left]
    while any(before) or any(after):
        h, w = pixels.shape[:2]
        step_b = [min(before[0], h - 1), min(before[1], w - 1)]
        step_a = [min(after[0], h - 1), min(after[1], w - 1)]
        pixels = np.pad(pixels, ((step_b[0], step_a[0]), (step_b[1], step_a[1]), (0, 0)), mode="reflect")
        before = [before[i] - step_b[i] for i in range(2)]
        after = [after[i] - step_a[i] for i in range(2)]
    return pixels, (pad_top, pad_left)


def plan_crops(
    height: int, width: int, size: int, mode: str, count: int, hflip: bool, rng: np.random.Generator
) -> list[Crop]:
    """Crop positions for an image at least ``size`` on each side.

    random: ``count`` crops at uniformly drawn positions; grid: every non-overlapping tile,
    the grid centred so the unused margin is split evenly.
    """
    if height < size or width < size:
        raise ValueError(f"image {width}x{height} is smaller than the crop {size}; pad it first")
    if mode == "random":
        crops = []
        for _ in range(count):
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
            crops.append(Crop(top, left, size, bool(hflip and rng.random() < 0.5)))
        return crops
    if mode == "grid":
        rows, cols = height // size, width // size
        off_y, off_x = (height - rows * size) // 2, (width - cols * size) // 2
        return [
            Crop(off_y + r * size, off_x + c * size, size, bool(hflip and rng.random() < 0.5))
            for r in range(rows)
            for c in range(cols)
        ]
    raise ValueError(f"unknown crop mode {mode!r}")


def cut(pixels: np.ndarray, crop: Crop) -> np.ndarray:
    tile = pixels[crop.top : crop.top + crop.size, crop.left : crop.left + crop.size]
    return np.ascontiguousarray(tile[:, ::-1] if crop.hflip else tile)
