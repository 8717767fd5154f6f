"""Stage sr: super-resolve images with a trained XPSR model.

Inputs: an image file, a folder (recursive) or a glob; captions from the captioner, a caption
manifest, or given once (``xpsr_core.infer.inputs``). For each input ``REL.ext`` the output folder
gets ``REL.png`` and ``REL.json`` (settings, captions, seed, sizes, timing); inputs that would share
them (``x.png`` and ``x.jpg``) keep their suffix: ``x.png.png``, ``x.jpg.png``. The JSON is written
last, so a rerun skips finished images. The output folder must lie apart from the input folders, and
sr never writes over a file it did not write. The work per image, resuming included, is the library's
(``xpsr_core.infer.batch.super_resolve_folder``); the stage adds the checked output folder, the
progress bars, the summary and the failure ratio.

Sampling settings layer as: defaults < a ``pipeline`` folder's recorded recipe < ``preset`` <
explicit values (``xpsr_core.infer.config``). Each image draws from its own generator seeded by
(seed, name), or, with ``generator_scope: run`` (the authors' script), from one generator shared by
all images in input order; then each sidecar records the generator's state after its image, so a
resumed run continues the same stream and writes the same bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from stages.common import console, progress_bar, progress_task
from xpsr_core.config import runtime_field
from xpsr_core.errors import FailureRatioExceeded, UserError
from xpsr_core.infer.batch import BatchProgress, check_output_folder, super_resolve_folder
from xpsr_core.infer.config import SRModelConfig, check_model_paths

STAGE = "sr"


class SRConfig(SRModelConfig):
    inputs: list[str] = runtime_field([], "Image files, folders or glob patterns.")
    out: Path = runtime_field(Path("outputs/sr"), "Folder for the SR PNGs and their JSON sidecars.")
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of images fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


class RichBatchProgress(BatchProgress):
    """The folder's progress as rich bars (plain lines in logs): captions, images with their rate, the steps."""

    def __init__(self, started: float):
        self.started = started  # the stage's start: the images' rate counts the preparation too
        self.bar = None
        self.images_task = None
        self.advance_steps = self.reset_steps = None

    def __enter__(self) -> "RichBatchProgress":
        self.bar = progress_bar().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        return self.bar.__exit__(*exc)

    def captions_started(self) -> Callable[[int, int], None]:
        return progress_task(self.bar, "captions")[0]

    def images_started(self, total: int) -> None:
        self.images_task = self.bar.add_task("images", total=total, rate="")
        self.advance_steps, self.reset_steps = progress_task(self.bar, "steps")

    def image_started(self, name: str) -> None:
        self.reset_steps(f"steps {name}")

    def step(self, done: int, total: int) -> None:
        self.advance_steps(done, total)

    def image_finished(self, name: str, done: int, error: str | None = None) -> None:
        if error is not None:
            self.bar.update(self.images_task, advance=1)
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.images_task, advance=1, rate=f"{done / elapsed:.2f} images/s")


def print_report(report: dict) -> None:
    """The summary line and the first failures."""
    done, failures = report["done"], report["failures"]
    console.print(
        f"[bold green]sr[/] done: {done} images, {report['skipped']} already done, "
        f"{len(failures)} failed of {report['inputs']} inputs, "
        f"{report['seconds']:.1f} s" + (f", {report['images_per_s']:.3f} images/s" if done else "")
    )
    for name, error in list(failures.items())[:10]:
        console.print(f"  failed: {name}: {error}")


def check_failure_ratio(report: dict, max_failure_ratio: float) -> None:
    """Fail the run (after its summary) when more than the allowed share of its inputs failed."""
    inputs, failures = report["inputs"], report["failures"]
    if inputs and len(failures) / inputs > max_failure_ratio:
        raise FailureRatioExceeded(
            f"{len(failures)} of {inputs} images failed, "
            f"more than the allowed share {max_failure_ratio:.0%} "
            "(first: " + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3]) + ")."
        )


def run(config: SRConfig) -> dict:
    from xpsr_core.infer.inputs import collect_inputs
    from xpsr_core.io.outputs import mark_finished, prepare_output_dir

    started = time.perf_counter()
    if not config.inputs:
        raise UserError("No inputs: give image files, folders or glob patterns (xpsr sr INPUT... --out DIR).")
    inputs = collect_inputs(config.inputs)
    check_model_paths(config)
    check_output_folder(config.out, config.inputs, inputs)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    progress = RichBatchProgress(started)
    report = {"stage": STAGE, **super_resolve_folder(config, inputs, out, progress=progress, started=started)}
    mark_finished(out)
    print_report(report)
    check_failure_ratio(report, config.max_failure_ratio)
    return report
