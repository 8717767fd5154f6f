"""Evaluation metrics: Y-channel PSNR/SSIM (basicsr definitions) and optional weight-backed metrics."""

from .fidelity import psnr_y, rgb_to_y, ssim_y
from .optional import OPTIONAL_METRICS, SPECS, MetricRun, availability, prepare_metrics

__all__ = ["OPTIONAL_METRICS", "SPECS", "MetricRun", "availability", "prepare_metrics", "psnr_y", "rgb_to_y", "ssim_y"]
