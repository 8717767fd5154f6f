"""The settings of one SR run (:class:`SRSettings`; every one is recipe: a preset sets them all) and the names
its fields accept: schedulers, colour corrections, resize chains. No torch here, so a bad value fails before any
model library loads; :mod:`.pipeline`, :mod:`.color` and :mod:`xpsr_core.conditioning` run what these names name.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as settings_dataclass

from ..config import recipe_field, runtime_field
from ..text_conditioning import NEGATIVE_PROMPT

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
COLOR_FIXES = ("adain", "wavelet", "adain-official", "none")  # see .color
RESIZES = ("torch-bicubic", "pil-bicubic")  # LR -> condition chains, see xpsr_core.conditioning

# Literal types from the one list of each kind of name, so the fields accept exactly what the pipeline runs
SchedulerName = Literal[tuple(SCHEDULERS)]
ColorFixName = Literal[COLOR_FIXES]
ResizeName = Literal[RESIZES]


@settings_dataclass(config=ConfigDict(extra="forbid", validate_assignment=True))
class SRSettings:
    """Every knob of one SR run (recorded in each output's JSON sidecar): its type, default, range and meaning.

    The defaults are the paper's recipe; :mod:`.presets` names complete sets of values
    (``default``, ``paper``, ``official`` = the authors' test script). Values are validated when
    the settings are made or changed (``dataclasses.replace`` included); ``xpsr sr`` and ``xpsr
    evaluate`` take these fields as their own (:class:`~.config.SRModelConfig`).
    """

    scale: int = recipe_field(4, ge=1, le=16, description="Output size over LR size.")
    steps: int = recipe_field(20, ge=1, le=1000, description="Sampling steps.")
    scheduler: SchedulerName = recipe_field("ddpm", description="Sampling scheduler, configured from the base model's.")
    guidance_scale: float = recipe_field(
        5.5, ge=0, description="Classifier-free guidance scale (at most 1: the positive branch alone).")
    negative_prompt: str = recipe_field(NEGATIVE_PROMPT, description="Replaces c_h in the negative guidance branch.")
    cfg_batched: bool = runtime_field(
        True, "Run both guidance branches as one batch (same result, faster).", recipe=True)
    controlnet_negative: bool = recipe_field(
        True, description="The ControlNet also sees the negative prompt in the negative branch.")
    conditioning_scale: float = recipe_field(1.0, ge=0, description="Weight of the ControlNet residuals.")
    color_fix: ColorFixName = recipe_field(
        "adain", description="Colour correction of the output towards the upsampled LR.")
    tile_size: Optional[int] = recipe_field(
        None, ge=64, description="Latent tile in output pixels (default: the UNet's native size).")
    tile_overlap: Optional[int] = recipe_field(
        None, ge=0, description="Latent tile overlap in pixels (default: tile_size / 4).")
    vae_tile_size: Optional[int] = recipe_field(
        None, ge=64, description="VAE tile in pixels (default: the VAE's native size).")
    vae_tile_overlap: Optional[int] = recipe_field(
        None, ge=0, description="VAE tile overlap in pixels (default: vae_tile_size / 4).")
    seed: Optional[int] = recipe_field(
        0, description="None: unseeded generators (torch's default seed 67280421310721).")
    # the authors' recipe (their test script); each default keeps the paper's behaviour
    added_prompt: str = recipe_field(
        "", description="Appended to every content caption as '<c_h.lstrip()> <added_prompt>' (official: the "
                        "authors' quality words).")
    negative_quality_prompt: Optional[str] = recipe_field(
        None, description="c_l of the negative guidance branch (None: the image's c_l).")
    start_latent: Literal["mean", "sample"] = recipe_field(
        "mean", description="Start from the LR latent's posterior mean or a sample.")
    added_noise_level: Optional[int] = recipe_field(
        None, ge=0, description="Noise the start latent once more, to this timestep (official: 800).")
    resize: ResizeName = recipe_field(
        "torch-bicubic", description="LR -> condition resize chain (see xpsr_core.conditioning).")
    process_size: Optional[int] = recipe_field(
        None, ge=8, description="Enlarge conditions with a shorter side to it; resize the output back.")
    pad_multiple: Optional[int] = recipe_field(
        None, ge=1, description="Pad the condition to this multiple (default: the VAE x UNet down-sampling factor).")
    latent_tile_threshold: Optional[int] = recipe_field(
        None, ge=8, description="Pixels: latents of area <= (this / 8)^2 are sampled whole (default: tiled when a "
                                "side exceeds tile_size).")
    vae_decode_tile_size: Optional[int] = recipe_field(
        None, ge=64, description="VAE decoder tile in pixels (default: vae_tile_size).")
    generator_scope: Literal["image", "run"] = recipe_field(
        "image", description="One generator per image (seeded from seed and its name), or one for the whole run, "
                             "in input order.")
    generator_device: Literal["cpu", "device"] = recipe_field(
        "cpu", description="Draw random numbers on the CPU or on the model's device.")
