"""Draw one sample's Real-ESRGAN degradation parameters from its own generator.

``sample_degradation`` makes every random choice of the second-order pipeline up front and
returns them as a ``DegradationParams``; ``pipeline.degrade_batch`` then applies them without
drawing anything else, so a sample's LR image is a pure function of (HR, params).

basicsr's ``random_mixed_kernels`` and friends draw from numpy's and Python's *global* RNGs,
which would tie a sample's kernel to whatever ran before it. So the kernel parameters are drawn
here from the given ``numpy.random.Generator`` (with the same distributions as basicsr's
``random_bivariate_*`` functions) and handed to basicsr's deterministic kernel builders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compat import (
    bivariate_Gaussian,
    bivariate_generalized_Gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
)
from .settings import DegradationSettings

# Sinc cutoffs as in Real-ESRGAN's dataset (tuned there for kernel sizes 7..21).
SINC_CUTOFF_SMALL = (math.pi / 3, math.pi)  # kernel size < 13
SINC_CUTOFF_LARGE = (math.pi / 5, math.pi)  # kernel size >= 13
FINAL_SINC_CUTOFF = (math.pi / 3, math.pi)
ROTATION_RANGE = (-math.pi, math.pi)
# Noise seeds stay below 2**53 so that they survive a round trip through any JSON reader.
_SEED_LIMIT = 2**53
RESIZE_DIRECTIONS = ("up", "down", "keep")


@dataclass(frozen=True)
class KernelParams:
    """The scalar description of one blur or sinc kernel."""

    type: str  # one of the kernel types, "sinc", or "pulse" (identity, final sinc not applied)
    size: int
    sigma_x: float | None = None
    sigma_y: float | None = None
    rotation: float | None = None
    beta: float | None = None
    cutoff: float | None = None

    def record(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_type": self.type,
            f"{prefix}_size": self.size,
            f"{prefix}_sigma_x": self.sigma_x,
            f"{prefix}_sigma_y": self.sigma_y,
            f"{prefix}_rotation": self.rotation,
            f"{prefix}_beta": self.beta,
            f"{prefix}_cutoff": self.cutoff,
        }


@dataclass(frozen=True)
class StageParams:
    """Resize and noise choices of one degradation stage."""

    resize_direction: str  # up | down | keep
    resize_scale: float
    resize_mode: str  # area | bilinear | bicubic
    resize_size: int  # square side length after the resize
    noise_type: str  # gaussian | poisson
    noise_sigma: float | None  # Gaussian sigma in 0..255 units
    noise_poisson_scale: float | None
    noise_gray: bool
    noise_seed: int  # seeds the torch.Generator the noise is drawn from

    def record(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_resize_direction": self.resize_direction,
            f"{prefix}_resize_scale": self.resize_scale,
            f"{prefix}_resize_mode": self.resize_mode,
            f"{prefix}_resize_size": self.resize_size,
            f"{prefix}_noise_type": self.noise_type,
            f"{prefix}_noise_sigma": self.noise_sigma,
            f"{prefix}_noise_poisson_scale": self.noise_poisson_scale,
            f"{prefix}_noise_gray": self.noise_gray,
            f"{prefix}_noise_seed": self.noise_seed,
        }


@dataclass(frozen=True, eq=False)
class DegradationParams:
    """Everything ``degrade_batch`` applies to one HR image (kernels padded to ``kernel_pad_to``)."""

    hr_size: int
    scale: int
    kernel1: np.ndarray = field(repr=False)
    kernel1_params: KernelParams
    stage1: StageParams
    jpeg1_quality: float
    blur2_applied: bool
    kernel2: np.ndarray = field(repr=False)
    kernel2_params: KernelParams
    stage2: StageParams
    final_order: str  # "resize_first": [resize + sinc, JPEG]; "jpeg_first": [JPEG, resize + sinc]
    final_resize_mode: str
    jpeg2_quality: float
    sinc_applied: bool
    sinc_kernel: np.ndarray = field(repr=False)
    sinc_params: KernelParams

    @property
    def lr_size(self) -> int:
        return self.hr_size // self.scale

    def to_record(self) -> dict[str, Any]:
        """Every sampled scalar as a flat JSON-able dict (the same keys for every sample)."""
        record: dict[str, Any] = {"hr_size": self.hr_size, "scale": self.scale, "lr_size": self.lr_size}
        record.update(self.kernel1_params.record("blur1"))
        record.update(self.stage1.record("stage1"))
        record["stage1_jpeg_quality"] = self.jpeg1_quality
        record["blur2_applied"] = self.blur2_applied
        record.update(self.kernel2_params.record("blur2"))
        record.update(self.stage2.record("stage2"))
        record["final_order"] = self.final_order
        record["final_resize_mode"] = self.final_resize_mode
        record["final_jpeg_quality"] = self.jpeg2_quality
        record["final_sinc_applied"] = self.sinc_applied
        record.update(self.sinc_params.record("final_sinc"))
        return record


# ---------------------------------------------------------------------------- kernels
def _pad_kernel(kernel: np.ndarray, pad_to: int) -> np.ndarray:
    pad = (pad_to - kernel.shape[0]) // 2
    if pad > 0:
        kernel = np.pad(kernel, ((pad, pad), (pad, pad)))
    return np.ascontiguousarray(kernel, dtype=np.float32)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _shape_beta(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    # basicsr: beta ~ U(low, 1) or U(1, high), each with probability 1/2.
    if rng.uniform() < 0.5:
        return float(rng.uniform(bounds[0], 1.0))
    return float(rng.uniform(1.0, bounds[1]))


def _sample_blur_kernel(
    rng: np.random.Generator,
    settings: DegradationSettings,
    kinds: list[str],
    probs: list[float],
    sinc_prob: float,
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> tuple[np.ndarray, KernelParams]:
    """One first/second-stage kernel, as RealESRGANDataset draws it (sinc or mixed kernels)."""
    size = int(rng.choice(settings.kernel_sizes))
    if rng.uniform() < sinc_prob:
        cutoff = _uniform(rng, SINC_CUTOFF_SMALL if size < 13 else SINC_CUTOFF_LARGE)
        kernel = circular_lowpass_kernel(cutoff, size, pad_to=0)
        return _pad_kernel(kernel, settings.kernel_pad_to), KernelParams("sinc", size, cutoff=cutoff)

    probabilities = np.asarray(probs, dtype=np.float64)
    kind = str(kinds[int(rng.choice(len(kinds), p=probabilities / probabilities.sum()))])
    isotropic = kind.endswith("iso") and not kind.endswith("aniso")
    sigma_x = _uniform(rng, sigma_range)
    if isotropic:
        sigma_y, rotation = sigma_x, 0.0
    else:
        sigma_y = _uniform(rng, sigma_range)
        rotation = _uniform(rng, ROTATION_RANGE)
    beta: float | None = None
    if kind in ("iso", "aniso"):
        kernel = bivariate_Gaussian(size, sigma_x, sigma_y, rotation, isotropic=isotropic)
    elif kind.startswith("generalized"):
        beta = _shape_beta(rng, betag_range)
        kernel = bivariate_generalized_Gaussian(size, sigma_x, sigma_y, rotation, beta, isotropic=isotropic)
    else:
        beta = _shape_beta(rng, betap_range)
        kernel = bivariate_plateau(size, sigma_x, sigma_y, rotation, beta, isotropic=isotropic)
    kernel = kernel / np.sum(kernel)
    params = KernelParams(kind, size, sigma_x=sigma_x, sigma_y=sigma_y, rotation=rotation, beta=beta)
    return _pad_kernel(kernel, settings.kernel_pad_to), params


def _sample_final_sinc(
    rng: np.random.Generator, settings: DegradationSettings
) -> tuple[bool, np.ndarray, KernelParams]:
    pad_to = settings.kernel_pad_to
    if rng.uniform() < settings.final_sinc_prob:
        size = int(rng.choice(settings.kernel_sizes))
        cutoff = _uniform(rng, FINAL_SINC_CUTOFF)
        kernel = circular_lowpass_kernel(cutoff, size, pad_to=0)
        return True, _pad_kernel(kernel, pad_to), KernelParams("sinc", size, cutoff=cutoff)
    # A centred unit impulse: filtering with it leaves the image unchanged (Real-ESRGAN's pulse_tensor).
    pulse = np.zeros((pad_to, pad_to), dtype=np.float32)
    pulse[pad_to // 2, pad_to // 2] = 1.0
    return False, pulse, KernelParams("pulse", 1)


# ---------------------------------------------------------------------------- stages
def _sample_stage(
    rng: np.random.Generator,
    settings: DegradationSettings,
    *,
    resize_prob: list[float],
    resize_range: tuple[float, float],
    base_size: float,
    gaussian_prob: float,
    noise_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
    input_size: int,
    relative: bool,
) -> StageParams:
    probabilities = np.asarray(resize_prob, dtype=np.float64)
    direction = RESIZE_DIRECTIONS[int(rng.choice(3, p=probabilities / probabilities.sum()))]
    if direction == "up":
        scale = float(rng.uniform(1.0, resize_range[1]))
    elif direction == "down":
        scale = float(rng.uniform(resize_range[0], 1.0))
    else:
        scale = 1.0
    mode = str(settings.resize_modes[int(rng.integers(len(settings.resize_modes)))])
    if relative:
        # Stage 1: F.interpolate(scale_factor=scale) gives floor(size * scale).
        size = math.floor(input_size * scale)
    else:
        # Stage 2: Real-ESRGAN resizes to int(ori_h / sf * scale), relative to the original size.
        size = int(base_size / settings.scale * scale)
    if rng.uniform() < gaussian_prob:
        noise_type, sigma, poisson = "gaussian", _uniform(rng, noise_range), None
    else:
        noise_type, sigma, poisson = "poisson", None, _uniform(rng, poisson_range)
    gray = bool(rng.uniform() < gray_prob)
    seed = int(rng.integers(0, _SEED_LIMIT))
    return StageParams(direction, scale, mode, size, noise_type, sigma, poisson, gray, seed)


def _sample_first_blur_kernel(
    rng: np.random.Generator, settings: DegradationSettings
) -> tuple[np.ndarray, KernelParams]:
    """The first blur's kernel (the unsuffixed kernel settings)."""
    return _sample_blur_kernel(
        rng,
        settings,
        settings.kernel_list,
        settings.kernel_prob,
        settings.sinc_prob,
        settings.blur_sigma,
        settings.betag_range,
        settings.betap_range,
    )


