"""Stage testset: the paper's test sets as pair shards that `xpsr evaluate --input-dir` reads.

``synthetic``: random HR crops of a folder of images (DIV2K-val in the paper: 3K crops of 512 px),
degraded with the training degradation into LR at 1/scale. ``paired``: real LR/HR pairs (RealSR,
DRealSR) matched by name and centre-cropped (LR 128 px, HR 512 px in the paper). The protocol
and its sources are described in ``xpsr_core/testsets.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from stages.common import console, progress_bar
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.degrade.pair_shards import PairShardSettings
from xpsr_core.dist import rank_device
from xpsr_core.io.images import DEFAULT_MAX_PIXELS
from xpsr_core.testsets import MAX_SYNTHETIC_COUNT, PAIRED_STAGE, SYNTHETIC_STAGE

MAX_PIXELS_TEXT = "Decompression-bomb guard on the header's width x height."
WORKERS_TEXT = "Worker processes (CPU); each takes whole shards."


class SyntheticTestsetConfig(StageConfig, PairShardSettings):
    """The crops to take; the degradation, USM, seed, batch size and device are those of pair shards (the authors'
    make_valid.py also saves the USM-sharpened HR)."""

    hr_dirs: list[Path] = Field(
        min_length=1, description="Folders of HR images (the DIV2K validation images), read recursively.")
    out: Path = runtime_field(Path("data/testsets/div2k_val"), "Folder for the test-set pair shards.")
    count: int = Field(
        3000, ge=1, le=MAX_SYNTHETIC_COUNT, description="Crops in the set (3K from DIV2K-val in the paper).")
    hr_size: int = Field(512, ge=1, le=8192, description="HR crop size; the LR is hr_size / degradation.scale.")
    hflip: bool = Field(True, description="Random horizontal flip per crop (use_hflip in the authors' make_valid.py).")
    small_images: Literal["pad", "skip"] = Field(
        "pad", description="Reflect-pad images under hr_size (as basicsr's RealESRGANDataset does), or skip them.")
    min_size: int = Field(32, ge=2, description="Images whose shorter side is under this are too small even to pad.")
    samples_per_shard: int = Field(250, ge=1, le=100_000, description="Pairs per pair shard.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=MAX_PIXELS_TEXT)
    workers: int = runtime_field(1, WORKERS_TEXT, ge=1, le=256)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


class PairedTestsetConfig(StageConfig):
    lr_dir: Path = Field(description="Folder of LR images, read recursively.")
    hr_dir: Path = Field(
        description="Folder of HR images, matched to the LR images by relative path without extension.")
    out: Path = runtime_field(Path("data/testsets/paired"), "Folder for the test-set pair shards.")
    lr_size: int = Field(
        128, ge=1, le=8192, description="LR centre-crop size (128 in the paper); the HR crop is lr_size * scale.")
    scale: int = Field(4, ge=1, le=16, description="HR size / LR size of every pair.")
    lr_suffix: str = Field("", description="Removed from the end of LR file stems before matching (RealSR: _LR4).")
    hr_suffix: str = Field("", description="Removed from the end of HR file stems before matching (RealSR: _HR).")
    allow_unmatched: bool = Field(
        False, description="Skip files without a partner (counted) instead of refusing the set.")
    skip_bad_pairs: bool = Field(
        False, description="Skip pairs with wrong sizes, an LR under lr_size, or undecodable or ambiguous files "
        "(counted) instead of refusing the set.")
    samples_per_shard: int = Field(250, ge=1, le=100_000, description="Pairs per pair shard.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=MAX_PIXELS_TEXT)
    workers: int = runtime_field(1, WORKERS_TEXT, ge=1, le=256)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


def _with_progress(label: str, build: Callable[[Callable[[str, int, int], None]], dict]) -> dict:
    with progress_bar() as bar:
        task = bar.add_task(label, total=None, rate="")
        current = {"phase": None}

        def update(phase: str, done: int, total: int) -> None:
            if phase != current["phase"]:  # a new phase restarts the clock its rate and ETA come from
                current["phase"] = phase
                bar.reset(task, description=f"{label}: {phase}", total=total, completed=done)
            else:
                bar.update(task, completed=done, total=total)

        return build(update)


def _finish(stage: str, report: dict, lines: list[str]) -> dict:
    shards = (f"{report['shards']} shards ({report['shards_processed']} built, {report['shards_skipped']} already "
              "done)")
    summary = ", ".join([shards, *lines, f"{report['seconds']:.1f} s"])
    console.print(f"[bold green]{stage}[/] done: {summary}", soft_wrap=True)
    return report


def run_synthetic(config: SyntheticTestsetConfig) -> dict:
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.testsets import build_synthetic_testset

    device = rank_device(config.device)  # fail before any work when no GPU is there
    report = _with_progress(SYNTHETIC_STAGE, lambda progress: build_synthetic_testset(
        hr_dirs=config.hr_dirs, out=config.out, count=config.count, hr_size=config.hr_size, settings=config.degradation,
        seed=config.seed, usm_hr=config.usm_hr, hflip=config.hflip, small_images=config.small_images,
        min_size=config.min_size, samples_per_shard=config.samples_per_shard, max_pixels=config.max_pixels,
        batch_size=config.batch_size, device=device, workers=config.workers, progress=progress,
        prepare_out=lambda folder: prepare_output_dir(folder, SYNTHETIC_STAGE, config, overwrite=config.overwrite)))
    lines = [f"{report['samples']} pairs of {report['hr_size']}/{report['lr_size']} px",
             f"from {report['images_used']} of {report['images']} images ({report['images_padded']} padded)"]
    if report["failures"]:
        lines.append("images failed by status: " + ", ".join(f"{k}={v}" for k, v in report["failures"].items()))
    return _finish(SYNTHETIC_STAGE, report, lines)


def run_paired(config: PairedTestsetConfig) -> dict:
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.testsets import build_paired_testset

    report = _with_progress(PAIRED_STAGE, lambda progress: build_paired_testset(
        lr_dir=config.lr_dir, hr_dir=config.hr_dir, out=config.out, lr_size=config.lr_size, scale=config.scale,
        lr_suffix=config.lr_suffix, hr_suffix=config.hr_suffix, allow_unmatched=config.allow_unmatched,
        skip_bad_pairs=config.skip_bad_pairs, samples_per_shard=config.samples_per_shard, max_pixels=config.max_pixels,
        workers=config.workers, progress=progress,
        prepare_out=lambda folder: prepare_output_dir(folder, PAIRED_STAGE, config, overwrite=config.overwrite)))
    lines = [f"{report['pairs']} pairs of {report['hr_size']}/{report['lr_size']} px"]
    if report["skipped"]:
        lines.append("skipped by reason: " + ", ".join(f"{k}={v}" for k, v in report["skipped"].items()))
    return _finish(PAIRED_STAGE, report, lines)
