"""Stage degrade: HR shards -> LR/HR pair shards with the Real-ESRGAN second-order degradation.

Pair shard ``s`` holds the samples of HR shard ``s`` under the same keys: the HR target
(USM-sharpened unless switched off), the LR image at 1/scale, and JSON with the HR sample's
metadata plus every sampled degradation parameter. The Parquet index beside each shard has a
row per sample with its status and the same parameters as columns.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from pydantic import Field, field_validator

from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.degrade.settings import DegradationSettings
from xpsr_core.errors import UserError

STAGE = "degrade"
OK, DECODE_ERROR, BAD_SIZE = "ok", "decode_error", "bad_size"


class DegradeConfig(StageConfig):
    input_dir: Path = runtime_field(Path("data/shards/hr"), "Folder of HR shards from `xpsr shard`.")
    out: Path = runtime_field(Path("data/shards/pairs"), "Folder for the pair shards.")
    degradation: DegradationSettings = Field(default_factory=DegradationSettings)
    usm_hr: bool = Field(True, description="USM-sharpen the HR target, as the reference data scripts do.")
    seed: int = 0
    batch_size: int = runtime_field(16, "Samples degraded together.", ge=1, le=4096)
    device: str = runtime_field("cpu", "cpu, cuda or cuda:N.")
    workers: int = runtime_field(1, "Worker processes (CPU); each takes whole shards.", ge=1, le=256)
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of samples fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if value != "cpu" and not (value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit())):
            raise ValueError("device must be cpu, cuda or cuda:N")
        return value


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def degrade_shard(config: DegradeConfig, in_dir: Path, out: Path, threads: int, shard: int) -> dict:
    """Degrade every sample of one HR shard; write the pair shard, its index, then its stats."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from stages.common import shard_stats
    from xpsr_core.degrade import degrade_batch, sample_degradation
    from xpsr_core.dist import rank_device
    from xpsr_core.io.atomic import atomic_path
    from xpsr_core.io.images import decode_png, encode_png
    from xpsr_core.io.shards import TarShardWriter, index_path, read_shard, tar_path, write_stats
    from xpsr_core.seeding import numpy_rng

    torch.set_num_threads(threads)
    device = rank_device(config.device)
    scale = config.degradation.scale
    minimum = config.degradation.min_hr_size()
    rows: list[dict] = []
    ready: list[tuple[str, dict, np.ndarray]] = []
    for sample in read_shard(tar_path(in_dir, shard)):
        key = sample["__key__"]
        try:
            meta = json.loads(sample["json"])
            hr = decode_png(sample["png"])
        except Exception as error:  # a damaged sample is recorded, never fatal
            rows.append({"key": key, "status": DECODE_ERROR, "error": f"cannot decode HR sample: {error}"})
            continue
        height, width = hr.shape[:2]
        if height % scale or width % scale or height != width or height < minimum:
            reason = f"HR must be square, divisible by the scale {scale} and at least {minimum} px for these settings"
            rows.append({"key": key, "status": BAD_SIZE, "error": f"HR is {width}x{height}; {reason}"})
            continue
        ready.append((key, meta, hr))

    with TarShardWriter(tar_path(out, shard)) as writer:
        # batches hold samples of equal size; a sample's result does not depend on its batch-mates
        for start in range(0, len(ready), config.batch_size):
            chunk = ready[start : start + config.batch_size]
            by_size: dict[tuple, list] = {}
            for item in chunk:
                by_size.setdefault(item[2].shape, []).append(item)
            for group in by_size.values():
                params = [sample_degradation(numpy_rng(config.seed, STAGE, key), config.degradation, hr.shape[0]) for key, _, hr in group]
                pixels = torch.from_numpy(np.stack([hr for _, _, hr in group])).permute(0, 3, 1, 2)
                hr_batch = pixels.to(device, dtype=torch.float32) / 255.0
                with torch.no_grad():
                    target, lr = degrade_batch(hr_batch, params, config.degradation, usm_hr=config.usm_hr)
                target8 = (target.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                lr8 = (lr.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                for (key, meta, _), p, hr_out, lr_out in zip(group, params, target8, lr8):
                    record = p.to_record()
                    meta = {**meta, "scale": scale, "usm_hr": config.usm_hr, "degradation": record}
                    writer.write(key, {"hr.png": encode_png(hr_out), "lr.png": encode_png(lr_out), "json": json.dumps(meta, sort_keys=True).encode()})
                    rows.append({"key": key, "status": OK, "error": "", **_flatten(record, "deg.")})
        samples = writer.count
    rows.sort(key=lambda row: row["key"])
    columns = ["key", "status", "error"] + sorted({c for row in rows for c in row} - {"key", "status", "error"})
    with atomic_path(index_path(out, shard)) as tmp:
        pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), tmp)
    stats = shard_stats(shard, (row["status"] for row in rows), samples)
    write_stats(out, shard, stats)
    return stats


def run(config: DegradeConfig) -> dict:
    from stages.common import run_sharded_stage
    from xpsr_core.dist import rank_device
    from xpsr_core.io.outputs import CONFIG_FILE, prepare_output_dir
    from xpsr_core.io.shards import SIZES_FILE, read_sizes

    in_dir = Path(config.input_dir)
    if not (in_dir / SIZES_FILE).is_file():
        raise UserError(
            f"{in_dir} is not a finished HR shard folder (no {SIZES_FILE}). Run `xpsr shard` to completion first, "
            "or point --in at its output folder."
        )
    rank_device(config.device)  # fail before any work when no GPU is there
    hr_config = in_dir / CONFIG_FILE
    crop = json.loads(hr_config.read_text()).get("settings", {}).get("crop_size") if hr_config.is_file() else None
    if crop is not None and (crop < config.degradation.min_hr_size() or crop % config.degradation.scale):
        raise UserError(
            f"The HR shards in {in_dir} hold {crop} px crops; these degradation settings need crops of at least "
            f"{config.degradation.min_hr_size()} px divisible by {config.degradation.scale}. Reshard with a larger --crop-size."
        )
    n_shards = max(read_sizes(in_dir), default=-1) + 1
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    workers = 1 if config.device.startswith("cuda") else config.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    work = functools.partial(degrade_shard, config, in_dir, out, threads)
    return run_sharded_stage(STAGE, out, n_shards, work, workers, "spawn", config.max_failure_ratio, "samples")
