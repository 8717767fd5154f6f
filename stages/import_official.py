"""Stage ``import-official``: the authors' released checkpoint as an xpsr pipeline folder.

``run(ImportOfficialConfig(checkpoint=..., base_model=..., out=...))`` reads
``checkpoint/{unet,controlnet}`` (the authors' layout), checks it against the base SD-1.5 folder and
writes ``out``: a pipeline folder (``xpsr sr --pipeline out``) whose ``xpsr/`` part, DFC heads
included, ``xpsr train`` can start from. The folder's inference defaults are the authors' recipe.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from stages.common import console
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.errors import UserError
from xpsr_core.infer.presets import preset_values


class ImportOfficialConfig(StageConfig):
    checkpoint: Path = Field(..., description="The authors' checkpoint folder (holding unet/ and controlnet/).")
    base_model: str = Field(
        "models/stable-diffusion-v1-5", description="The SD-1.5 folder the checkpoint was trained on."
    )
    out: Path = Field(Path("models/xpsr-official"), description="Pipeline folder to write.")
    allow_base_mismatch: bool = Field(
        False, description="Use the checkpoint's own SD UNet tensors when they differ from the base model's."
    )
    overwrite: bool = runtime_field(False, "Replace an existing folder.")


def run(config: ImportOfficialConfig) -> dict:
    from xpsr_core.io.outputs import claim_contents, refuse_foreign
    from xpsr_core.models.official import import_official

    started = time.perf_counter()
    out = Path(config.out)
    if out.is_dir() and any(out.iterdir()):
        refuse_foreign(out, "import-official", record={})  # --overwrite replaces the folder whole
        if not config.overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    summary = import_official(
        config.checkpoint,
        config.base_model,
        out,
        allow_base_mismatch=config.allow_base_mismatch,
        sr_defaults=preset_values("official"),
        log=lambda message: console.print(f"[dim]import-official[/] {message}", highlight=False),
    )
    claim_contents(out)  # written whole: a later --overwrite may replace it
    report = {"stage": "import-official", **summary.as_dict(), "seconds": round(time.perf_counter() - started, 2)}
    mapped = ", ".join(f"{part} {count}" for part, count in summary.mapped.items())
    base = (
        f"the checkpoint's own SD UNet (differs from the base by up to {summary.base_max_abs_diff:.3g})"
        if summary.used_checkpoint_unet
        else "SD UNet identical to the base model"
    )
    console.print(
        f"[bold green]import-official[/] done: {out} ({summary.controlnet_tensors} ControlNet + "
        f"{summary.unet_tensors} UNet "
        f"tensors; filled {mapped}; {base}), {report['seconds']:.1f} s. "
        f"Run `xpsr sr IMAGE --pipeline {out} --out DIR`.",
        highlight=False,
    )
    return report
