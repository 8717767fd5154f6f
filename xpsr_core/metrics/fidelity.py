"""PSNR and SSIM on the Y channel, with the definitions basicsr (and the SR literature) use.

Inputs are RGB uint8 (or float in [0, 255]) H x W x 3 arrays. ``crop_border`` pixels are removed
from every edge (the scale factor, by convention). Y is ITU-R BT.601 "studio swing" luma
(16..235), computed in float32 exactly as basicsr's ``to_y_channel`` does; PSNR and SSIM then
run in float64. SSIM: 11 x 11 Gaussian window (sigma 1.5), valid region only, C1 = (0.01 L)^2,
C2 = (0.03 L)^2 with L = 255. Identical images have PSNR ``inf``.

These are not the authors' numbers: their pyiqa PSNR adds 1e-8 to the MSE, and their pyiqa SSIM
rounds Y to integers first (see ``engine``'s docstring for the size of both differences).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_BGR_TO_Y = np.array([24.966, 128.553, 65.481])  # basicsr's coefficient order (B, G, R) on [0, 1]


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """Y channel in [16, 235] (float32 arithmetic as basicsr), H x W."""
    x = np.asarray(image).astype(np.float32) / 255.0
    if x.ndim == 2:
        return (x * 255.0).astype(np.float32)
    y = np.dot(x[..., ::-1], _BGR_TO_Y) + 16.0
    return (y / 255.0).astype(np.float32) * 255.0


def _prepare(image, reference, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    image, reference = np.asarray(image), np.asarray(reference)
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {image.shape} vs {reference.shape}")
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border, ...]
        reference = reference[crop_border:-crop_border, crop_border:-crop_border, ...]
    return rgb_to_y(image).astype(np.float64), rgb_to_y(reference).astype(np.float64)


def psnr_y(image, reference, crop_border: int = 0) -> float:
    a, b = _prepare(image, reference, crop_border)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid-mode separable correlation of a 2-D array with ``outer(kernel, kernel)``."""
    size = kernel.size
    rows = sliding_window_view(x, size, axis=0) @ kernel  # (H - size + 1, W)
    return sliding_window_view(rows, size, axis=1) @ kernel


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = _gaussian_kernel()
    if min(a.shape) < kernel.size:
        raise ValueError(f"SSIM needs images of at least {kernel.size} x {kernel.size} pixels after the border crop")
    mu_a, mu_b = _filter_valid(a, kernel), _filter_valid(b, kernel)
    var_a = _filter_valid(a * a, kernel) - mu_a**2
    var_b = _filter_valid(b * b, kernel) - mu_b**2
    cov = _filter_valid(a * b, kernel) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim_y(image, reference, crop_border: int = 0) -> float:
    a, b = _prepare(image, reference, crop_border)
    return _ssim_channel(a, b)
