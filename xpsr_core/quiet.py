"""Third-party noise, silenced at its source before torch, transformers or diffusers are imported.

* bitsandbytes (imported by diffusers' quantizers on every model load) asks the ``kernels`` package
  for an optional CPU kernel from the Hugging Face Hub and logs a warning when it cannot have it
  ("Failed to load CPU gemm_4bit_forward from kernels-community ..."; offline, kernels adds
  "Skipping publisher trust check ..."). Quantised models are never used here, so those two
  loggers, which say nothing else, drop to errors only.
* When output is not a terminal (``dvc repro``, pipes, batch logs), the progress bars of
  huggingface_hub, transformers ("Loading weights") and diffusers are switched off: in a log they
  are carriage-return garbage. Our own plain progress lines (``progress.py``) stay. A value the
  user set for either variable is kept.
"""

from __future__ import annotations

import logging
import os

from .progress import is_terminal

# the loggers whose only messages are the optional-kernel lookups
KERNEL_LOOKUP_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
# read by huggingface_hub at import (transformers follows it) and by every tqdm bar (diffusers' included)
PROGRESS_BAR_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def quiet_third_party() -> None:
    """Silence the optional-kernel lookups; in a log, also the third-party progress bars. Call before heavy imports."""
    for name in KERNEL_LOOKUP_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not is_terminal():
        for name, value in PROGRESS_BAR_SWITCHES.items():
            os.environ.setdefault(name, value)
