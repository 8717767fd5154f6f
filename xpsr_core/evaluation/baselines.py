"""Baseline upscalers scored beside XPSR: bicubic interpolation and Real-ESRGAN (RRDBNet).

Real-ESRGAN runs from a local checkpoint only (``RealESRGAN_x4plus.pth`` or ``RealESRGAN_x2plus.pth``);
nothing is downloaded. The network is basicsr's ``RRDBNet``; its width, depth and scale are read from
the checkpoint, so any RRDBNet saved in the same layout loads. Inference follows Real-ESRGAN's
``RealESRGANer.enhance`` for RGB uint8 input without pre-padding (the inference script's default):
[0, 1] float32 input, reflect padding of the bottom and right edges to the pixel-unshuffle multiple
(2 for the x2 model, 4 at x1), optional tiles that read ``tile_pad`` pixels of context from the image,
output clamped to [0, 1], times 255, rounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xpsr_core.errors import UserError

from ..degrade.compat import RRDBNet  # basicsr needs its torchvision alias before the first import
from ..io.model_files import loading_model

__all__ = ["RRDBNetShape", "RealESRGANUpscaler", "bicubic_upscale", "load_rrdbnet", "read_rrdbnet_state"]

# RRDBNet's first conv sees 3 channels at x4, pixel-unshuffled 3 x 2 x 2 at x2 and 3 x 4 x 4 at x1
_SCALE_BY_INPUT_CHANNELS = {3: 4, 12: 2, 48: 1}
# input sizes must be multiples of the pixel-unshuffle factor
_UNSHUFFLE_BY_SCALE = {4: 1, 2: 2, 1: 4}
_BLOCK_KEY = re.compile(r"^body\.(\d+)\.")


def _check_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"{what} must be an RGB uint8 array of shape H x W x 3, got dtype {image.dtype} and shape "
                        f"{image.shape}; convert the image to 8-bit RGB first.")
    return image


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The "Bicubic" row of SR tables: PIL's bicubic resize of ``lr`` (uint8 H x W x 3) to ``scale`` times its size.

    MATLAB's ``imresize`` (used by some papers' tables) uses a slightly different kernel support and
    antialiasing, so its numbers differ a little from these.
    """
    lr = _check_rgb_uint8(lr, "The LR image")
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise UserError(f"The bicubic scale must be a positive integer, got {scale!r}.")
    height, width = lr.shape[:2]
    upscaled = Image.fromarray(lr).resize((width * int(scale), height * int(scale)), Image.Resampling.BICUBIC)
    return np.asarray(upscaled)


def read_rrdbnet_state(path: Path) -> dict[str, torch.Tensor]:
    """The RRDBNet state dict of a Real-ESRGAN checkpoint: ``params_ema``, else ``params``, else the whole file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Real-ESRGAN checkpoint {path} does not exist; put RealESRGAN_x4plus.pth (or another RRDBNet "
                        "checkpoint) there or point the configuration at it.")

    with loading_model("the Real-ESRGAN checkpoint", path, "Is it a complete .pth download?"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping):
        for name in ("params_ema", "params"):
            if name in checkpoint:
                checkpoint = checkpoint[name]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"Real-ESRGAN checkpoint {path} does not hold a state dict of tensors (directly or under "
                        "'params_ema' or 'params'); it is not an RRDBNet checkpoint.")
    return dict(checkpoint)


def _not_rrdbnet(source: str, state: Mapping[str, torch.Tensor], detail: str) -> UserError:
    first_keys = ", ".join(list(state)[:5]) or "none"
    return UserError(f"{source} is not an RRDBNet (Real-ESRGAN x4plus/x2plus) state dict: {detail}; its first keys are "
                     f"{first_keys}. Use an RRDBNet checkpoint such as RealESRGAN_x4plus.pth.")


@dataclass(frozen=True)
class RRDBNetShape:
    """The constructor arguments of basicsr's ``RRDBNet`` (RGB in and out)."""

    scale: int
    num_feat: int
    num_block: int
    num_grow_ch: int

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "The checkpoint") -> RRDBNetShape:
        """Read width, depth, growth channels and scale from the tensor names and shapes."""
        first, growth = state.get("conv_first.weight"), state.get("body.0.rdb1.conv1.weight")
        if first is None or growth is None or first.ndim != 4 or growth.ndim != 4:
            raise _not_rrdbnet(source, state, "it lacks conv_first.weight or body.0.rdb1.conv1.weight")
        in_channels = int(first.shape[1])
        if in_channels not in _SCALE_BY_INPUT_CHANNELS:
            detail = f"conv_first takes {in_channels} channels, not 3, 12 or 48 (RGB at x4, x2, x1)"
            raise _not_rrdbnet(source, state, detail)
        blocks = {int(match.group(1)) for match in map(_BLOCK_KEY.match, state) if match}
        return cls(scale=_SCALE_BY_INPUT_CHANNELS[in_channels], num_feat=int(first.shape[0]),
                   num_block=max(blocks) + 1, num_grow_ch=int(growth.shape[0]))

    def build(self) -> torch.nn.Module:
        return RRDBNet(num_in_ch=3, num_out_ch=3, scale=self.scale, num_feat=self.num_feat, num_block=self.num_block,
                       num_grow_ch=self.num_grow_ch)


