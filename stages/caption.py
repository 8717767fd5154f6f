"""Stage caption: content and quality captions of every LR image into Parquet manifests.

Two inputs: the pair shards (default; one manifest ``{shard:05d}.parquet`` per shard, with a
stats file as its done marker, resumable and rank-sharded) or any folder of images
(``xpsr caption ./photos --out captions.parquet``; one manifest file).
"""

from __future__ import annotations

import functools
import io
import json
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.errors import UserError

STAGE = "caption"
OK, DECODE_ERROR, EMPTY_GENERATION = "ok", "decode_error", "empty_generation"
CAPTION_KINDS = ("content", "quality")


class CaptionConfig(StageConfig):
    input_dir: Path = runtime_field(Path("data/shards/pairs"), "Pair shards from `xpsr degrade`.")
    images: Optional[Path] = runtime_field(None, "A folder of images to caption instead of pair shards.")
    out: Path = runtime_field(Path("manifests/captions"), "Manifest folder (shards) or .parquet file (folder input).")
    model: str = Field("models/tiny/captioner", description="Captioner folder or hub id (llava-hf layout or any image-text-to-text model with a chat template).")
    base_model: str = Field("models/tiny/sd15", description="Base SD folder whose CLIP tokenizer counts caption tokens.")
    content_instruction: str = Field("Please provide a descriptive summary of the content of this image")
    quality_instruction: str = Field(
        "Please describe the quality of this image and evaluate it based on factors such as clarity, color, noise, and lighting"
    )
    max_new_tokens: int = Field(128, ge=1, le=4096)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(1, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, le=1024, description="Images per generate() call (two prompts each).")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    device: str = runtime_field("cpu", "cpu, cuda or cuda:N (under torchrun each rank uses its LOCAL_RANK GPU).")
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of images fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")

    def generation(self):
        from xpsr_core.caption import GenerationSettings

        return GenerationSettings(self.max_new_tokens, self.do_sample, self.temperature, self.top_p, self.num_beams, self.repetition_penalty)


def manifest_schema():
    import pyarrow as pa

    columns = [("key", pa.string()), ("shard", pa.int64()), ("dataset", pa.string()), ("source", pa.string())]
    for kind in CAPTION_KINDS:
        columns += [(f"{kind}_caption", pa.string()), (f"{kind}_clip_tokens", pa.int64()), (f"{kind}_truncated", pa.bool_())]
    columns += [
        ("content_instruction", pa.string()), ("quality_instruction", pa.string()), ("captioner", pa.string()),
        ("captioner_revision", pa.string()), ("generation", pa.string()), ("clip_token_limit", pa.int64()),
        ("status", pa.string()), ("error", pa.string()),
    ]
    return pa.schema(columns)


@functools.lru_cache(maxsize=1)
def _load(model: str, base_model: str, dtype: str, device: str, generation):
    """One captioner and token counter per process, reused across its shards."""
    from xpsr_core.caption import Captioner, clip_token_counter

    count, limit = clip_token_counter(base_model)
    return Captioner(model, dtype=dtype, device=device, settings=generation), count, limit


def caption_items(config: CaptionConfig, items: list[dict]) -> list[dict]:
    """Caption decoded items ({"key", "shard", "dataset", "source", "image" or "status"/"error"}) into manifest rows."""
    import torch

    from xpsr_core.dist import rank_device
    from xpsr_core.seeding import derive_seed

    captioner, count, limit = _load(config.model, config.base_model, config.dtype, rank_device(config.device), config.generation())
    instructions = [config.content_instruction, config.quality_instruction]
    common = {
        "content_instruction": config.content_instruction, "quality_instruction": config.quality_instruction,
        "captioner": config.model, "captioner_revision": captioner.revision,
        "generation": config.generation().to_json(), "clip_token_limit": limit,
    }
    rows = {}
    ready = [item for item in items if "image" in item]
    for item in items:
        if "image" not in item:
            rows[item["key"]] = {**_empty_row(item), **common, "status": item["status"], "error": item["error"]}
    for start in range(0, len(ready), config.batch_size):
        batch = ready[start : start + config.batch_size]
        if config.do_sample:  # sampling draws from a generator seeded by the batch's first key
            torch.manual_seed(derive_seed(config.seed, STAGE, batch[0]["key"]))
        captions = captioner.caption([item["image"] for item in batch], instructions)
        for item, texts in zip(batch, captions):
            row = {**_empty_row(item), **common, "status": OK, "error": ""}
            for kind, text in zip(CAPTION_KINDS, texts):
                tokens = count(text)
                row.update({f"{kind}_caption": text, f"{kind}_clip_tokens": tokens, f"{kind}_truncated": tokens > limit})
            empty = [kind for kind, text in zip(CAPTION_KINDS, texts) if not text]
            if empty:
                row.update(status=EMPTY_GENERATION, error=f"the model generated no text for the {' and '.join(empty)} instruction")
            rows[item["key"]] = row
    return [rows[item["key"]] for item in items]


