"""From the LR image to the ControlNet condition, and from the sampled image back to the output size.

Training (``train/data.py``) and inference (``infer/pipeline.py``) both make the condition here:
:func:`upsample` of the LR in [0, 1] by the scale factor, or one of the two chains of
:func:`prepare_condition`.

Two chains (``SRSettings.resize``):

* ``torch-bicubic`` (default): the LR as float in [0, 1], ``F.interpolate`` bicubic by the scale
  factor, clamped. The pipeline pads it to the model's multiple and crops the output back.
* ``pil-bicubic`` (the authors' test script): PIL's bicubic resize of the 8-bit LR by the scale
  factor; then, when the short side is below ``process_size``, torchvision's ``Resize`` (bilinear,
  short side to ``process_size``, long side ``int(process_size * long / short)``) of the PIL image;
  then a PIL bicubic resize down to a multiple of the VAE factor (floor; none when already one).
  The condition is that 8-bit image / 255. At the end the 8-bit output is resized (PIL bicubic)
  to LR size x scale (nothing happens when the sizes already agree).

With ``torch-bicubic`` a ``process_size`` enlarges the float condition the same way (bilinear) and
the output is resized back bicubically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .infer.settings import RESIZES


@dataclass
class Condition:
    image: torch.Tensor  # [1, 3, H, W] float32 in [0, 1]: what the ControlNet sees (before padding)
    image_uint8: np.ndarray  # the same as H x W x 3 uint8
    lr_up: np.ndarray  # the LR upsampled by the scale factor, uint8 (output size)
    output_size: tuple[int, int]  # (height, width) of the final output: LR size x scale

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the short side ``short`` and the long side scaled and truncated (torchvision's rule)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _rgb_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {array.shape}")
    return array


def _as_uint8_rgb(lr) -> np.ndarray:
    array = _rgb_array(lr)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def to_tensor(image) -> torch.Tensor:
    """PIL image or H x W x 3 uint8 array -> [1, 3, H, W] float32 in [0, 1]."""
    array = _rgb_array(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> H x W x 3 uint8 (clamped, rounded)."""
    return (x[0].float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()


def upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, 3, h, w] in [0, 1], bicubic by ``scale`` and clamped: the condition of training and ``torch-bicubic``."""
    height, width = lr.shape[-2:]
    return F.interpolate(lr, size=(height * scale, width * scale), mode="bicubic", align_corners=False).clamp(0, 1)


def prepare_condition(lr, scale: int, resize: str = "torch-bicubic", process_size: Optional[int] = None,
                      multiple: int = 8, device=None) -> Condition:
    """The condition for an LR image (PIL or uint8 / float array) under one of the two chains.

    ``multiple``: the PIL chain's final size is a multiple of it (the VAE factor). ``device``: where
    the torch chain interpolates (the condition is returned there; the PIL chain's on the CPU).
    """
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; choose from {RESIZES}")
    if resize == "pil-bicubic":
        return _pil_chain(lr, scale, process_size, multiple)
    lr_t = to_tensor(lr).to(device or "cpu")
    height, width = lr_t.shape[-2:]
    up = upsample(lr_t, scale)
    image = up
    if process_size is not None and min(image.shape[-2:]) < process_size:
        size = short_side_size(int(image.shape[-2]), int(image.shape[-1]), process_size)
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    lr_up = to_uint8(up)
    return Condition(
        image=image, image_uint8=to_uint8(image), lr_up=lr_up, output_size=(int(height) * scale, int(width) * scale)
    )


def _pil_chain(lr, scale: int, process_size: Optional[int], multiple: int) -> Condition:
    pixels = _as_uint8_rgb(lr)
    height, width = pixels.shape[:2]
    up = Image.fromarray(pixels).resize((width * scale, height * scale), Image.Resampling.BICUBIC)
    image = up
    if process_size is not None and min(image.size) < process_size:
        image = TF.resize(image, process_size, interpolation=InterpolationMode.BILINEAR)
    image = image.resize(
        (image.size[0] // multiple * multiple, image.size[1] // multiple * multiple), Image.Resampling.BICUBIC
    )
    u8 = np.asarray(image).copy()
    return Condition(
        image=to_tensor(u8), image_uint8=u8, lr_up=np.asarray(up).copy(), output_size=(height * scale, width * scale)
    )


def resize_output(image: np.ndarray, size: tuple[int, int], resize: str = "torch-bicubic") -> np.ndarray:
    """An H x W x 3 uint8 output resized to ``size`` (height, width); unchanged when it already has it."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    if resize == "pil-bicubic":
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)).copy()
    x = to_tensor(image)
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return to_uint8(F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink))
