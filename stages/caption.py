"""Stage caption: content and quality captions of every LR image into Parquet manifests.

Two inputs: the pair shards (default; one manifest ``{shard:05d}.parquet`` per shard, with a
stats file as its done marker, resumable and rank-sharded) or any folder of images
(``xpsr caption ./photos --out captions.parquet``; one manifest file).

Two options follow the authors' training data (both off by default, and then the manifest has
exactly its usual columns): ``quality_model`` writes the quality captions with a second model
(a Q-Instruct fine-tune in their recipe; the manifest then names both models and revisions in
``content_captioner*`` and ``quality_captioner*``, ``captioner*`` staying the content model's),
and ``caption_hr`` also captions each pair's HR image with the quality instruction
(``hr_quality_caption`` and its token count and truncation flag), which training uses when the
HR image stands in for the condition.
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
HR_KIND = "hr_quality"  # the quality caption of the HR image (caption_hr)
CAPTIONER_COLUMNS = ("content_captioner", "content_captioner_revision", "quality_captioner", "quality_captioner_revision")


class CaptionConfig(StageConfig):
    input_dir: Path = runtime_field(Path("data/shards/pairs"), "Pair shards from `xpsr degrade`.")
    images: Optional[Path] = runtime_field(None, "A folder of images to caption instead of pair shards.")
    out: Path = runtime_field(Path("manifests/captions"), "Manifest folder (shards) or .parquet file (folder input).")
    model: str = Field("models/tiny/captioner", description="Captioner folder or hub id (llava-hf layout or any image-text-to-text model with a chat template).")
    quality_model: Optional[str] = Field(
        None, description="A second captioner for the quality captions (e.g. a Q-Instruct LLaVA-1.5 fine-tune, as the authors "
        "train with); null: `model` writes both.")
    quality_trust_remote_code: bool = runtime_field(
        False, "Let the quality model's folder run its own Python code (passed to its from_pretrained only).")
    caption_hr: bool = Field(
        False, description="Also caption each pair's HR image with the quality instruction (hr_quality_* columns) for training "
        "with the HR image as the condition (train.hr_condition_probability). Pair shards only.")
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

    @property
    def separate_quality(self) -> bool:
        return self.quality_model is not None

    def kinds(self, hr: bool) -> tuple[str, ...]:
        """The captions of a row: content and quality of the LR image, plus the HR image's quality with ``hr``."""
        return CAPTION_KINDS + ((HR_KIND,) if hr else ())


def manifest_schema(separate_quality: bool = False, hr: bool = False):
    """The manifest's columns; ``separate_quality``/``hr`` add those of the quality_model/caption_hr options."""
    import pyarrow as pa

    columns = [("key", pa.string()), ("shard", pa.int64()), ("dataset", pa.string()), ("source", pa.string())]
    for kind in CAPTION_KINDS + ((HR_KIND,) if hr else ()):
        columns += [(f"{kind}_caption", pa.string()), (f"{kind}_clip_tokens", pa.int64()), (f"{kind}_truncated", pa.bool_())]
    columns += [("content_instruction", pa.string()), ("quality_instruction", pa.string()), ("captioner", pa.string()),
                ("captioner_revision", pa.string())]
    if separate_quality:
        columns += [(name, pa.string()) for name in CAPTIONER_COLUMNS]
    columns += [("generation", pa.string()), ("clip_token_limit", pa.int64()), ("status", pa.string()), ("error", pa.string())]
    return pa.schema(columns)


@functools.lru_cache(maxsize=2)
def _load_captioner(model: str, dtype: str, device: str, generation, trust_remote_code: bool = False):
    """Captioners (the content one and the quality one, when separate) per process, reused across its shards."""
    from xpsr_core.caption import Captioner

    return Captioner(model, dtype=dtype, device=device, settings=generation, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=1)
def _token_counter(base_model: str):
    from xpsr_core.caption import clip_token_counter

    return clip_token_counter(base_model)