def _empty_row(item: dict) -> dict:
    row = {"key": item["key"], "shard": item.get("shard"), "dataset": item.get("dataset"), "source": item.get("source")}
    for kind in CAPTION_KINDS:
        row.update({f"{kind}_caption": None, f"{kind}_clip_tokens": None, f"{kind}_truncated": None})
    return row


def _decode_lr(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def write_manifest(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xpsr_core.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), tmp)


def manifest_stats(shard: int, rows: list[dict]) -> dict:
    from stages.common import shard_stats

    truncated = {kind: sum(bool(r[f"{kind}_truncated"]) for r in rows) for kind in CAPTION_KINDS}
    return shard_stats(shard, (r["status"] for r in rows), sum(r["status"] == OK for r in rows), truncated=truncated)


def caption_shard(config: CaptionConfig, out: Path, shard: int) -> dict:
    """Caption one pair shard's LR images; write its manifest, then its stats (the done marker)."""
    from xpsr_core.io.shards import read_shard, tar_path, write_stats

    items = []
    for sample in read_shard(tar_path(config.input_dir, shard)):
        item = {"key": sample["__key__"], "shard": shard}
        try:
            meta = json.loads(sample.get("json", b"{}"))
            item.update(dataset=meta.get("dataset"), source=meta.get("source"))
            item["image"] = _decode_lr(sample["lr.png"])
        except Exception as error:  # recorded as a row, never fatal
            item.update(status=DECODE_ERROR, error=f"cannot decode the LR image: {error}")
        items.append(item)
    rows = caption_items(config, items)
    write_manifest(Path(out) / f"{shard:05d}.parquet", rows)
    stats = manifest_stats(shard, rows)
    write_stats(out, shard, stats)
    return stats


def caption_folder(config: CaptionConfig) -> dict:
    """Caption every image below ``config.images`` into one Parquet file."""
    from stages.common import check_failure_ratio, print_summary, summarize
    from xpsr_core.io import images as image_io
    from xpsr_core.io.outputs import ensure_writable_dir

    started = time.perf_counter()
    root = Path(config.images)
    if not root.is_dir():
        raise UserError(f"Image folder {root} does not exist or is not a folder.")
    files = image_io.find_images(root)
    if not files:
        raise UserError(f"Image folder {root} holds no images (jpg, png, webp, tiff, bmp).")
    out = Path(config.out)
    if out.suffix != ".parquet":
        raise UserError(f"With an image folder as input, --out must name a .parquet file (got {out}).")
    ensure_writable_dir(out.parent)
    if out.exists() and not config.overwrite:
        raise UserError(f"{out} exists. Pass --overwrite to replace it.")
    from PIL import Image

    rows: list[dict] = []
    for start in range(0, len(files), config.batch_size):  # decode lazily: one batch in memory at a time
        items = []
        for index, path in enumerate(files[start : start + config.batch_size], start):
            item = {"key": f"{index:010d}", "shard": None, "dataset": root.name, "source": path.relative_to(root).as_posix()}
            try:
                item["image"] = Image.fromarray(image_io.load_image(path, image_io.DEFAULT_MAX_PIXELS).pixels)
            except image_io.ImageRejected as rejected:
                item.update(status=rejected.status, error=rejected.message)
            items.append(item)
        rows.extend(caption_items(config, items))
    write_manifest(out, rows)
    stats = manifest_stats(0, rows)
    report = summarize(STAGE, [stats], [stats], time.perf_counter() - started)
    add_caption_totals(report, [stats])
    print_summary(report)
    check_failure_ratio(report, config.max_failure_ratio, "images")
    return report


def add_caption_totals(report: dict, all_stats: list[dict]) -> None:
    """Truncation counts and shares, and captions/s (two captions per image)."""
    images = sum(s["inputs"] for s in all_stats)
    report["truncated"] = {kind: sum(s["truncated"][kind] for s in all_stats) for kind in CAPTION_KINDS}
    report["truncated_share"] = {kind: round(n / max(images, 1), 4) for kind, n in report["truncated"].items()}
    report["captions_per_s"] = round(2 * report["samples_per_s"], 3) if report.get("samples_per_s") else None


def run(config: CaptionConfig) -> dict:
    from stages.common import run_sharded_stage
    from xpsr_core.dist import rank_device
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.io.shards import SIZES_FILE, read_sizes

    if config.images is not None:
        return caption_folder(config)
    in_dir = Path(config.input_dir)
    if not (in_dir / SIZES_FILE).is_file():
        raise UserError(
            f"{in_dir} is not a finished pair-shard folder (no {SIZES_FILE}). Run `xpsr degrade` first, "
            "or caption a folder of images with `xpsr caption FOLDER --out captions.parquet`."
        )
    n_shards = max(read_sizes(in_dir), default=-1) + 1
    rank_device(config.device)  # fail before any work when no GPU is there
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    work = functools.partial(caption_shard, config, out)
    # one process per rank: the model is loaded once and reused for every shard of the rank
    return run_sharded_stage(STAGE, out, n_shards, work, 1, "spawn", config.max_failure_ratio, "images", enrich=add_caption_totals)
