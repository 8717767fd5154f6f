"""Settings of the Real-ESRGAN second-order degradation.

Defaults are the values of the Real-ESRGAN x4 training options (``options/train_realesrgan_x4plus.yml``)
as the XPSR/SeeSR data scripts use them. Field names follow Real-ESRGAN's option names (``kernel_prob2``,
``resize_range2``, ...) so a researcher can map a Real-ESRGAN YAML onto them one to one.

The model nests inside the degrade stage's config: every field is a plain JSON value
(numbers, strings, lists), ``extra="forbid"`` catches typos, and validation checks that
probability lists sum to one and that every range has low <= high.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KernelType = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
ResizeMode = Literal["area", "bilinear", "bicubic"]
Range = tuple[float, float]

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
KERNEL_PROBS: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
_PROB_TOLERANCE = 1e-6


def _kernel_list() -> list[str]:
    return list(KERNEL_TYPES)


def _kernel_prob() -> list[float]:
    return list(KERNEL_PROBS)


class DegradationSettings(BaseModel):
    """Every probability and range of the two degradation stages (all JSON values)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    scale: int = Field(4, ge=1, description="HR size / LR size.")
    # Real-ESRGAN hard-codes kernel sizes {7, 9, ..., 21} for both blurs and the final sinc;
    # kernels are zero-padded to the largest size so a batch can be stacked.
    kernel_sizes: list[int] = Field(
        default_factory=lambda: list(range(7, 22, 2)),
        description="Odd kernel sizes drawn uniformly for blur 1, blur 2 and the final sinc filter.",
    )

    # ---- first degradation: blur ----
    kernel_list: list[KernelType] = Field(default_factory=_kernel_list)
    kernel_prob: list[float] = Field(default_factory=_kernel_prob)
    sinc_prob: float = Field(0.1, ge=0, le=1, description="Blur 1 is a sinc (ringing) filter with this probability.")
    blur_sigma: Range = (0.2, 3.0)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)

    # ---- first degradation: resize, noise, JPEG ----
    resize_prob: list[float] = Field(default_factory=lambda: [0.2, 0.7, 0.1], description="up, down, keep")
    resize_range: Range = (0.15, 1.5)
    resize_modes: list[ResizeMode] = Field(
        default_factory=lambda: ["area", "bilinear", "bicubic"],
        description="Interpolation modes, drawn uniformly for every resize (both stages and the final one).",
    )
    gaussian_noise_prob: float = Field(
        0.5, ge=0, le=1, description="Gaussian noise with this probability, else Poisson."
    )
    noise_range: Range = Field((1.0, 30.0), description="Gaussian sigma, in 0..255 units.")
    poisson_scale_range: Range = (0.05, 3.0)
    gray_noise_prob: float = Field(0.4, ge=0, le=1)
    jpeg_range: Range = Field((30.0, 95.0), description="JPEG quality, drawn as a real number as DiffJPEG takes it.")

    # ---- second degradation ----
    second_blur_prob: float = Field(0.8, ge=0, le=1)
    kernel_list2: list[KernelType] = Field(default_factory=_kernel_list)
    kernel_prob2: list[float] = Field(default_factory=_kernel_prob)
    sinc_prob2: float = Field(0.1, ge=0, le=1)
    blur_sigma2: Range = (0.2, 1.5)
    betag_range2: Range = (0.5, 4.0)
    betap_range2: Range = (1.0, 2.0)
    resize_prob2: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.3], description="up, down, keep")
    resize_range2: Range = (0.3, 1.2)
    gaussian_noise_prob2: float = Field(0.5, ge=0, le=1)
    noise_range2: Range = (1.0, 25.0)
    poisson_scale_range2: Range = (0.05, 2.5)
    gray_noise_prob2: float = Field(0.4, ge=0, le=1)
    jpeg_range2: Range = (30.0, 95.0)

    # ---- final step: [resize to LR + sinc, JPEG] or [JPEG, resize to LR + sinc] ----
    final_sinc_prob: float = Field(0.8, ge=0, le=1)
    final_resize_first_prob: float = Field(0.5, ge=0, le=1, description="Probability of [resize + sinc] before JPEG.")

    # ---- unsharp masking of the HR image (basicsr USMSharp defaults) ----
    usm_weight: float = Field(0.5, ge=0)
    usm_radius: int = Field(50, ge=1, description="Gaussian kernel size; an even value is rounded up to odd.")
    usm_threshold: float = Field(10.0, ge=0, description="Residual threshold in 0..255 units.")
    # Real-ESRGAN (basicsr RealESRGANModel.feed_data) and SeeSR (make_paired_data.py) both blur the
    # *sharpened* HR: `filter2D(gt_usm, kernel1)`. Kept as a switch for experiments.
    degrade_sharpened: bool = Field(
        True, description="Degrade the USM-sharpened HR (Real-ESRGAN) instead of the plain HR."
    )

    # ------------------------------------------------------------------ validation
    @field_validator("kernel_sizes")
    @classmethod
    def _odd_sizes(cls, sizes: list[int]) -> list[int]:
        if not sizes:
            raise ValueError("kernel_sizes must not be empty")
        for size in sizes:
            if size < 1 or size % 2 == 0:
                raise ValueError(f"kernel sizes must be odd and positive, got {size}")
        return sizes

    @field_validator("resize_modes")
    @classmethod
    def _some_modes(cls, modes: list[str]) -> list[str]:
        if not modes:
            raise ValueError("resize_modes must not be empty")
        return modes

    @model_validator(mode="after")
    def _check(self) -> "DegradationSettings":
        for list_name, prob_name in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            kinds, probs = getattr(self, list_name), getattr(self, prob_name)
            if len(kinds) != len(probs) or not kinds:
                raise ValueError(f"{list_name} and {prob_name} must be non-empty and of equal length")
        for name in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
            probs = getattr(self, name)
            if name.startswith("resize") and len(probs) != 3:
                raise ValueError(f"{name} must hold three probabilities (up, down, keep)")
            if any(p < 0 or p > 1 for p in probs):
                raise ValueError(f"{name} must hold probabilities in [0, 1], got {probs}")
            if abs(sum(probs) - 1.0) > _PROB_TOLERANCE:
                raise ValueError(f"{name} must sum to 1, got {probs} (sum {sum(probs)})")
        for name, field in type(self).model_fields.items():
            if field.annotation == Range:
                low, high = getattr(self, name)
                if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                    raise ValueError(f"{name} must be a finite range with low <= high, got {[low, high]}")
        for name in ("blur_sigma", "blur_sigma2"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("noise_range", "noise_range2", "poisson_scale_range", "poisson_scale_range2"):
            if getattr(self, name)[0] < 0:
                raise ValueError(f"{name} must not be negative")
        # Shape parameters are drawn as U(low, 1) or U(1, high), as basicsr does.
        for name in ("betag_range", "betap_range", "betag_range2", "betap_range2"):
            low, high = getattr(self, name)
            if not (0 < low <= 1 <= high):
                raise ValueError(f"{name} must satisfy 0 < low <= 1 <= high, got {[low, high]}")
        # Up-scales are drawn from U(1, high), down-scales from U(low, 1).
        for name in ("resize_range", "resize_range2"):
            low, high = getattr(self, name)
            if not (0 < low <= 1 <= high):
                raise ValueError(f"{name} must satisfy 0 < low <= 1 <= high, got {[low, high]}")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if not (1 <= low and high <= 100):
                raise ValueError(f"{name} must lie within [1, 100], got {[low, high]}")
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def kernel_pad_to(self) -> int:
        """Size every kernel is zero-padded to (Real-ESRGAN: 21)."""
        return max(self.kernel_sizes)

    @property
    def usm_kernel_size(self) -> int:
        return self.usm_radius + 1 if self.usm_radius % 2 == 0 else self.usm_radius

    def min_hr_size(self) -> int:
        """Smallest square HR size for which every draw of these settings can be applied.

        Reflect padding needs pad < size: the USM blur pads by usm_kernel_size // 2 at HR size,
        blur 2 pads by kernel_pad_to // 2 at the smallest stage-1 size, the final sinc pads by
        the same at LR size.
        """
        pad = self.kernel_pad_to // 2
        size = max(self.usm_kernel_size // 2 + 1, pad + 1, (pad + 1) * self.scale, self.scale)
        while math.floor(size * self.resize_range[0]) <= pad or int(size / self.scale * self.resize_range2[0]) < 1:
            size += 1
        return size
