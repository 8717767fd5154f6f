"""Degradation-Free Constraint (XPSR §3.5, eq. 3).

A single 3x3 convolution per level maps

* the three downsampled levels of the ControlNet's pyramid conditioning encoder to RGB images,
  compared (L1) with the HR image (in [-1, 1]) area-downsampled to each level's size, and
* three levels of the ControlNet encoder to 4-channel latents, compared (L1) with the HR latent
  (already multiplied by the VAE scaling factor) area-downsampled to each level's size.

``L_DFC`` is the sum of the (up to) six mean-L1 terms; the training objective is
``L = L_eps + lambda * L_DFC`` with lambda = 0.05 in the paper. The heads exist only for
training: inference never builds or loads them.

The authors' released code differs (``latent_source="residuals"``, ``target_resize="bilinear"``):
its 13 latent heads read every ControlNet residual after its zero conv (12 down, then the mid
one), and every target is resized with ``F.interpolate(mode="bilinear")`` (16 terms in all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .controlnet import match_device_dtype

DFC_WEIGHT = 0.05
LATENT_SOURCES = ("pyramid", "residuals")
TARGET_RESIZES = ("area", "bilinear")


def resize_to(target: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """Resize ``target`` to ``size``: area averaging (an exact box filter for integer factors) or
    bilinear interpolation without antialiasing (``align_corners=False``, the authors' choice)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    if mode == "bilinear":
        return F.interpolate(target, size=tuple(size), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(target, tuple(size))


@dataclass
class DFCLoss:
    total: torch.Tensor
    terms: dict = field(default_factory=dict)  # name -> scalar tensor
    predictions: dict = field(default_factory=dict)  # name -> predicted image/latent


class DFCHeads(ModelMixin, ConfigMixin):
    """3x3 conv heads: pixel levels -> RGB, latent levels -> latent channels."""

    @register_to_config
    def __init__(
        self,
        pixel_channels: Sequence[int] = (32, 96, 256),
        latent_feature_channels: Sequence[int] = (320, 640, 1280),
        image_channels: int = 3,
        latent_channels: int = 4,
        use_pixel: bool = True,
        use_latent: bool = True,
        latent_source: str = "pyramid",
        target_resize: str = "area",
    ):
        super().__init__()
        if latent_source not in LATENT_SOURCES:
            raise ValueError(f"latent_source must be one of {LATENT_SOURCES}, got {latent_source!r}")
        if target_resize not in TARGET_RESIZES:
            raise ValueError(f"target_resize must be one of {TARGET_RESIZES}, got {target_resize!r}")
        self.pixel_heads = nn.ModuleList(
            nn.Conv2d(c, image_channels, kernel_size=3, padding=1) for c in (pixel_channels if use_pixel else ())
        )
        self.latent_heads = nn.ModuleList(
            nn.Conv2d(c, latent_channels, kernel_size=3, padding=1)
            for c in (latent_feature_channels if use_latent else ())
        )

    @classmethod
    def from_controlnet(cls, controlnet, latent_channels: int = 4, use_pixel: bool = True, use_latent: bool = True,
                        latent_source: str = "pyramid", target_resize: str = "area") -> "DFCHeads":
        pixel, latent = controlnet.feature_channels(latent_source)
        heads = cls(
            pixel_channels=pixel,
            latent_feature_channels=latent,
            image_channels=controlnet.config.conditioning_channels,
            latent_channels=latent_channels,
            use_pixel=use_pixel,
            use_latent=use_latent,
            latent_source=latent_source,
            target_resize=target_resize,
        )
        return match_device_dtype(heads, controlnet)

    def latent_inputs(self, controlnet_output) -> Sequence[torch.Tensor]:
        """The ControlNet features this head set reads (an output made with ``return_features=True``)."""
        if self.config.latent_source == "residuals":
            return controlnet_output.residual_features
        return controlnet_output.latent_features

    def forward(
        self, pixel_features: Sequence[torch.Tensor], latent_features: Sequence[torch.Tensor]
    ) -> tuple[list, list]:
        pixels = [head(f) for head, f in zip(self.pixel_heads, pixel_features)]
        latents = [head(f) for head, f in zip(self.latent_heads, latent_features)]
        return pixels, latents

    def loss(
        self,
        pixel_features: Sequence[torch.Tensor],
        latent_features: Sequence[torch.Tensor],
        hr_image: Optional[torch.Tensor],
        hr_latent: Optional[torch.Tensor],
    ) -> DFCLoss:
        """Sum of mean-L1 terms (computed in float32) between head outputs and resized HR targets."""
        if self.pixel_heads and hr_image is None:
            raise ValueError("the pixel-space DFC needs the HR image (in [-1, 1])")
        if self.latent_heads and hr_latent is None:
            raise ValueError("the latent-space DFC needs the HR latent (scaled by the VAE scaling factor)")
        pixels, latents = self(pixel_features, latent_features)
        terms, predictions = {}, {}
        mode = self.config.target_resize
        for i, pred in enumerate(pixels):
            target = resize_to(hr_image.to(pred.dtype), pred.shape[-2:], mode)
            terms[f"pixel_{i}"] = F.l1_loss(pred.float(), target.float())
            predictions[f"pixel_{i}"] = pred
        for i, pred in enumerate(latents):
            target = resize_to(hr_latent.to(pred.dtype), pred.shape[-2:], mode)
            terms[f"latent_{i}"] = F.l1_loss(pred.float(), target.float())
            predictions[f"latent_{i}"] = pred
        total = torch.stack(list(terms.values())).sum() if terms else torch.zeros((), device=self.device)
        return DFCLoss(total=total, terms=terms, predictions=predictions)
