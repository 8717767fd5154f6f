"""Stage shard: image folders -> HR crops in webdataset shards, one index row per input file.

Input files are listed per folder (sorted by relative path) and cut into fixed groups of
``images_per_shard`` files, so which shard a file lands in never depends on decoding results,
workers or earlier runs. Each shard is built by one worker: tar, then Parquet index, then the
stats file that marks it done.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.errors import UserError
from xpsr_core.io.images import DEFAULT_MAX_PIXELS

STAGE = "shard"


class ShardInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    dataset: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Name recorded with every sample.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N files in sorted order (e.g. FFHQ's first 5K).")


class ShardConfig(StageConfig):
    inputs: list[ShardInput] = Field(min_length=1, description="Image folders, each with a dataset name.")
    out: Path = runtime_field(Path("data/shards/hr"), "Folder for the HR shards.")
    crop_size: int = Field(512, ge=16, le=8192, description="HR crop size (512 in the paper).")
    crop_mode: Literal["random", "grid"] = "random"
    crops_per_image: int = Field(1, ge=1, le=1000, description="Random crops per image (random mode).")
    small_images: Literal["pad", "skip"] = Field("pad", description="Reflect-pad images under the crop size, or skip them.")
    min_size: int = Field(32, ge=1, description="Images whose shorter side is under this are too small even to pad.")
    hflip: bool = Field(True, description="Random horizontal flip per crop.")
    images_per_shard: int = Field(256, ge=1, le=10_000)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Decompression-bomb guard on the header's width x height.")
    seed: int = 0
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of inputs fail.", ge=0, le=1)
    workers: int = runtime_field(1, "Worker processes.", ge=1, le=256)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")

    @model_validator(mode="after")
    def _unique_datasets(self) -> "ShardConfig":
        names = [i.dataset for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return self


def parse_input_spec(spec: str) -> dict:
    """'NAME=PATH' or 'PATH' (dataset named after the folder)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, re.sub(r"[^A-Za-z0-9_-]", "_", Path(spec).resolve().name) or "images"
    return {"path": path, "dataset": name}


def list_inputs(config: ShardConfig, skipped: Counter | None = None) -> list[tuple]:
    """(dataset, root, relative path, status, error) for every path with an image extension, in a fixed order.

    ``status`` is None for files to decode, else why the path cannot be read (broken link, link loop,
    not a file, unreadable folder): those get index rows too. Paths that are not inputs (other
    extensions, links to folders) are counted by reason into ``skipped``.
    """
    from xpsr_core.io.images import walk_inputs

    items = []
    for source in config.inputs:
        root = Path(source.path)
        if not root.is_dir():
            raise UserError(f"Input folder {root} (dataset '{source.dataset}') does not exist or is not a folder.")
        try:
            entries, other = walk_inputs(root)
        except OSError as error:
            raise UserError(f"Cannot list the input folder {root} (dataset '{source.dataset}'): {error.strerror or error}.") from None
        entries = entries[: source.limit]
        if not entries:
            raise UserError(f"Input folder {root} (dataset '{source.dataset}') holds no images (jpg, png, webp, tiff, bmp)"
                            + (f"; skipped: {', '.join(f'{k}={v}' for k, v in sorted(other.items()))}" if other else "") + ".")
        if skipped is not None:
            skipped.update(other)
        items.extend((source.dataset, root, e.relative, e.status, e.error) for e in entries)
    return items


# source: the path below the input folder, readable (non-UTF-8 bytes as \\xNN); source_bytes: its exact bytes
INDEX_COLUMNS = ("file_index", "dataset", "source", "source_bytes", "status", "error", "width", "height", "mode", "crops", "first_key")


