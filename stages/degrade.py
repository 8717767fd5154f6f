"""Stage degrade: HR shards -> LR/HR pair shards with the Real-ESRGAN second-order degradation.

The library does the work (``xpsr_core.degrade.pair_shards``: one HR shard in, its pair shard and
index out); this stage checks the HR shards against the settings, runs the shards and reports.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from stages.common import run_stage
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.degrade.pair_shards import PairShardSettings, degrade_shard
from xpsr_core.dist import rank_device
from xpsr_core.errors import UserError
from xpsr_core.io.shards import require_finished

STAGE = "degrade"


class DegradeConfig(StageConfig, PairShardSettings):
    input_dir: Path = runtime_field(Path("data/shards/hr"), "Folder of HR shards from `xpsr shard`.")
    out: Path = runtime_field(Path("data/shards/pairs"), "Folder for the pair shards.")
    workers: int = runtime_field(1, "Worker processes (CPU); each takes whole shards.", ge=1, le=256)
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of samples fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


def _check_crop_size(config: DegradeConfig, in_dir: Path) -> None:
    """Refuse HR shards whose crops (as their folder's config records them) these settings cannot degrade."""
    from xpsr_core.io.outputs import read_record

    crop = read_record(in_dir).get("settings", {}).get("crop_size")
    minimum, scale = config.degradation.min_hr_size(), config.degradation.scale
    if crop is not None and (crop < minimum or crop % scale):
        raise UserError(
            f"The HR shards in {in_dir} hold {crop} px crops; these degradation settings need crops of at least "
            f"{minimum} px divisible by {scale}. Reshard with a larger --crop-size."
        )


def run(config: DegradeConfig) -> dict:
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.sharded import ShardedStage

    in_dir = Path(config.input_dir)
    sizes = require_finished(in_dir, "HR shard",
                             "Run `xpsr shard` to completion first, or point --input-dir at its output folder.")
    device = rank_device(config.device)  # fail before any work when no GPU is there
    _check_crop_size(config, in_dir)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    workers = 1 if device.startswith("cuda") else config.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    work = functools.partial(degrade_shard, config, in_dir, out, threads=threads)
    return run_stage(ShardedStage(name=STAGE, out=out, n_shards=len(sizes), work=work, workers=workers,
                                  max_failure_ratio=config.max_failure_ratio, unit="samples"))
