"""Colour correction of the SR output to the LR input (diffusion drifts colours; the LR keeps them).

* ``adain``: per-channel mean and standard deviation of the output set to those of the reference.
* ``wavelet``: the output's high frequencies plus the reference's low frequencies, split by a
  stack of dilated 3x3 binomial blurs (a stationary "a trous" wavelet decomposition).
* ``adain-official``: the authors' variant (their test script), on 8-bit images: the quantised
  output and the quantised condition are read as ``uint8 / 255``, per-channel statistics use the
  *unbiased* variance plus 1e-5, the result is clamped to [0, 1] and truncated (not rounded) back
  to 8 bits, as ``ToPILImage`` does. See :func:`adain_color_fix_uint8`.
* ``none``: unchanged.

Images are float tensors [B, 3, H, W] in [0, 1]; the reference (the bicubic-upsampled LR) is
resized to the output's size when it differs. Results are not clamped: the caller quantises.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .settings import COLOR_FIXES

UINT8_COLOR_FIXES = ("adain-official",)  # applied to the 8-bit output, after quantisation


def _match_size(reference: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if reference.shape[-2:] != like.shape[-2:]:
        reference = F.interpolate(reference, size=like.shape[-2:], mode="bicubic", align_corners=False)
    return reference.to(like.dtype)


def channel_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=False) + eps).sqrt()[..., None, None]


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    mean, std = channel_stats(image)
    ref_mean, ref_std = channel_stats(reference)
    return (image - mean) / std * ref_std + ref_mean


def adain_color_fix_uint8(image: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The authors' AdaIN on H x W x 3 uint8 images of the same size; returns uint8.

    Arithmetic (float32 throughout): ``x = u8 / 255``; per channel ``mean`` and
    ``std = sqrt(var_unbiased + eps)`` of both; ``(x - mean) / std * ref_std + ref_mean``;
    clamp to [0, 1]; ``uint8(value * 255)`` with truncation toward zero.
    """
    if image.shape != reference.shape:
        raise ValueError(f"adain-official needs images of one size, got {image.shape} and {reference.shape}")

    def as_float(u8: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1).to(torch.float32).div(255)[None]

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        std = (flat.var(dim=2, unbiased=True) + eps).sqrt()
        return flat.mean(dim=2)[..., None, None], std[..., None, None]

    x, ref = as_float(image), as_float(reference)
    mean, std = stats(x)
    ref_mean, ref_std = stats(ref)
    fixed = ((x - mean) / std * ref_std + ref_mean).clamp(0.0, 1.0)
    scaled = fixed[0].permute(1, 2, 0).numpy() * np.float32(255)
    return scaled.astype(np.uint8)  # truncation, as torchvision's ToPILImage


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, 3, 3).contiguous()
    pad = dilation
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, weight, groups=channels, dilation=dilation)


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with ``high + low == x``; ``low`` is ``x`` blurred at ``levels`` dyadic scales."""
    low = x
    for level in range(levels):
        low = _blur(low, 2**level)
    return x - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    high, _ = wavelet_split(image, levels)
    _, ref_low = wavelet_split(_match_size(reference, image), levels)
    return high + ref_low


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "none":
        return image
    if method == "adain-official":
        raise ValueError("adain-official works on 8-bit images: use adain_color_fix_uint8")
    raise ValueError(f"unknown colour correction {method!r}; choose from {COLOR_FIXES}")
