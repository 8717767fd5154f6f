"""Evaluation metrics: the paper's (pyiqa, weights from one local folder) and our PSNR/SSIM on Y.

``engine`` holds the table of metrics (:data:`METRICS`), how each is created and fed as the authors
did, and which weight file each needs (the table of files and their sources is in its docstring);
``fidelity`` holds our weight-free Y-channel PSNR/SSIM with basicsr's definitions.
"""

from .engine import (
    AUTHORS_METRICS,
    DISTRIBUTION,
    FULL_REFERENCE,
    METRICS,
    NO_REFERENCE,
    PYIQA_MISSING,
    PYIQA_VERSION,
    TABLE1_METRICS,
    MetricRun,
    MetricSpec,
    WeightDownloadBlocked,
    WeightFile,
    local_weights_only,
    missing_weights,
    prepare_metrics,
)
from .fidelity import psnr_y, rgb_to_y, ssim_y

__all__ = [
    "AUTHORS_METRICS", "DISTRIBUTION", "FULL_REFERENCE", "METRICS", "NO_REFERENCE", "PYIQA_MISSING", "PYIQA_VERSION",
    "TABLE1_METRICS", "MetricRun", "MetricSpec", "WeightDownloadBlocked", "WeightFile", "local_weights_only",
    "missing_weights", "prepare_metrics", "psnr_y", "rgb_to_y", "ssim_y",
]
