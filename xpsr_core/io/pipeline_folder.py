"""The SR pipeline folder: a Stable Diffusion folder (diffusers layout), ``xpsr/`` (every trained part, the DFC
heads included when the model has them) and ``xpsr_pipeline.json`` (which subfolder, the sampling defaults).

``xpsr import-official`` and :meth:`XPSRPipeline.save_pretrained` both write it with
:func:`write_pipeline_folder`; ``XPSRPipeline.from_pretrained`` reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

from .atomic import atomic_folder, share_per_umask

PIPELINE_FILE = "xpsr_pipeline.json"
XPSR_SUBFOLDER = "xpsr"
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def write_pipeline_folder(
    model,
    out: str | Path,
    sr_defaults: Optional[dict] = None,
    base_model: str | Path | None = None,
    components: Optional[Sequence] = None,
    write_unet: bool = False,
) -> Path:
    """Write ``out`` whole or not at all (filled under a temporary name, then renamed).

    The SD parts come from ``base_model``, a local SD folder whose files are copied (its ``unet/`` replaced by
    ``model.unet`` when ``write_unet``), or from ``components`` (vae, text encoder, tokenizer, scheduler in
    memory), saved with ``model.unet`` through diffusers' ``StableDiffusionPipeline``.
    """
    if (base_model is None) == (components is None):
        raise ValueError("pass exactly one of base_model (a local SD folder) and components")
    out = Path(out)
    with atomic_folder(out) as tmp:
        if components is None:
            shutil.copytree(base_model, tmp, ignore=shutil.ignore_patterns("unet") if write_unet else None,
                            dirs_exist_ok=True)
            if write_unet:
                model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        else:
            from diffusers import StableDiffusionPipeline

            vae, text_encoder, tokenizer, scheduler = components
            StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model.unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            ).save_pretrained(tmp, safe_serialization=True)
        model.save_trainable(tmp / XPSR_SUBFOLDER)
        (tmp / PIPELINE_FILE).write_text(json.dumps({"xpsr": XPSR_SUBFOLDER, "defaults": sr_defaults or {}},
                                                    indent=2))
        share_per_umask(tmp)  # safetensors writes 0600; copytree keeps the base folder's modes
    return out