def build_shard(config: ShardConfig, out: Path, items: list[tuple[str, Path, str]], shard: int) -> dict:
    """Build one shard from its slice of the input list and mark it done; returns its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.common import shard_stats
    from xpsr_core import crops as cropping
    from xpsr_core.io import images
    from xpsr_core.io.atomic import atomic_path
    from xpsr_core.io.shards import TarShardWriter, index_path, sample_key, tar_path, write_stats
    from xpsr_core.seeding import numpy_rng

    start = shard * config.images_per_shard
    batch = items[start : start + config.images_per_shard]
    rows = []
    with TarShardWriter(tar_path(out, shard)) as writer:
        for offset, (dataset, root, relative, status, error) in enumerate(batch):
            row = dict.fromkeys(INDEX_COLUMNS)
            shown = images.readable_name(relative)
            row.update(file_index=start + offset, dataset=dataset, source=shown, source_bytes=os.fsencode(relative),
                       status=images.OK, error="", crops=0)
            try:
                if status is not None:  # the walk found it unusable (broken link, loop, not a file, unreadable folder)
                    raise images.ImageRejected(status, error)
                decoded = images.load_image(root / relative, config.max_pixels)
                pixels = decoded.pixels
                height, width = pixels.shape[:2]
                row.update(width=width, height=height, mode=decoded.source_mode)
                short = min(height, width)
                if short < config.min_size or (short < config.crop_size and config.small_images == "skip"):
                    raise images.ImageRejected(
                        images.TOO_SMALL, f"{width}x{height} is under the {'minimum ' + str(config.min_size) if short < config.min_size else 'crop ' + str(config.crop_size)} px"
                    )
                padded, (pad_top, pad_left) = cropping.reflect_pad_to(pixels, config.crop_size)
                rng = numpy_rng(config.seed, STAGE, f"{dataset}/{relative}")
                plan = cropping.plan_crops(*padded.shape[:2], config.crop_size, config.crop_mode, config.crops_per_image, config.hflip, rng)
                for crop in plan:
                    key = sample_key(shard, writer.count)
                    left, top, right, bottom = crop.box
                    meta = {
                        "key": key,
                        "dataset": dataset,
                        "source": shown,
                        "source_size": [width, height],
                        "source_mode": decoded.source_mode,
                        "exif_transposed": decoded.exif_transposed,
                        # box in source pixel coordinates; it extends outside the image where padded
                        "crop_box": [left - pad_left, top - pad_top, right - pad_left, bottom - pad_top],
                        "padded": padded.shape[:2] != pixels.shape[:2],
                        "hflip": crop.hflip,
                    }
                    writer.write(key, {"png": images.encode_png(cropping.cut(padded, crop)), "json": json.dumps(meta, sort_keys=True).encode()})
                    row["first_key"] = row["first_key"] or key
                    row["crops"] += 1
            except images.ImageRejected as rejected:
                row.update(status=rejected.status, error=rejected.message)
            except Exception as unexpected:  # no input may end the run: it is recorded like any other failure
                row.update(status=images.DECODE_ERROR, error=f"cannot decode image: {type(unexpected).__name__}: {unexpected}",
                           crops=0, first_key=None)
            rows.append(row)
        samples = writer.count
    table = pa.Table.from_pylist(rows, schema=_index_schema())
    with atomic_path(index_path(out, shard)) as tmp:
        pq.write_table(table, tmp)
    stats = shard_stats(shard, (row["status"] for row in rows), samples)
    write_stats(out, shard, stats)
    return stats


def _index_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("file_index", pa.int64()), ("dataset", pa.string()), ("source", pa.string()), ("source_bytes", pa.binary()),
            ("status", pa.string()),
            ("error", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("mode", pa.string()),
            ("crops", pa.int64()), ("first_key", pa.string()),
        ]
    )


def run(config: ShardConfig) -> dict:
    from stages.common import run_sharded_stage
    from xpsr_core.io.outputs import prepare_output_dir

    skipped: Counter = Counter()
    items = list_inputs(config, skipped)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    n_shards = math.ceil(len(items) / config.images_per_shard)
    work = functools.partial(build_shard, config, out, items)

    def add_skipped(report: dict, _stats: list[dict]) -> None:
        # paths below the inputs that are not input files (other extensions, links to folders), by reason
        report["skipped_paths"] = dict(sorted(skipped.items()))

    # fork: shard workers only need Pillow and numpy, and start far faster than spawned ones
    return run_sharded_stage(STAGE, out, n_shards, work, config.workers, "fork", config.max_failure_ratio, "input files",
                             enrich=add_skipped)
