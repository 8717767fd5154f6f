"""Stage embed: pair shards + caption manifests -> training shards with pre-encoded conditions.

The library does the work (``xpsr_core.training_shards``: the join by key, one shard's encoding,
the fixed prompts' embeddings); this stage checks the inputs, runs the shards and reports.
"""

from __future__ import annotations

import functools
from pathlib import Path

from stages.common import run_stage
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.io.shards import require_finished
from xpsr_core.training_shards import (
    EmbedSettings,
    embed_shard,
    embedding_totals,
    plan_join,
    write_prompt_embeddings,
)

STAGE = "embed"
NOTES = {"caption_memory": "caption embeddings: {}"}


class EmbedConfig(StageConfig, EmbedSettings):
    renamed_fields = {"pairs_dir": "input_dir"}

    input_dir: Path = runtime_field(Path("data/shards/pairs"), "Pair shards from `xpsr degrade`.")
    captions_dir: Path = runtime_field(Path("manifests/captions"), "Caption manifests from `xpsr caption`.")
    out: Path = runtime_field(Path("data/shards/train"), "Folder for the training shards.")
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


def run(config: EmbedConfig) -> dict:
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.sharded import ShardedStage

    sizes = require_finished(config.input_dir, "pair-shard", "Run `xpsr degrade` to completion first.")
    require_finished(config.captions_dir, "caption-manifest", "Run `xpsr caption` to completion first.")
    plan = plan_join(config, config.input_dir, config.captions_dir, len(sizes))
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    if not (out / "empty.npy").exists():
        write_prompt_embeddings(config, out)
    work = functools.partial(embed_shard, config, config.input_dir, config.captions_dir, out, plan=plan)
    stage = ShardedStage(name=STAGE, out=out, n_shards=len(sizes), work=work, unit="samples", totals=embedding_totals)
    return run_stage(stage, NOTES)
