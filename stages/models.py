"""Stage ``models``: write the offline model zoo (tiny, or SD-1.5/LLaVA-1.5-7B shaped with random weights).

``run(ModelsConfig(kind="tiny", out=Path("models/tiny")))`` writes ``out/sd15`` (a diffusers
Stable Diffusion 1.5 folder) and ``out/captioner`` (a llava-hf style folder), both loadable with
the libraries' own ``from_pretrained`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.common import console
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.errors import UserError


class ModelsConfig(StageConfig):
    kind: Literal["tiny", "sd15-shaped"] = Field(
        "tiny",
        description="tiny: small random models; sd15-shaped: real SD-1.5 and LLaVA-1.5-7B shapes, random weights.",
    )
    out: Path = Field(Path("models/tiny"), description="Folder that receives sd15/ and captioner/.")
    seed: int = Field(0, description="Seed of the random weights.")
    overwrite: bool = runtime_field(False, "Replace a zoo written with other settings.")


def run(config: ModelsConfig) -> dict:
    from xpsr_core.io.outputs import mark_finished, prepare_output_dir
    from xpsr_core.zoo import CAPTIONER_SUBFOLDER, SD_SUBFOLDER, parameter_counts, write_zoo

    started = time.perf_counter()
    out = Path(config.out)
    marker = out / "zoo.json"
    done = False
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
            done = previous.get("preset") == config.kind and previous.get("seed") == config.seed
        except (OSError, ValueError):
            done = False
    prepare_output_dir(out, "models", config, overwrite=config.overwrite,
                       claims=(f"{SD_SUBFOLDER}/", f"{CAPTIONER_SUBFOLDER}/", "zoo.json"))
    if done and not config.overwrite:
        console.print(f"[bold green]models[/] {config.kind} zoo already in {out}; nothing to do.")
    else:
        if config.kind == "sd15-shaped":
            console.print(
                "Writing SD-1.5 and LLaVA-1.5-7B shaped random weights (about 16 GB in fp16; needs about 16 GB of RAM)."
            )
        try:
            write_zoo(out, config.kind, seed=config.seed, overwrite=True)
        except MemoryError:
            raise UserError(
                f"Not enough memory to build the {config.kind} zoo; free memory or use a larger machine."
            ) from None
    mark_finished(out)
    report = {
        "stage": "models",
        "kind": config.kind,
        "out": str(out),
        "sd": str(out / SD_SUBFOLDER),
        "captioner": str(out / CAPTIONER_SUBFOLDER),
        "parameters": parameter_counts(config.kind),
        "skipped": bool(done and not config.overwrite),
        "seconds": round(time.perf_counter() - started, 3),
    }
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in report["parameters"].items())
    console.print(
        f"[bold green]models[/] done: {report['sd']} and {report['captioner']} ({params}), {report['seconds']:.1f} s"
    )
    return report
