"""The methods one evaluation compares: XPSR (and its inference-time ablations), baselines, outside results.

* ``xpsr``: the configured XPSR model, sampled with the run's recipe; ``ablation`` changes only what
  the model is told (the paper's Tables 2 and 5a, on one trained model):
  ``no_high`` (c_h is empty), ``no_low`` (c_l is empty), ``no_prompts`` (both empty) and
  ``no_negative`` (the negative prompts are null text). A recipe's ``added_prompt`` is part of
  the sampling recipe, not of c_h, so it stays (as in the authors' script without a caption).
* ``bicubic``: PIL's bicubic upscaling of the LR image.
* ``realesrgan``: Real-ESRGAN (basicsr's RRDBNet) from a local ``RealESRGAN_x4plus.pth``; without
  the file the method is reported as not run.
* ``folder``: SR images made elsewhere (e.g. another paper's released results), matched to the
  pairs by key or LR file name.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UserError

MethodKind = Literal["xpsr", "bicubic", "realesrgan", "folder"]
Ablation = Literal["none", "no_high", "no_low", "no_prompts", "no_negative"]
KINDS = ("xpsr", "bicubic", "realesrgan", "folder")
ABLATIONS = ("no_high", "no_low", "no_prompts", "no_negative")
DEFAULT_REALESRGAN_WEIGHTS = "models/baselines/RealESRGAN_x4plus.pth"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class MethodSpec(BaseModel):
    """One column of the comparison."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Column name in the report and folder name under sr/.")
    kind: MethodKind
    path: Optional[str] = Field(None, description="realesrgan: the weights file; folder: the folder of SR images.")
    ablation: Ablation = Field("none", description="xpsr only: what the model is not told.")

    @model_validator(mode="after")
    def _consistent(self) -> "MethodSpec":
        if self.kind == "folder" and not self.path:
            raise ValueError(f"method {self.name}: a folder method needs a path (NAME=folder:PATH)")
        if self.ablation != "none" and self.kind != "xpsr":
            raise ValueError(f"method {self.name}: ablations apply to xpsr methods only")
        return self


DEFAULT_METHODS = [
    MethodSpec(name="bicubic", kind="bicubic"),
    MethodSpec(name="realesrgan", kind="realesrgan", path=DEFAULT_REALESRGAN_WEIGHTS),
    MethodSpec(name="xpsr", kind="xpsr"),
]


def ablation_methods(base: str = "xpsr") -> list[MethodSpec]:
    """The four inference-time ablations of the xpsr method ``base``, named ``<base>-no-high`` etc."""
    return [MethodSpec(name=f"{base}-{a.replace('_', '-')}", kind="xpsr", ablation=a) for a in ABLATIONS]


def parse_method(text: str) -> MethodSpec:
    """``KIND``, ``KIND:PATH``, ``NAME=KIND`` or ``NAME=KIND:PATH`` (e.g. ``SeeSR=folder:results/seesr``)."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    kind, _, path = rest.partition(":")
    ablation = "none"
    if kind not in KINDS and kind.startswith("xpsr-") and kind[5:].replace("-", "_") in ABLATIONS:
        kind, ablation = "xpsr", kind[5:].replace("-", "_")
    if kind not in KINDS:
        raise UserError(f"Method {text!r}: unknown kind {kind!r}; choose from {', '.join(KINDS)} "
                        f"(or xpsr-{'/xpsr-'.join(a.replace('_', '-') for a in ABLATIONS)}).")
    name = name or (rest if ablation != "none" else kind)
    if not re.match(NAME_PATTERN, name):
        raise UserError(
            f"Method name {name!r} may hold only letters, digits and _ . + - (and starts with one of the first two)."
        )
    try:
        return MethodSpec(name=name, kind=kind, path=path or None, ablation=ablation)
    except ValueError as error:
        raise UserError(str(error).splitlines()[-1]) from None


def check_unique(methods: list[MethodSpec]) -> None:
    names = [m.name for m in methods]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"Method names must be unique; repeated: {', '.join(repeated)}.")


def ablated_prompts(ablation: str, content: str, quality: str, settings):
    """(c_h, c_l, settings) for an xpsr method with ``ablation``: only what the model is told changes."""
    if ablation in ("no_high", "no_prompts"):
        content = ""
    if ablation in ("no_low", "no_prompts"):
        quality = ""
    if ablation == "no_negative":
        negative_quality = None if settings.negative_quality_prompt is None else ""
        settings = replace(settings, negative_prompt="", negative_quality_prompt=negative_quality)
    return content, quality, settings


def unavailable_reason(method: MethodSpec) -> Optional[str]:
    """Why a baseline cannot run here (its local file is missing), or None."""
    if method.kind == "realesrgan":
        path = Path(method.path or DEFAULT_REALESRGAN_WEIGHTS)
        if not path.is_file():
            return f"{path} is missing (the Real-ESRGAN x4plus weights: put RealESRGAN_x4plus.pth there)"
    if method.kind == "folder" and not Path(method.path).is_dir():
        return f"the SR folder {method.path} does not exist"
    return None
