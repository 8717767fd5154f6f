"""Load a Stable Diffusion 1.x base model: one function for the tiny zoo folder and real checkpoints.

``load_base_sd`` accepts a local diffusers folder (``model_index.json`` + ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or, when the user is online, a hub id such as
``stable-diffusion-v1-5/stable-diffusion-v1-5``. Each component goes through its library's own
``from_pretrained``. The frozen parts come back in eval mode with ``requires_grad`` off.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..errors import UserError

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
    import torch

    first = next(module.parameters(), None)
    if first is not None and first.device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not os.path.isabs(text)


def is_local_source(path_or_id: str | os.PathLike) -> bool:
    """Whether a model source is a local path: it exists, or it does not look like a hub id (``owner/name``)."""
    text = os.fspath(path_or_id)
    return os.path.exists(os.path.expanduser(text)) or not _looks_like_hub_id(text)


def _weight_errors() -> tuple[type[BaseException], ...]:
    """What loaders raise on a broken model folder: unreadable or truncated files, bad JSON, wrong shapes."""
    from safetensors import SafetensorError

    # OSError: missing files, and the hub libraries' wrapper for unreadable weights; ValueError: JSON decode errors
    # and mismatched configs; RuntimeError, EOFError, UnpicklingError and LookupError (KeyError, IndexError): what
    # torch.load's unpickler raises on truncated or garbage .bin/.pth files, and a config naming an unknown class
    return (OSError, ValueError, RuntimeError, LookupError, EOFError, pickle.UnpicklingError, SafetensorError)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MISSING_FILE = re.compile(r"(?:file named|containing an?) ([\w.\-]+?)(?: file|\.? |\.?$)")


def describe_load_error(error: BaseException, path: str | os.PathLike) -> str:
    """One line on why loading ``path`` failed, naming the file; for a local folder never a hub URL."""
    text = " ".join(str(error).split()).split(". ")[0] or type(error).__name__  # the first sentence says it
    local = is_local_source(path)
    missing = _MISSING_FILE.search(text)
    if local and not os.path.exists(os.path.expanduser(os.fspath(path))):
        return "it does not exist"
    if local and ("huggingface.co" in text or "does not appear to have" in text):
        return f"it has no {missing.group(1)}" if missing else "files are missing from it"
    if not local and ("huggingface.co" in text or "does not appear to have" in text):
        return f"there is no such local folder, and the hub could not serve it ({text.rstrip('.')})"
    if isinstance(error, json.JSONDecodeError):
        return f"one of its JSON files is not valid JSON ({text})"
    from safetensors import SafetensorError

    place = Path(os.path.expanduser(os.fspath(path)))
    if place.is_file():  # one weight file: whatever its reader raised (torch.load's KeyError is a bare number)
        return f"the file is truncated or corrupt ({type(error).__name__}: {text.rstrip('.')})"
    if isinstance(error, (SafetensorError, EOFError, pickle.UnpicklingError)) or "checkpoint file" in text:
        weights = sorted(p.name for p in place.glob("*") if p.suffix in WEIGHT_SUFFIXES) if local else []
        named = f" ({', '.join(weights)})" if weights else ""
        return f"its weight file{named} is truncated or corrupt ({text.rstrip('.')})"
    return text.rstrip(".")


@contextmanager
def loading_model(
    what: str, path: str | os.PathLike, hint: str = "", also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Wrap one model load: a broken or incomplete model folder becomes a ``UserError`` naming ``what`` and ``path``.

    Only the errors loaders raise on bad files (see ``_weight_errors``, plus ``also``) are turned into user errors;
    anything else is a programming error and propagates.
    """
    try:
        yield
    except UserError:
        raise
    except _weight_errors() + also as error:
        hint = hint or "Replace the folder with a complete copy, or rebuild it with the command that wrote it."
        raise UserError(f"Could not load {what} from {os.fspath(path)}: {describe_load_error(error, path)}. "
                        f"{hint}") from error


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
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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
    import torch

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
