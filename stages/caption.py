"""Stage caption: content and quality captions of every LR image into Parquet manifests.

Two inputs: the pair shards (default; one manifest ``{shard:05d}.parquet`` per shard, with a
stats file as its done marker, resumable and rank-sharded) or any folder of images
(``xpsr caption ./photos --out captions.parquet``; one manifest file). The library does the work
(``xpsr_core.caption.manifests``, where the quality_model and caption_hr options are described);
this stage resolves the inputs and the output, runs the shards and reports.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Optional

from stages.common import print_summary, run_stage
from xpsr_core.caption.manifests import caption_folder, caption_shard, caption_totals, check_servers, needs_retry
from xpsr_core.caption.settings import CaptionSettings
from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.dist import rank_device
from xpsr_core.errors import UserError
from xpsr_core.io.shards import require_finished

STAGE = "caption"
# the report's stage figures, as the summary prints them
NOTES = {"captions_per_s": "{:.2f} captions/s", "clip_token_limit": "CLIP token limit (max_caption_tokens): {}",
         "truncated_share": "share of captions over the CLIP token limit: {}",
         "clip_tokens_p50_p90_p99": "CLIP tokens per caption (BOS/EOS included), p50/p90/p99: {}",
         "caption_tokens_kept": "share of the captions' tokens that reach the model: {}"}


class CaptionConfig(StageConfig, CaptionSettings):
    renamed_fields = {"model": "captioner"}

    input_dir: Path = runtime_field(Path("data/shards/pairs"), "Pair shards from `xpsr degrade`.")
    images: Optional[Path] = runtime_field(None, "A folder of images to caption instead of pair shards.")
    out: Path = runtime_field(Path("manifests/captions"), "Manifest folder (shards) or .parquet file (folder input).")
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of images fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


def run_on_folder(config: CaptionConfig) -> dict:
    """Caption every image below ``config.images`` into the one Parquet file ``config.out``."""
    from xpsr_core.io.outputs import ensure_writable_dir
    from xpsr_core.sharded import check_failure_ratio, summarize

    started = time.perf_counter()
    out = Path(config.out)
    if out.suffix != ".parquet":
        raise UserError(f"With an image folder as input, --out must name a .parquet file (got {out}).")
    ensure_writable_dir(out.parent)
    if out.exists() and not config.overwrite:
        raise UserError(f"{out} exists. Pass --overwrite to replace it.")
    check_servers(config)
    stats = caption_folder(config, Path(config.images), out)
    report = summarize(STAGE, [stats], [stats], time.perf_counter() - started)
    report.update(caption_totals(report, [stats]))
    print_summary(report, NOTES)
    check_failure_ratio(report, config.max_failure_ratio, "images")
    return report


def run(config: CaptionConfig) -> dict:
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.sharded import ShardedStage

    if config.images is not None:
        return run_on_folder(config)
    in_dir = Path(config.input_dir)
    sizes = require_finished(in_dir, "pair-shard", "Run `xpsr degrade` first, or caption a folder of images with "
                             "`xpsr caption FOLDER --out captions.parquet`.")
    rank_device(config.device)  # fail before any work when no GPU is there
    check_servers(config)  # engine=openai: the server is up and serves the model, before any shard
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    # one process per rank: the model is loaded once and reused for every shard of the rank
    stage = ShardedStage(name=STAGE, out=out, n_shards=len(sizes),
                         work=functools.partial(caption_shard, config, in_dir, out),
                         max_failure_ratio=config.max_failure_ratio, unit="images", totals=caption_totals,
                         redo=needs_retry)
    return run_stage(stage, NOTES)
