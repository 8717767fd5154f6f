"""LR/HR pair shards from HR shards: read one HR shard, degrade its samples, write the pair shard and its index.

    settings = PairShardSettings(seed=0)
    for shard in range(n_shards):
        degrade_shard(settings, hr_dir, pairs_dir, shard)

Pair shard ``s`` holds the samples of HR shard ``s`` under the same keys: the HR target
(USM-sharpened unless switched off), the LR image at 1/scale, and JSON with the HR sample's
metadata plus every sampled degradation parameter. The Parquet index beside each shard has a
row per sample with its status and the same parameters as columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..config import DeviceName, device_field, runtime_field
from ..dist import rank_device
from ..io.images import decode_png, encode_png
from ..io.shards import TarShardWriter, index_path, read_shard, tar_path, write_stats
from ..sharded import Status, shard_stats, write_index
from .settings import DegradationSettings

SEED_STREAM = "degrade"  # each sample's parameters come from a generator seeded by (seed, this, key)
INDEX_FIRST = ("key", "status", "error")  # the index's leading columns; the parameters follow, sorted


class PairShardSettings(BaseModel):
    """The degradation and how a shard runs it."""

    model_config = ConfigDict(extra="forbid")
    degradation: DegradationSettings = Field(default_factory=DegradationSettings, description="Every probability "
                                             "and range of the two degradation stages (--set degradation.NAME=...).")
    usm_hr: bool = Field(True, description="USM-sharpen the HR target, as the reference data scripts do.")
    seed: int = Field(0, description="Seed of each sample's degradation parameters, drawn per sample key.")
    batch_size: int = runtime_field(16, "Samples degraded together.", ge=1, le=4096)
    device: DeviceName = device_field()


def degrade_shard(settings: PairShardSettings, in_dir: Path, out_dir: Path, shard: int, *, threads: int = 1) -> dict:
    """Degrade every sample of HR shard ``shard``; write the pair shard, its index, then its stats (returned)."""
    import torch

    # this shard's share of the cores, for its duration only: a caller's later torch work keeps its own count (the
    # bytes of float outputs such as embeddings depend on it)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = rank_device(settings.device)
        rows, ready = _read_hr_samples(in_dir, shard, settings.degradation)
        with TarShardWriter(tar_path(out_dir, shard)) as writer:
            rows += _degrade_into(writer, ready, settings, device)
            samples = writer.count
    finally:
        torch.set_num_threads(previous_threads)
    rows.sort(key=lambda row: row["key"])
    columns = list(INDEX_FIRST) + sorted({c for row in rows for c in row} - set(INDEX_FIRST))
    write_index(index_path(out_dir, shard), [{c: row.get(c) for c in columns} for row in rows])
    stats = shard_stats(shard, (row["status"] for row in rows), samples)
    write_stats(out_dir, shard, stats)
    return stats


def _read_hr_samples(in_dir: Path, shard: int, degradation: DegradationSettings) -> tuple[list[dict], list[tuple]]:
    """(index rows of the samples that cannot be degraded, (key, metadata, HR pixels) of the others)."""
    scale = degradation.scale
    minimum = degradation.min_hr_size()
    rows: list[dict] = []
    ready: list[tuple[str, dict, np.ndarray]] = []
    for sample in read_shard(tar_path(in_dir, shard)):
        key = sample["__key__"]
        try:
            meta = json.loads(sample["json"])
            hr = decode_png(sample["png"])
        except Exception as error:  # a damaged sample is recorded, never fatal
            rows.append({"key": key, "status": Status.DECODE_ERROR, "error": f"cannot decode HR sample: {error}"})
            continue
        height, width = hr.shape[:2]
        if height % scale or width % scale or height != width or height < minimum:
            reason = f"HR must be square, divisible by the scale {scale} and at least {minimum} px for these settings"
            rows.append({"key": key, "status": Status.BAD_SIZE, "error": f"HR is {width}x{height}; {reason}"})
            continue
        ready.append((key, meta, hr))
    return rows, ready


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _degrade_into(writer: TarShardWriter, ready: list[tuple], settings: PairShardSettings, device: str) -> list[dict]:
    """Degrade the decoded samples batch by batch into ``writer``; returns their index rows."""
    from .batches import degrade_crops

    scale = settings.degradation.scale
    meta_by_key = {key: meta for key, meta, _ in ready}
    rows = []
    for result in degrade_crops(
        [(key, hr) for key, _, hr in ready],
        settings=settings.degradation,
        seed=settings.seed,
        stage=SEED_STREAM,
        usm_hr=settings.usm_hr,
        device=device,
        batch_size=settings.batch_size,
    ):
        meta = {**meta_by_key[result.key], "scale": scale, "usm_hr": settings.usm_hr, "degradation": result.params}
        writer.write(result.key, {"hr.png": encode_png(result.hr), "lr.png": encode_png(result.lr),
                                  "json": json.dumps(meta, sort_keys=True).encode()})
        rows.append({"key": result.key, "status": Status.OK, "error": "", **_flatten(result.params, "deg.")})
    return rows