def _sample_second_blur_kernel(
    rng: np.random.Generator, settings: DegradationSettings
) -> tuple[np.ndarray, KernelParams]:
    """The second blur's kernel (the kernel settings suffixed 2), drawn even when not applied."""
    return _sample_blur_kernel(
        rng,
        settings,
        settings.kernel_list2,
        settings.kernel_prob2,
        settings.sinc_prob2,
        settings.blur_sigma2,
        settings.betag_range2,
        settings.betap_range2,
    )


def _sample_first_stage(rng: np.random.Generator, settings: DegradationSettings, hr_size: int) -> StageParams:
    """Stage 1: resized relative to the HR size, then noised."""
    return _sample_stage(
        rng,
        settings,
        resize_prob=settings.resize_prob,
        resize_range=settings.resize_range,
        base_size=hr_size,
        gaussian_prob=settings.gaussian_noise_prob,
        noise_range=settings.noise_range,
        poisson_range=settings.poisson_scale_range,
        gray_prob=settings.gray_noise_prob,
        input_size=hr_size,
        relative=True,
    )


def _sample_second_stage(
    rng: np.random.Generator, settings: DegradationSettings, hr_size: int, input_size: int
) -> StageParams:
    """Stage 2: resized relative to the original size (Real-ESRGAN), then noised."""
    return _sample_stage(
        rng,
        settings,
        resize_prob=settings.resize_prob2,
        resize_range=settings.resize_range2,
        base_size=hr_size,
        gaussian_prob=settings.gaussian_noise_prob2,
        noise_range=settings.noise_range2,
        poisson_range=settings.poisson_scale_range2,
        gray_prob=settings.gray_noise_prob2,
        input_size=input_size,
        relative=False,
    )


