"""Stage demo-data: the real photographs scikit-image ships, written as the default raw input."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.errors import UserError
from xpsr_core.io.atomic import atomic_write_bytes, atomic_write_json
from xpsr_core.io.images import encode_png
from xpsr_core.io.outputs import mark_finished, prepare_output_dir

# Real photographs bundled inside the scikit-image wheel (no download needed).
DEMO_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "retina", "immunohistochemistry", "camera", "moon", "grass", "gravel", "brick",
)


class DemoDataConfig(StageConfig):
    out: Path = runtime_field(Path("data/raw/demo"), "Folder for the training photographs.")
    val_out: Optional[Path] = runtime_field(
        None, "Folder for the held-out validation photographs (default: OUT-val beside --out)."
    )
    images: list[str] = Field(default=list(DEMO_IMAGES), min_length=1, description="scikit-image sample names.")
    val_images: list[str] = Field(
        default=["coffee", "chelsea"], description="Held out of training, written to val_out."
    )
    overwrite: bool = runtime_field(False, "Replace a folder made with a different image list.")

    @field_validator("images", "val_images")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(DEMO_IMAGES))
        if unknown:
            raise ValueError(f"unknown sample image(s) {unknown}; choose from {list(DEMO_IMAGES)}")
        return names


def load_sample(name: str):
    """One scikit-image sample as an H x W x 3 uint8 array (grayscale replicated)."""
    import numpy as np
    import skimage.data

    try:
        if name.startswith("motorcycle_"):
            pixels = skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
        else:
            pixels = getattr(skimage.data, name)()
    except Exception as error:  # a sample that would need a download
        raise UserError(f"scikit-image sample '{name}' is not available offline: {error}") from None
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3].astype(np.uint8))


def validation_folder(config: DemoDataConfig) -> Path:
    """Where the held-out photographs go: ``val_out``, else a sibling of ``out`` (data/raw/demo -> data/raw/demo-val),
    so that ``--out`` alone keeps everything the command writes beside the folder the user named."""
    out = Path(config.out)
    return config.val_out if config.val_out is not None else out.with_name(out.name + "-val")


def run(config: DemoDataConfig) -> dict:
    started = time.perf_counter()
    held_out = set(config.val_images)
    counts = {}
    for folder, names in (
        (config.out, [n for n in config.images if n not in held_out]),
        (validation_folder(config), config.val_images),
    ):
        if not names:
            continue
        out = prepare_output_dir(folder, "demo_data", config, overwrite=config.overwrite)
        for name in names:
            target = out / f"{name}.png"
            if not target.exists():
                atomic_write_bytes(target, encode_png(load_sample(name)))
        counts[str(out)] = len(names)
    report = {"stage": "demo_data", "images": counts, "seconds": round(time.perf_counter() - started, 3)}
    atomic_write_json(Path(config.out) / "report.json", report)
    for folder in counts:
        mark_finished(Path(folder))
    return report
