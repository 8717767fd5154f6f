"""Degrade in-memory HR crops by key: per-key parameters, batches of equal sizes, 8-bit outputs.

    for result in degrade_crops([(key, hr_uint8), ...], settings=settings, seed=0, stage="degrade"):
        result.key, result.hr, result.lr, result.params   # uint8 H x W x 3, uint8 h x w x 3, flat dict

A crop's outputs depend only on its pixels, its key, the seed, the stage name and the settings: its
parameters come from ``numpy_rng(seed, stage, key)`` and ``degrade_batch`` keeps batch-mates apart.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..seeding import numpy_rng
from . import pipeline
from .sampling import sample_degradation
from .settings import DegradationSettings


class DegradedCrop(NamedTuple):
    key: str
    hr: np.ndarray  # H x W x 3 uint8: the HR target (USM-sharpened when asked)
    lr: np.ndarray  # H/scale x W/scale x 3 uint8
    params: dict[str, Any]  # every sampled degradation scalar (``DegradationParams.to_record``)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def degrade_crops(
    crops: Sequence[tuple[str, np.ndarray]],
    *,
    settings: DegradationSettings,
    seed: int,
    stage: str,
    usm_hr: bool = True,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> Iterator[DegradedCrop]:
    """Degrade square uint8 HR crops (``(key, H x W x 3)``, each at least ``settings.min_hr_size()``).

    Crops are taken ``batch_size`` at a time in the given order; within such a chunk, crops of equal
    size run as one ``degrade_batch`` call, sizes in the order they first appear. Results are yielded
    in that processing order (the given order when all crops have one size), one chunk at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(crops), batch_size):
        by_size: dict[tuple, list[tuple[str, np.ndarray]]] = {}
        for key, hr in crops[start : start + batch_size]:
            by_size.setdefault(hr.shape, []).append((key, hr))
        for group in by_size.values():
            params = [sample_degradation(numpy_rng(seed, stage, key), settings, hr.shape[0]) for key, hr in group]
            pixels = torch.from_numpy(np.stack([hr for _, hr in group])).permute(0, 3, 1, 2)
            hr_batch = pixels.to(device, dtype=torch.float32) / 255.0
            with torch.no_grad():
                # looked up when called, so that a replaced pipeline.degrade_batch takes effect
                target, lr = pipeline.degrade_batch(hr_batch, params, settings, usm_hr=usm_hr)
            for (key, _), sampled, hr_out, lr_out in zip(group, params, _to_uint8(target), _to_uint8(lr)):
                yield DegradedCrop(key, hr_out, lr_out, sampled.to_record())
