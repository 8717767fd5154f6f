"""The one place that imports basicsr.

basicsr 1.4.2 does ``from torchvision.transforms.functional_tensor import rgb_to_grayscale``;
current torchvision removed that private module (its functions live in
``torchvision.transforms.functional``). Aliasing the old name in ``sys.modules`` before the
first basicsr import is the standard fix. Every other module gets basicsr pieces from here,
so the alias is always in place first.
"""

from __future__ import annotations

import sys


def _alias_functional_tensor() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
    except ImportError:
        import torchvision.transforms.functional as functional

        sys.modules[name] = functional


_alias_functional_tensor()

from basicsr.archs.rrdbnet_arch import RRDBNet  # noqa: E402
from basicsr.data.degradations import (  # noqa: E402
    bivariate_Gaussian,
    bivariate_generalized_Gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
)
from basicsr.utils.diffjpeg import DiffJPEG  # noqa: E402
from basicsr.utils.img_process_util import USMSharp, filter2D  # noqa: E402

__all__ = [
    "DiffJPEG",
    "RRDBNet",
    "USMSharp",
    "bivariate_Gaussian",
    "bivariate_generalized_Gaussian",
    "bivariate_plateau",
    "circular_lowpass_kernel",
    "filter2D",
]