def sample_degradation(rng: np.random.Generator, settings: DegradationSettings, hr_size: int) -> DegradationParams:
    """Draw every random choice of the degradation of one square ``hr_size`` HR image.

    All draws come from ``rng`` (never global state) in a fixed order, so the same generator
    state always gives the same parameters.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    hr_size = int(hr_size)
    minimum = settings.min_hr_size()
    if hr_size < minimum:
        raise ValueError(f"HR size {hr_size} is too small for these degradation settings (need >= {minimum}).")

    # Every draw comes from rng in this order; changing it changes what a seed means.
    kernel1, kernel1_params = _sample_first_blur_kernel(rng, settings)
    kernel2, kernel2_params = _sample_second_blur_kernel(rng, settings)
    sinc_applied, sinc_kernel, sinc_params = _sample_final_sinc(rng, settings)
    stage1 = _sample_first_stage(rng, settings, hr_size)
    jpeg1 = _uniform(rng, settings.jpeg_range)
    blur2_applied = bool(rng.uniform() < settings.second_blur_prob)
    stage2 = _sample_second_stage(rng, settings, hr_size, stage1.resize_size)
    final_order = "resize_first" if rng.uniform() < settings.final_resize_first_prob else "jpeg_first"
    final_mode = str(settings.resize_modes[int(rng.integers(len(settings.resize_modes)))])
    jpeg2 = _uniform(rng, settings.jpeg_range2)

    return DegradationParams(
        hr_size=hr_size,
        scale=settings.scale,
        kernel1=kernel1,
        kernel1_params=kernel1_params,
        stage1=stage1,
        jpeg1_quality=jpeg1,
        blur2_applied=blur2_applied,
        kernel2=kernel2,
        kernel2_params=kernel2_params,
        stage2=stage2,
        final_order=final_order,
        final_resize_mode=final_mode,
        jpeg2_quality=jpeg2,
        sinc_applied=sinc_applied,
        sinc_kernel=sinc_kernel,
        sinc_params=sinc_params,
    )
