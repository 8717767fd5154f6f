"""Load a Stable Diffusion 1.x base model: one function for the tiny zoo folder and real checkpoints.

``load_base_sd`` accepts a local diffusers folder (``model_index.json`` + ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or, when the user is online, a hub id such as
``stable-diffusion-v1-5/stable-diffusion-v1-5``. Each component goes through its library's own
``from_pretrained``. The frozen parts come back in eval mode with ``requires_grad`` off.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import UserError
from ..io.model_files import is_local_source, loading_model

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}


@dataclass
class BaseSD:
    """The parts of a Stable Diffusion base model XPSR uses (absent ones are None)."""

    source: str
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 0.18215


def channels_last_on_cpu(module):
    """Store ``module``'s 4-D weights channels-last when it lives on the CPU.

    oneDNN then runs the convolutions on NHWC data without reordering to and from NCHW on every
    call: on our 2-core machine the tiny VAE encoder runs 1.35-1.74x and a training step 1.12-1.16x
    faster (benchmarks/bench_layout.py). On CUDA the default layout stays: not measured there yet.
    """
    first = next(module.parameters(), None)
    if first is not None and first.device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def _check_local_folder(folder: Path, components: Sequence[str]) -> None:
    hint = (
        "Point the params at a diffusers Stable Diffusion 1.x folder, "
        "or write the tiny one with `xpsr models tiny --out DIR`."
    )
    if not folder.is_dir():
        raise UserError(f"The base model folder {folder} does not exist or is not a folder. {hint}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"{folder} is not a diffusers model folder: model_index.json is missing. {hint}")
    try:
        json.loads(index.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{index} is not readable JSON ({error}). {hint}") from None
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            raise UserError(f"The base model folder {folder} has no {name}/ subfolder. {hint}")
        if not any((sub / f).is_file() for f in _CONFIG_FILES[name]):
            raise UserError(f"{sub} holds no {' or '.join(_CONFIG_FILES[name])}; the folder is incomplete. {hint}")


def check_base_model(path_or_id: str | Path, components: Sequence[str] = COMPONENTS) -> str:
    """The source to load from: a checked local folder (``UserError`` naming what is missing), or a hub id as given."""
    source = str(path_or_id)
    local = Path(os.path.expanduser(source))
    if is_local_source(source):
        _check_local_folder(local, components)
        return str(local)
    return source


def _component_loaders():
    return {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "scheduler": DDPMScheduler,
    }


def load_base_sd(
    path_or_id: str | os.PathLike,
    dtype: Any = None,
    device: Any = "cpu",
    components: Sequence[str] = COMPONENTS,
    variant: Optional[str] = None,
) -> BaseSD:
    """Load the requested SD-1.x components from a local folder or a hub id (same code path).

    ``dtype`` (a torch dtype, default float32) applies to unet, vae and text encoder. Errors a
    user can cause (missing or malformed folder, unreachable hub id) raise ``UserError``.
    """
    dtype = dtype or torch.float32
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown SD components {unknown}; choose from {COMPONENTS}")
    source = check_base_model(path_or_id, components)
    loaders = _component_loaders()
    base = BaseSD(source=source)
    for name in components:
        cls = loaders[name]
        kwargs: dict = {"subfolder": name}
        if name in ("unet", "vae", "text_encoder"):
            kwargs["torch_dtype" if name != "text_encoder" else "dtype"] = dtype
            if variant:
                kwargs["variant"] = variant
        hint = ("Check that the folder is a complete diffusers Stable Diffusion 1.x folder"
                + (" (rebuild the tiny one with `xpsr models tiny --out DIR`)." if is_local_source(source)
                   else ", that the hub id is right and that you are online."))
        where = os.path.join(source, name) if is_local_source(source) else source
        with loading_model(f"the {name} of the base model", where, hint):
            component = cls.from_pretrained(source, **kwargs)
        if name in ("unet", "vae", "text_encoder"):
            component = channels_last_on_cpu(component.to(device).eval().requires_grad_(False))
        setattr(base, name, component)
    return base
