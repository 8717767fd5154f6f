"""The SR pipeline folder: a Stable Diffusion folder (diffusers layout), ``xpsr/`` (every trained part, the DFC
heads included when the model has them) and ``xpsr_pipeline.json`` (which subfolder, the sampling defaults).

``xpsr import-official`` and :meth:`XPSRPipeline.save_pretrained` both write it with
:func:`write_pipeline_folder`; ``XPSRPipeline.from_pretrained`` reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Mapping, Optional

from .atomic import atomic_folder, share_per_umask

PIPELINE_FILE = "xpsr_pipeline.json"
XPSR_SUBFOLDER = "xpsr"
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def write_pipeline_folder(
    out: str | Path,
    write_trained: Callable[[Path], object],
    sr_defaults: Optional[dict] = None,
    base_model: str | Path | None = None,
    components: Optional[Mapping[str, object]] = None,
    write_unet: Optional[Callable[[Path], object]] = None,
) -> Path:
    """Write ``out`` whole or not at all (filled under a temporary name, then renamed).

    The SD parts come from ``base_model``, a local SD folder whose files are copied (its ``unet/`` left out when
    ``write_unet`` writes one), or from ``components`` (name -> vae, text encoder, tokenizer, scheduler in
    memory, each saved with ``save_pretrained``, with a diffusers ``model_index.json``). ``write_unet(folder)``
    writes the UNet, ``write_trained(folder)`` every trained part (``xpsr/``, the DFC heads included): an
    in-memory model saves itself, an import streams its tensors from the checkpoint.
    """
    if (base_model is None) == (components is None):
        raise ValueError("pass exactly one of base_model (a local SD folder) and components")
    out = Path(out)
    with atomic_folder(out) as tmp:
        if components is None:
            shutil.copytree(base_model, tmp, ignore=shutil.ignore_patterns("unet") if write_unet else None,
                            dirs_exist_ok=True)
        else:
            index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                     "safety_checker": [None, None], "feature_extractor": [None, None]}
            for name, component in components.items():
                component.save_pretrained(tmp / name)
                index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
            index["unet"] = ["diffusers", "UNet2DConditionModel"]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        if write_unet is not None:
            write_unet(tmp / "unet")
        write_trained(tmp / XPSR_SUBFOLDER)
        (tmp / PIPELINE_FILE).write_text(json.dumps({"xpsr": XPSR_SUBFOLDER, "defaults": sr_defaults or {}},
                                                    indent=2))
        share_per_umask(tmp)  # safetensors writes 0600; copytree keeps the base folder's modes
    return out