def load_rrdbnet(path: Path) -> torch.nn.Module:
    """basicsr's ``RRDBNet`` with the checkpoint's weights, in eval mode, on the CPU."""
    state = read_rrdbnet_state(path)
    source = f"Real-ESRGAN checkpoint {path}"
    network = RRDBNetShape.from_state_dict(state, source).build()
    expected = network.state_dict()
    unexpected = [key for key in state if key not in expected]
    missing = [key for key in expected if key not in state]
    if unexpected or missing:
        detail = "; ".join(part for part in (
            f"unexpected keys {', '.join(unexpected[:5])}" if unexpected else "",
            f"missing keys {', '.join(missing[:5])}" if missing else "") if part)
        raise _not_rrdbnet(source, state, detail)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = f"tensor shapes do not match ({str(error).splitlines()[-1].strip()})"
        raise _not_rrdbnet(source, state, detail) from error
    return network.eval().requires_grad_(False)


class RealESRGANUpscaler:
    """Real-ESRGAN inference with an RRDBNet: ``upscaler(lr)`` maps uint8 H x W x 3 to uint8 (scale H) x (scale W) x 3.

    ``tile`` > 0 processes ``tile`` x ``tile`` input blocks, each with ``tile_pad`` pixels of context read from
    the image around it (less at the image border), and keeps only each block's own output; with context at
    least as wide as the network's receptive field the result equals the whole-image output.
    """

    def __init__(self, network: torch.nn.Module, device: str = "cpu", tile: int = 0, tile_pad: int = 10):
        scale = int(getattr(network, "scale", 0))
        if scale not in _UNSHUFFLE_BY_SCALE:
            raise UserError(f"The Real-ESRGAN network has scale {scale}; only RRDBNet scales 4, 2 and 1 are supported.")
        if tile < 0 or tile_pad < 0:
            raise UserError(f"Real-ESRGAN tile ({tile}) and tile_pad ({tile_pad}) must be 0 or positive.")
        multiple = _UNSHUFFLE_BY_SCALE[scale]
        if tile % multiple or tile_pad % multiple:
            raise UserError(f"A x{scale} RRDBNet works on sizes divisible by {multiple}: choose tile ({tile}) and "
                            f"tile_pad ({tile_pad}) as multiples of {multiple}.")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.scale = scale
        self.tile = tile
        self.tile_pad = tile_pad

    @classmethod
    def from_file(cls, path: Path, device: str = "cpu", tile: int = 0, tile_pad: int = 10) -> RealESRGANUpscaler:
        """Load a Real-ESRGAN checkpoint (``params_ema``, ``params`` or a bare state dict) from a local file."""
        return cls(load_rrdbnet(path), device=device, tile=tile, tile_pad=tile_pad)

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        lr = _check_rgb_uint8(lr, "The LR image")
        height, width = lr.shape[:2]
        multiple = _UNSHUFFLE_BY_SCALE[self.scale]
        if height < multiple or width < multiple:
            raise UserError(f"The LR image ({width}x{height}) is too small for a x{self.scale} RRDBNet; "
                            f"it needs at least {multiple} pixels per side.")
        pad_bottom, pad_right = -height % multiple, -width % multiple
        with torch.inference_mode():
            pixels = torch.from_numpy(lr).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            if pad_bottom or pad_right:
                pixels = F.pad(pixels, (0, pad_right, 0, pad_bottom), mode="reflect")
            output = self._tiled(pixels) if self.tile else self.network(pixels)
            output = output[:, :, : height * self.scale, : width * self.scale].clamp_(0, 1)
            output = output[0].permute(1, 2, 0).cpu().numpy()
        return (output * 255.0).round().astype(np.uint8)

    def _tiled(self, pixels: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = pixels.shape
        scale, tile, pad = self.scale, self.tile, self.tile_pad
        output = pixels.new_zeros((1, channels, height * scale, width * scale))
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                context_top, context_left = max(top - pad, 0), max(left - pad, 0)
                context = pixels[:, :, context_top: min(bottom + pad, height), context_left: min(right + pad, width)]
                upscaled = self.network(context)
                row, column = (top - context_top) * scale, (left - context_left) * scale
                output[:, :, top * scale: bottom * scale, left * scale: right * scale] = upscaled[
                    :, :, row: row + (bottom - top) * scale, column: column + (right - left) * scale]
        return output
