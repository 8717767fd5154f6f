"""Apply sampled Real-ESRGAN second-order degradations to a batch of HR images.

Order (basicsr ``RealESRGANModel.feed_data``, also SeeSR's ``make_paired_data.py``):

    USM-sharpen HR -> blur 1 -> resize 1 -> noise 1 -> JPEG 1
    -> (maybe) blur 2 -> resize 2 (relative to the original size) -> noise 2
    -> [resize to LR + final sinc, JPEG 2] or [JPEG 2, resize to LR + final sinc]
    -> clamp and round to 8-bit levels

Where a speed-up comes from, and why outputs are reproducible:

* USM sharpening uses the separable form of basicsr's 51x51 Gaussian (two 1-D passes instead
  of one 2601-tap 2-D pass); the result equals ``USMSharp`` to float rounding.
* Steps whose sizes agree across the batch (USM, blur 1, final sinc, JPEG at LR size) run
  batched; in between every sample has its own size, so those steps loop per sample.
* All blurs are depthwise (grouped) convolutions, also for a single image (``filter2d``):
  basicsr's ``filter2D`` falls back to a much slower plain convolution for one kernel.
* Noise comes from per-sample ``torch.Generator``s seeded from the params, never global state.
* Bilinear resizing is done here with gathers and element-wise arithmetic: on CPU,
  ``F.interpolate(mode="bilinear")`` gives different float rounding with one thread than
  with several, which would make outputs depend on ``torch.set_num_threads``. Area and
  bicubic interpolation, convolutions and DiffJPEG were checked to be thread-count and
  batch independent (tests/test_degrade_lib.py keeps checking it).
"""

from __future__ import annotations

import copy
import threading
from functools import lru_cache

import cv2  # basicsr's USMSharp builds its kernel with cv2 as well (sigma 0: derived from size)
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import rgb_to_grayscale

from .compat import DiffJPEG
from .sampling import DegradationParams, StageParams
from .settings import DegradationSettings

__all__ = ["degrade_batch", "filter2d", "gaussian_kernel_1d", "resize", "usm_sharpen"]

_jpeg_lock = threading.Lock()
_jpegers: dict[str, torch.nn.Module] = {}


def _jpeger(device: torch.device) -> torch.nn.Module:
    """One DiffJPEG per device.

    basicsr's quantisation tables are module-level Parameters shared by every DiffJPEG
    instance, so ``.to(device)`` on one instance would move them for all; a deep copy
    gives each device its own tables.
    """
    key = str(device)
    with _jpeg_lock:
        if key not in _jpegers:
            module = copy.deepcopy(DiffJPEG(differentiable=False)).to(device)
            module.requires_grad_(False)
            _jpegers[key] = module.eval()
        return _jpegers[key]


def _jpeg(images: torch.Tensor, qualities: list[float]) -> torch.Tensor:
    # DiffJPEG overwrites the quality tensor in place with its factor: always pass a fresh one.
    quality = torch.tensor(qualities, dtype=torch.float32, device=images.device)
    out = _jpeger(images.device)(images.clamp(0, 1), quality=quality)
    return out.contiguous()  # DiffJPEG returns a channels-last view; the convolutions need contiguous


# ---------------------------------------------------------------------------- filtering
def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """basicsr ``filter2D`` semantics (reflect padding, kernel b applied to image b), always as a
    depthwise convolution.

    basicsr's filter2D switches to a plain one-channel convolution when given a single kernel,
    which on CPU is a slower code path than the grouped one; using the grouped form for any
    batch size keeps one code path, so a sample gives the same bits alone or in a batch.
    """
    b, c, h, w = images.shape
    k = kernels.shape[-1]
    if k % 2 == 0 or kernels.shape[0] != b:
        raise ValueError(f"need {b} odd-sized kernels, got {tuple(kernels.shape)}")
    pad = k // 2
    padded = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    weight = kernels.to(images.dtype).reshape(b, 1, 1, k, k).expand(b, c, 1, k, k).reshape(b * c, 1, k, k)
    return F.conv2d(padded, weight, groups=b * c).view(b, c, h, w)


# ---------------------------------------------------------------------------- USM
@lru_cache(maxsize=8)
def _gaussian_kernel_1d_np(size: int) -> np.ndarray:
    return cv2.getGaussianKernel(size, 0).reshape(-1)