def caption_items(config: CaptionConfig, items: list[dict], hr: bool = False) -> list[dict]:
    """Caption decoded items ({"key", "shard", "dataset", "source", "image" [and "hr_image" with ``hr``] or
    "status"/"error"}) into manifest rows."""

    from xpsr_core.dist import rank_device
    from xpsr_core.seeding import derive_seed

    device = rank_device(config.device)
    count, limit = _token_counter(config.base_model)
    captioner = _load_captioner(config.model, config.dtype, device, config.generation(), False)  # no remote code for it
    quality_captioner = captioner
    if config.separate_quality:
        quality_captioner = _load_captioner(config.quality_model, config.dtype, device, config.generation(), config.quality_trust_remote_code)
    kinds = config.kinds(hr)
    common = {
        "content_instruction": config.content_instruction, "quality_instruction": config.quality_instruction,
        "captioner": config.model, "captioner_revision": captioner.revision,
        "generation": config.generation().to_json(), "clip_token_limit": limit,
    }
    if config.separate_quality:
        common.update(content_captioner=config.model, content_captioner_revision=captioner.revision,
                      quality_captioner=config.quality_model, quality_captioner_revision=quality_captioner.revision)
    rows = {}
    ready = [item for item in items if "image" in item]
    for item in items:
        if "image" not in item:
            rows[item["key"]] = {**_empty_row(item, kinds), **common, "status": item["status"], "error": item["error"]}
    for start in range(0, len(ready), config.batch_size):
        batch = ready[start : start + config.batch_size]
        # (index in batch, kind, image, instruction); all prompts of an image share the batch
        wanted = []
        for i, item in enumerate(batch):
            wanted += [(i, "content", item["image"], config.content_instruction), (i, "quality", item["image"], config.quality_instruction)]
            if hr:
                wanted.append((i, HR_KIND, item["hr_image"], config.quality_instruction))
        if config.separate_quality:  # one generate() per model; the quality model takes the LR and HR prompts
            jobs = [(captioner, STAGE, [w for w in wanted if w[1] == "content"]),
                    (quality_captioner, f"{STAGE}-quality", [w for w in wanted if w[1] != "content"])]
        else:
            jobs = [(captioner, STAGE, wanted)]
        texts: dict[tuple[int, str], str] = {}
        for model, stream, job in jobs:
            # sampling (do_sample) draws each caption from its own generator, seeded by (seed, stage, key, kind)
            seeds = [derive_seed(config.seed, stream, f"{batch[i]['key']}/{kind}") for i, kind, _, _ in job]
            for (i, kind, _, _), text in zip(job, model.caption_pairs([(image, instruction) for _, _, image, instruction in job], seeds)):
                texts[i, kind] = text
        for i, item in enumerate(batch):
            row = {**_empty_row(item, kinds), **common, "status": OK, "error": ""}
            for kind in kinds:
                text = texts[i, kind]
                tokens = count(text)
                row.update({f"{kind}_caption": text, f"{kind}_clip_tokens": tokens, f"{kind}_truncated": tokens > limit})
            empty = [kind.replace("_", " ") for kind in kinds if not texts[i, kind]]
            if empty:
                row.update(status=EMPTY_GENERATION, error=f"the model generated no text for the {' and '.join(empty)} instruction")
            rows[item["key"]] = row
    return [rows[item["key"]] for item in items]


def _empty_row(item: dict, kinds: tuple[str, ...] = CAPTION_KINDS) -> dict:
    row = {"key": item["key"], "shard": item.get("shard"), "dataset": item.get("dataset"), "source": item.get("source")}
    for kind in kinds:
        row.update({f"{kind}_caption": None, f"{kind}_clip_tokens": None, f"{kind}_truncated": None})
    return row


def _decode_rgb(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def write_manifest(path: Path, rows: list[dict], separate_quality: bool = False, hr: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xpsr_core.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema(separate_quality, hr)), tmp)


def manifest_stats(shard: int, rows: list[dict], kinds: tuple[str, ...] = CAPTION_KINDS) -> dict:
    from stages.common import shard_stats

    truncated = {kind: sum(bool(r[f"{kind}_truncated"]) for r in rows) for kind in kinds}
    return shard_stats(shard, (r["status"] for r in rows), sum(r["status"] == OK for r in rows), truncated=truncated)


def caption_shard(config: CaptionConfig, out: Path, shard: int) -> dict:
    """Caption one pair shard's LR images (and HR images with caption_hr); write its manifest, then its stats (the done marker)."""
    from xpsr_core.io.shards import read_shard, tar_path, write_stats

    hr = config.caption_hr
    items = []
    for sample in read_shard(tar_path(config.input_dir, shard)):
        item = {"key": sample["__key__"], "shard": shard}
        which = "LR"
        try:
            meta = json.loads(sample.get("json", b"{}"))
            item.update(dataset=meta.get("dataset"), source=meta.get("source"))
            lr_image = _decode_rgb(sample["lr.png"])
            if hr:
                which = "HR"
                item["hr_image"] = _decode_rgb(sample["hr.png"])
            item["image"] = lr_image
        except Exception as error:  # recorded as a row, never fatal
            item.pop("hr_image", None)
            item.update(status=DECODE_ERROR, error=f"cannot decode the {which} image: {error}")
        items.append(item)
    rows = caption_items(config, items, hr=hr)
    write_manifest(Path(out) / f"{shard:05d}.parquet", rows, config.separate_quality, hr)
    stats = manifest_stats(shard, rows, config.kinds(hr))
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
        rows.extend(caption_items(config, items))  # no HR images here: caption_hr applies to pair shards
    write_manifest(out, rows, config.separate_quality)
    stats = manifest_stats(0, rows)
    report = summarize(STAGE, [stats], [stats], time.perf_counter() - started)
    add_caption_totals(report, [stats])
    print_summary(report)
    check_failure_ratio(report, config.max_failure_ratio, "images")
    return report


def add_caption_totals(report: dict, all_stats: list[dict]) -> None:
    """Truncation counts and shares, and captions/s (two captions per image, three with the HR's)."""
    images = sum(s["inputs"] for s in all_stats)
    kinds = CAPTION_KINDS + ((HR_KIND,) if all_stats and all(HR_KIND in s["truncated"] for s in all_stats) else ())
    report["truncated"] = {kind: sum(s["truncated"][kind] for s in all_stats) for kind in kinds}
    report["truncated_share"] = {kind: round(n / max(images, 1), 4) for kind, n in report["truncated"].items()}
    report["captions_per_s"] = round(len(kinds) * report["samples_per_s"], 3) if report.get("samples_per_s") else None


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
