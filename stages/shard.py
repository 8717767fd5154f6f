"""Stage shard: image folders -> HR crops in webdataset shards, one index row per input file.

The library does the work (``xpsr_core.hr_shards``: the input list, one shard's crops, its tar and
index); this stage resolves the config and the output folder, runs the shards and reports.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from stages.common import run_stage
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.hr_shards import HRShardSettings, ShardInput, build_shard, list_inputs

STAGE = "shard"
# the report's stage figures, as the summary prints them
NOTES = {"skipped_paths": "paths skipped (not inputs): {}"}


class ShardConfig(StageConfig, HRShardSettings):
    inputs: list[ShardInput] = Field(min_length=1, description="Image folders as PATH or NAME=PATH (NAME: the dataset "
                                     "name recorded with every sample; default: the folder name).")
    out: Path = runtime_field(Path("data/shards/hr"), "Folder for the HR shards.")
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of inputs fail.", ge=0, le=1)
    workers: int = runtime_field(1, "Worker processes.", ge=1, le=256)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_input_texts(cls, value):
        """An input may be given as its text (``NAME=PATH`` or ``PATH``), as on the command line."""
        if isinstance(value, (list, tuple)):
            return [parse_input_spec(item) if isinstance(item, str) else item for item in value]
        return value

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


def run(config: ShardConfig) -> dict:
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.sharded import ShardedStage

    skipped: Counter = Counter()
    files = list_inputs(config.inputs, skipped)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)

    def skipped_paths(_report: dict, _stats: list[dict]) -> dict:
        # paths below the inputs that are not input files (other extensions, links to folders), by reason
        return {"skipped_paths": dict(sorted(skipped.items()))}

    # fork: shard workers only need Pillow and numpy, and start far faster than spawned ones
    stage = ShardedStage(name=STAGE, out=out, n_shards=config.shard_count(len(files)),
                         work=functools.partial(build_shard, config, out, files), workers=config.workers,
                         start_method="fork", max_failure_ratio=config.max_failure_ratio, unit="input files",
                         totals=skipped_paths)
    return run_stage(stage, NOTES)
