"""Named inference recipes: complete :class:`~.pipeline.SRSettings` values under one name.

* ``default``: the settings' own defaults (the paper's recipe, section 4.1).
* ``paper``: what ``params-paper.yaml`` states: DDPM 20 steps, x4, guidance 5.5 with the paper's
  negative prompt, AdaIN colour correction (the same values as ``default``, named for clarity).
* ``official``: the authors' test script and pipeline (qyp2000/XPSR ``test.py`` with
  ``configs/xpsr_test.yaml``): added positive prompt, their negative prompts for c_h and c_l,
  guidance 4.5, a posterior sample noised to the first timestep and again to 800, PIL resizing
  with a 512 px processing size, their 8-bit AdaIN, their tiling thresholds, and one unseeded
  generator on the model's device for the whole run.

A preset is a layer: it sits above the settings' defaults (and a saved pipeline folder's recorded
defaults) and below every explicit value (params file, CLI options, ``--set``, keyword overrides).
Every preset defines every field, so naming one replaces a folder's recorded recipe wholesale.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..io.pipeline_folder import PIPELINE_FILE
from ..text_conditioning import NEGATIVE_PROMPT
from .settings import SRSettings

# the authors' prompts (configs/xpsr_test.yaml and pipelines/pipeline_xpsr.py)
OFFICIAL_ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
OFFICIAL_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
OFFICIAL_NEGATIVE_QUALITY_PROMPT = "high resolution, best quality, clear"

# changes from the SRSettings defaults
_CHANGES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"scale": 4, "steps": 20, "scheduler": "ddpm", "guidance_scale": 5.5, "negative_prompt": NEGATIVE_PROMPT,
              "color_fix": "adain"},
    "official": {
        "scale": 4,
        "steps": 20,
        "scheduler": "ddpm",  # from the SD folder's scheduler config: 951, 901, ..., 1
        "guidance_scale": 4.5,
        "negative_prompt": OFFICIAL_NEGATIVE_PROMPT,
        "added_prompt": OFFICIAL_ADDED_PROMPT,
        "negative_quality_prompt": OFFICIAL_NEGATIVE_QUALITY_PROMPT,
        "cfg_batched": True,
        "controlnet_negative": True,
        "conditioning_scale": 1.0,
        "start_latent": "sample",
        "added_noise_level": 800,
        "resize": "pil-bicubic",
        "process_size": 512,
        "pad_multiple": 8,  # their pipeline runs at the multiple-of-8 size, unpadded
        "color_fix": "adain-official",
        "latent_tile_threshold": 2560,  # latent_tiled_size 320 (latent px): whole when h * w <= 320^2
        "tile_size": 2560,  # tiles of 320 latent px ...
        "tile_overlap": 64,  # ... overlapping by 8 latent px
        "vae_tile_size": 1088,  # their tiled VAE encodes whole up to max side 1024 + 2 x 32 px
        "vae_decode_tile_size": 1968,  # ... and decodes whole up to 224 + 2 x 11 = 246 latent px
        "generator_scope": "run",  # one generator for every image of the run, in input order
        "generator_device": "device",  # torch.Generator(device=accelerator.device)
        "seed": None,  # unseeded: torch's default initial seed 67280421310721
    },
}
PRESETS = tuple(_CHANGES)


def preset_values(name: str) -> dict[str, Any]:
    """Every :class:`SRSettings` field under preset ``name`` (a plain dict)."""
    if name not in _CHANGES:
        raise UserError(f"Unknown preset {name!r}; choose from {', '.join(PRESETS)}.")
    return asdict(SRSettings(**_CHANGES[name]))


def preset_settings(name: str, **overrides):
    """:class:`SRSettings` of preset ``name`` with ``overrides`` on top (validated as SRSettings are)."""
    return SRSettings(**{**preset_values(name), **overrides})


def saved_defaults(folder: str | Path) -> dict[str, Any]:
    """The SRSettings recorded in a saved pipeline folder (``{}`` when it records none or is not one)."""
    path = Path(folder) / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text()).get("defaults") or {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in saved.items() if k in SRSettings.__dataclass_fields__}


def layered_settings(explicit: dict[str, Any], preset: Optional[str] = None, pipeline: Optional[str | Path] = None,
                     fields: Optional[set[str]] = None) -> dict[str, Any]:
    """``explicit`` values over ``preset``'s over a pipeline folder's recorded defaults (lowest).

    ``fields`` limits the layered-in names (e.g. to a config's fields); explicit values are kept as given.
    """
    layers: dict[str, Any] = {}
    if pipeline:
        layers.update(saved_defaults(pipeline))
    if preset:
        layers.update(preset_values(preset))
    if fields is not None:
        layers = {k: v for k, v in layers.items() if k in fields}
    return {**layers, **explicit}