def gaussian_kernel_1d(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 1-D Gaussian whose outer product is basicsr ``USMSharp``'s 2-D kernel."""
    return torch.from_numpy(_gaussian_kernel_1d_np(size).astype(np.float32)).to(device)


def _separable_blur(images: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Reflect-padded Gaussian blur as a horizontal then a vertical 1-D convolution.

    Reflect padding is separable, so this equals filter2D with the outer-product kernel.
    Every channel of every image is its own group (a depthwise convolution): on CPU that is
    the fast path, and a channel's result cannot depend on the other images of the batch.
    """
    b, c, h, w = images.shape
    n, size = b * c, kernel_1d.numel()
    pad = size // 2
    flat = images.reshape(1, n, h, w)
    horizontal = kernel_1d.view(1, 1, 1, size).expand(n, 1, 1, size)
    vertical = kernel_1d.view(1, 1, size, 1).expand(n, 1, size, 1)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), horizontal, groups=n)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), vertical, groups=n)
    return flat.view(b, c, h, w)


def usm_sharpen(images: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking exactly as basicsr ``USMSharp.forward`` (same kernel, mask and blend)."""
    size = radius + 1 if radius % 2 == 0 else radius
    kernel = gaussian_kernel_1d(size, images.device).to(images.dtype)
    blur = _separable_blur(images, kernel)
    residual = images - blur
    mask = (torch.abs(residual) * 255 > threshold).to(images.dtype)
    soft_mask = _separable_blur(mask, kernel)
    sharp = torch.clip(images + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images


# ---------------------------------------------------------------------------- resize
def _linear_taps(in_size: int, out_size: int, scale_factor: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear (align_corners=False), in float32 like ATen."""
    if scale_factor is not None and scale_factor > 0:
        ratio = np.float32(1.0 / scale_factor)  # ATen maps coordinates with 1/scale_factor when given
    else:
        ratio = np.float32(in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = ratio * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


def _bilinear(images: torch.Tensor, out_h: int, out_w: int, scale_factor: float | None) -> torch.Tensor:
    """Bilinear resize from gathers and element-wise ops only, so rounding never depends on threads."""
    device, dtype = images.device, images.dtype
    h, w = images.shape[-2:]
    out = images
    for dim, (in_size, out_size) in ((-2, (h, out_h)), (-1, (w, out_w))):
        i0, i1, lam = _linear_taps(in_size, out_size, scale_factor)
        idx0 = torch.from_numpy(i0).to(device)
        idx1 = torch.from_numpy(i1).to(device)
        shape = [1, 1, 1, 1]
        shape[dim] = out_size
        l1 = torch.from_numpy(lam).to(device=device, dtype=dtype).view(shape)
        l0 = 1 - l1
        out = out.index_select(dim, idx0) * l0 + out.index_select(dim, idx1) * l1
    return out.contiguous()


def resize(images: torch.Tensor, size: tuple[int, int], mode: str, scale_factor: float | None = None) -> torch.Tensor:
    """Resize like ``F.interpolate`` (``scale_factor`` only steers the bilinear coordinate map).

    area and bicubic go through F.interpolate; bilinear is computed here (see module docstring).
    """
    out_h, out_w = size
    if mode == "bilinear":
        return _bilinear(images, out_h, out_w, scale_factor)
    if mode == "area":
        return F.interpolate(images, size=(out_h, out_w), mode="area")
    if mode == "bicubic":
        if scale_factor is not None:
            return F.interpolate(images, scale_factor=scale_factor, mode="bicubic")
        return F.interpolate(images, size=(out_h, out_w), mode="bicubic")
    raise ValueError(f"unknown resize mode {mode!r}")


# ---------------------------------------------------------------------------- noise
def _noise_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def _add_noise(image: torch.Tensor, stage: StageParams) -> torch.Tensor:
    """Gaussian or Poisson noise on one image [1, 3, h, w], following basicsr's *_pt formulas."""
    generator = _noise_generator(stage.noise_seed, image.device)
    _, c, h, w = image.shape
    if stage.noise_type == "gaussian":
        sigma = torch.tensor(stage.noise_sigma, dtype=image.dtype, device=image.device)
        channels = 1 if stage.noise_gray else c  # gray noise: one field shared by all channels
        noise = torch.randn((1, channels, h, w), generator=generator, dtype=image.dtype, device=image.device)
        noise = (noise * sigma / 255.0).expand(1, c, h, w)
    elif stage.noise_type == "poisson":
        source = rgb_to_grayscale(image, num_output_channels=1) if stage.noise_gray else image
        # Round to 8-bit levels to count the distinct values, as basicsr does.
        source = torch.clamp((source * 255.0).round(), 0, 255) / 255.0
        levels = 2 ** np.ceil(np.log2(len(torch.unique(source))))
        vals = torch.tensor(levels, dtype=image.dtype, device=image.device)
        noise = torch.poisson(source * vals, generator=generator) / vals - source
        scale = torch.tensor(stage.noise_poisson_scale, dtype=image.dtype, device=image.device)
        noise = (noise * scale).expand(1, c, h, w)
    else:
        raise ValueError(f"unknown noise type {stage.noise_type!r}")
    return torch.clamp(image + noise, 0, 1)


# ---------------------------------------------------------------------------- pipeline
def _kernels(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32)).to(device)


def _check_inputs(hr: torch.Tensor, params: list[DegradationParams], settings: DegradationSettings) -> None:
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr must be [B, 3, H, W], got {tuple(hr.shape)}")
    if not hr.is_floating_point():
        raise TypeError(f"hr must be a float tensor in [0, 1], got {hr.dtype}")
    b, _, h, w = hr.shape
    if len(params) != b:
        raise ValueError(f"got {len(params)} parameter sets for a batch of {b}")
    if h != w:
        raise ValueError(f"HR images must be square, got {h}x{w}")
    for p in params:
        if p.hr_size != h or p.scale != settings.scale:
            raise ValueError(
                f"params were sampled for HR {p.hr_size} px at x{p.scale}, batch is {h} px at x{settings.scale}"
            )


def _stages_to_lr(image: torch.Tensor, p: DegradationParams, lr_size: tuple[int, int]) -> torch.Tensor:
    """One blurred sample [1, 3, H, W] through stage 1 (resize, noise, JPEG) and stage 2 (maybe blur, resize,
    noise), then, as ``p.final_order`` says, JPEG 2 and the resize to ``lr_size``, or only that resize."""
    s1 = p.stage1
    out = resize(image, (s1.resize_size, s1.resize_size), s1.resize_mode, scale_factor=s1.resize_scale)
    out = _add_noise(out, s1)
    out = _jpeg(out, [p.jpeg1_quality])

    if p.blur2_applied:
        out = filter2d(out, _kernels([p.kernel2], image.device))
    s2 = p.stage2
    out = resize(out, (s2.resize_size, s2.resize_size), s2.resize_mode)
    out = _add_noise(out, s2)

    if p.final_order == "jpeg_first":
        out = _jpeg(out, [p.jpeg2_quality])
    return resize(out, lr_size, p.final_resize_mode)


def _late_jpeg(batch: torch.Tensor, params: list[DegradationParams]) -> torch.Tensor:
    """JPEG 2 for the samples of an LR-sized batch whose order is [resize + sinc, JPEG]."""
    late = [i for i, p in enumerate(params) if p.final_order == "resize_first"]
    if not late:
        return batch
    index = torch.tensor(late, device=batch.device)
    compressed = _jpeg(batch.index_select(0, index), [params[i].jpeg2_quality for i in late])
    return batch.index_copy(0, index, compressed)


@torch.no_grad()
def degrade_batch(
    hr: torch.Tensor,
    params: list[DegradationParams],
    settings: DegradationSettings,
    usm_hr: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade HR [B, 3, H, W] (float in [0, 1], any device) with one params set per image.

    Returns ``(hr_target, lr)``: hr_target [B, 3, H, W] in [0, 1] (USM-sharpened when
    ``usm_hr``), lr [B, 3, H/scale, W/scale] float32 in [0, 1] on 8-bit levels.
    As in Real-ESRGAN, the degradation starts from the sharpened HR when ``usm_hr`` and
    ``settings.degrade_sharpened`` (the default); otherwise from the plain HR.

    A sample's output depends only on its HR image and its params: not on the other samples
    of the batch, on repeated calls, or (on CPU) on the number of torch threads.
    """
    _check_inputs(hr, params, settings)
    device = hr.device
    hr = hr.to(torch.float32).contiguous()
    _, _, ori_h, ori_w = hr.shape
    lr_h, lr_w = ori_h // settings.scale, ori_w // settings.scale

    if usm_hr:
        target = usm_sharpen(hr, settings.usm_weight, settings.usm_radius, settings.usm_threshold).clamp(0, 1)
    else:
        target = hr
    source = target if (usm_hr and settings.degrade_sharpened) else hr

    # Blur 1: same size for every sample, per-sample kernels in one grouped convolution.
    blurred = filter2d(source, _kernels([p.kernel1 for p in params], device))

    # Stage 1 and 2 change each sample's size differently: loop.
    at_lr = [_stages_to_lr(blurred[index : index + 1], p, (lr_h, lr_w)) for index, p in enumerate(params)]

    # Back at a common size: the final sinc (identity pulse where not applied) for all at once ...
    out = filter2d(torch.cat(at_lr), _kernels([p.sinc_kernel for p in params], device))
    # ... and JPEG for the samples whose order is [resize + sinc, JPEG].
    out = _late_jpeg(out, params)

    lr = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
    return target, lr.contiguous()
