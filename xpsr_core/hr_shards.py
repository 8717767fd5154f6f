"""HR shards from image folders: the input list (reader), one shard's crops (worker), its tar and index (writer).

    files = list_inputs([ShardInput(path="photos", dataset="photos")])
    settings = HRShardSettings(crop_size=256)
    for shard in range(settings.shard_count(len(files))):
        build_shard(settings, out, files, shard)

Input files are listed per folder (sorted by relative path) and cut into fixed groups of
``images_per_shard`` files, so which shard a file lands in never depends on decoding results,
workers or earlier runs. A shard is written as its tar, then its Parquet index (a row per input
file, with its status), then the stats file that marks it done.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from . import crops as cropping
from .io import images
from .io.shards import TarShardWriter, index_path, sample_key, tar_path, write_stats
from .seeding import numpy_rng
from .sharded import Status, shard_stats, write_index

SEED_STREAM = "shard"  # the crops' random generators are seeded by (seed, this, dataset/file)

# source: the path below the input folder, readable (non-UTF-8 bytes as \\xNN); source_bytes: its exact bytes
INDEX_COLUMNS = ("file_index", "dataset", "source", "source_bytes", "status", "error", "width", "height", "mode",
                 "crops", "first_key")


class ShardInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    dataset: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Name recorded with every sample.")
    limit: Optional[int] = Field(None, ge=1,
                                 description="Use only the first N files in sorted order (e.g. FFHQ's first 5K).")


class HRShardSettings(BaseModel):
    """How input files become HR crops and how many files go into one shard."""

    model_config = ConfigDict(extra="forbid")
    crop_size: int = Field(512, ge=16, le=8192, description="HR crop size (512 in the paper).")
    crop_mode: Literal["random", "grid"] = Field("random", description="random crops, or a grid of crops covering "
                                                 "each image.")
    crops_per_image: int = Field(1, ge=1, le=1000, description="Random crops per image (random mode).")
    small_images: Literal["pad", "skip"] = Field("pad",
                                                 description="Reflect-pad images under the crop size, or skip them.")
    min_size: int = Field(32, ge=1, description="Images whose shorter side is under this are too small even to pad.")
    hflip: bool = Field(True, description="Random horizontal flip per crop.")
    images_per_shard: int = Field(256, ge=1, le=10_000, description="Input files per shard (a file's shard never "
                                  "depends on decoding results).")
    max_pixels: int = Field(images.DEFAULT_MAX_PIXELS, ge=1,
                            description="Decompression-bomb guard on the header's width x height.")
    seed: int = Field(0, description="Seed of the crops' positions and flips, drawn per dataset and file.")

    def shard_count(self, n_files: int) -> int:
        return math.ceil(n_files / self.images_per_shard)


class InputFile(NamedTuple):
    dataset: str
    root: Path  # the input folder
    relative: str  # posix path below it
    status: str | None  # None: a file to decode; else why the input walk cannot read it
    error: str


def list_inputs(sources: Sequence[ShardInput], skipped: Counter | None = None) -> list[InputFile]:
    """Every path with an image extension below the sources, in a fixed order.

    Paths the walk cannot read (broken link, link loop, not a file, unreadable folder) are listed
    with their status: they get index rows too. Paths that are not inputs (other extensions, links
    to folders) are counted by reason into ``skipped``.
    """
    files = []
    for source in sources:
        root = Path(source.path)
        entries, other = images.walk_folder(root, "input folder", f" (dataset '{source.dataset}')")
        entries = entries[: source.limit]
        if skipped is not None:
            skipped.update(other)
        files.extend(InputFile(source.dataset, root, e.relative, e.status, e.error) for e in entries)
    return files


def build_shard(settings: HRShardSettings, out_dir: Path, files: Sequence[InputFile], shard: int) -> dict:
    """Build shard ``shard`` from its slice of ``files`` (the whole input list) and mark it done; returns its stats."""
    start = shard * settings.images_per_shard
    rows = []
    with TarShardWriter(tar_path(out_dir, shard)) as writer:
        for offset, file in enumerate(files[start : start + settings.images_per_shard]):
            rows.append(_crop_file(settings, writer, shard, start + offset, file))
        samples = writer.count
    write_index(index_path(out_dir, shard), rows, _index_schema())
    stats = shard_stats(shard, (row["status"] for row in rows), samples)
    write_stats(out_dir, shard, stats)
    return stats


def _crop_file(settings: HRShardSettings, writer: TarShardWriter, shard: int, file_index: int, file: InputFile) -> dict:
    """Decode one input file and write its crops; returns its index row. No input may end the run."""
    shown = images.readable_name(file.relative)
    row = dict.fromkeys(INDEX_COLUMNS)
    row.update(file_index=file_index, dataset=file.dataset, source=shown, source_bytes=os.fsencode(file.relative),
               status=Status.OK, error="", crops=0)
    try:
        if file.status is not None:
            raise images.ImageRejected(file.status, file.error)
        decoded = images.load_image(file.root / file.relative, settings.max_pixels)
        height, width = decoded.pixels.shape[:2]
        row.update(width=width, height=height, mode=decoded.source_mode)
        _check_size(settings, width, height)
        keys = _write_crops(settings, writer, shard, file, decoded)
        row.update(crops=len(keys), first_key=keys[0] if keys else None)
    except images.ImageRejected as rejected:
        row.update(status=rejected.status, error=rejected.message)
    except Exception as unexpected:  # recorded like any other failure
        row.update(status=Status.DECODE_ERROR, error=f"cannot decode image: {type(unexpected).__name__}: {unexpected}",
                   crops=0, first_key=None)
    return row


def _check_size(settings: HRShardSettings, width: int, height: int) -> None:
    short = min(height, width)
    if short < settings.min_size or (short < settings.crop_size and settings.small_images == "skip"):
        limit = f"minimum {settings.min_size}" if short < settings.min_size else f"crop {settings.crop_size}"
        raise images.ImageRejected(Status.TOO_SMALL, f"{width}x{height} is under the {limit} px")


def _write_crops(settings: HRShardSettings, writer: TarShardWriter, shard: int, file: InputFile,
                 decoded: images.DecodedImage) -> list[str]:
    """Pad, plan and write the crops of one decoded image; returns their keys."""
    pixels = decoded.pixels
    height, width = pixels.shape[:2]
    padded, (pad_top, pad_left) = cropping.reflect_pad_to(pixels, settings.crop_size)
    rng = numpy_rng(settings.seed, SEED_STREAM, f"{file.dataset}/{file.relative}")
    plan = cropping.plan_crops(*padded.shape[:2], settings.crop_size, settings.crop_mode, settings.crops_per_image,
                               settings.hflip, rng)
    keys = []
    for crop in plan:
        key = sample_key(shard, writer.count)
        left, top, right, bottom = crop.box
        meta = {
            "key": key,
            "dataset": file.dataset,
            "source": images.readable_name(file.relative),
            "source_size": [width, height],
            "source_mode": decoded.source_mode,
            "exif_transposed": decoded.exif_transposed,
            # box in source pixel coordinates; it extends outside the image where padded
            "crop_box": [left - pad_left, top - pad_top, right - pad_left, bottom - pad_top],
            "padded": padded.shape[:2] != pixels.shape[:2],
            "hflip": crop.hflip,
        }
        png = images.encode_png(cropping.cut(padded, crop))
        writer.write(key, {"png": png, "json": json.dumps(meta, sort_keys=True).encode()})
        keys.append(key)
    return keys


def _index_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("file_index", pa.int64()), ("dataset", pa.string()), ("source", pa.string()),
            ("source_bytes", pa.binary()), ("status", pa.string()), ("error", pa.string()),
            ("width", pa.int64()), ("height", pa.int64()), ("mode", pa.string()),
            ("crops", pa.int64()), ("first_key", pa.string()),
        ]
    )
