"""Caption manifests: the content and quality captions of images as Parquet rows, per pair shard or per folder.

    settings = CaptionSettings(captioner="models/tiny/captioner", base_model="models/tiny/sd15")
    caption_shard(settings, pairs_dir, manifests_dir, shard)        # one manifest {shard:05d}.parquet
    caption_folder(settings, Path("photos"), Path("captions.parquet"))  # one manifest for a folder

Items (a key, where it comes from, and its decoded images, or the status and error of why not)
become rows in ``caption_items``; every row names the models, instructions and generation settings
that made it. Two options follow the authors' training data (both off by default, and then the
manifest has exactly its usual columns): ``quality_model`` writes the quality captions with a second
model (a Q-Instruct fine-tune in their recipe; the manifest then names both models and revisions in
``content_captioner*`` and ``quality_captioner*``, ``captioner*`` staying the content model's), and
``caption_hr`` also captions each pair's HR image with the quality instruction (``hr_quality_caption``
and its token count and truncation flag), which training uses when the HR image stands in for the
condition.

With ``engine: openai`` the captions come from an OpenAI-compatible server (``served.py``): the same prompts,
one request each, ``concurrency`` in flight. A prompt that still fails after its retries makes its row
``caption_failed``; a rerun of the stage captions exactly those rows again and keeps the others
(``needs_retry``, ``caption_shard``).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections import Counter
from pathlib import Path

from ..dist import rank_device
from ..io.shards import index_path, is_done, read_shard, tar_path, write_stats
from ..sharded import Status, shard_stats, write_index
from ..text_conditioning import caption_capacity, caption_truncated
from .served import CaptionFailure, ServedCaptioner, check_endpoint, endpoints
from .settings import CAPTION_KINDS, HR_KIND, CaptionSettings, GenerationSettings

SEED_STREAM = "caption"  # a sampled caption's seed comes from (seed, this, key/kind); the quality model's: this-quality
CAPTIONER_COLUMNS = ("content_captioner", "content_captioner_revision", "quality_captioner",
                     "quality_captioner_revision")


def manifest_schema(separate_quality: bool = False, hr: bool = False, folder: bool = False):
    """The manifest's columns; ``separate_quality``/``hr`` add those of the quality_model/caption_hr options,
    ``folder`` (a manifest of an image folder) the exact bytes of each file's relative path, ``source_bytes``."""
    import pyarrow as pa

    columns = [("key", pa.string()), ("shard", pa.int64()), ("dataset", pa.string()), ("source", pa.string())]
    if folder:
        columns.append(("source_bytes", pa.binary()))
    for kind in CAPTION_KINDS + ((HR_KIND,) if hr else ()):
        columns += [(f"{kind}_caption", pa.string()), (f"{kind}_clip_tokens", pa.int64()),
                    (f"{kind}_truncated", pa.bool_())]
    columns += [("content_instruction", pa.string()), ("quality_instruction", pa.string()), ("captioner", pa.string()),
                ("captioner_revision", pa.string())]
    if separate_quality:
        columns += [(name, pa.string()) for name in CAPTIONER_COLUMNS]
    columns += [("generation", pa.string()), ("clip_token_limit", pa.int64()), ("status", pa.string()),
                ("error", pa.string())]
    return pa.schema(columns)


@functools.lru_cache(maxsize=2)
def load_captioner(model: str, dtype: str, device: str, generation: GenerationSettings,
                   trust_remote_code: bool = False):
    """Captioners (the content one and the quality one, when separate) per process, reused across its shards."""
    from .captioner import Captioner

    return Captioner(model, dtype=dtype, device=device, settings=generation, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=2)
def load_served_captioner(endpoint, generation: GenerationSettings, concurrency: int):
    """A served captioner per endpoint (checked against the server's /models once per process)."""
    return ServedCaptioner(endpoint, generation, concurrency)


def captioners(settings: CaptionSettings, device: str) -> tuple:
    """(content captioner, quality captioner): the same one unless ``quality_model`` is set."""
    generation = settings.generation()
    if settings.served:
        captioner = load_served_captioner(endpoints(settings), generation, settings.concurrency)
        if not settings.separate_quality:
            return captioner, captioner
        return captioner, load_served_captioner(endpoints(settings, quality=True), generation, settings.concurrency)
    # no remote code for the content model
    captioner = load_captioner(settings.captioner, settings.dtype, device, generation, False)
    if not settings.separate_quality:
        return captioner, captioner
    return captioner, load_captioner(settings.quality_model, settings.dtype, device, generation,
                                     settings.quality_trust_remote_code)


def check_servers(settings: CaptionSettings) -> None:
    """With engine=openai: a one-line UserError now when a server is down or does not serve its model."""
    if not settings.served:
        return

    check_endpoint(endpoints(settings))
    if settings.separate_quality:
        check_endpoint(endpoints(settings, quality=True))


@functools.lru_cache(maxsize=1)
def _token_counter(base_model: str):
    from .captioner import clip_token_counter

    return clip_token_counter(base_model)


def caption_items(settings: CaptionSettings, items: list[dict], hr: bool = False,
                  kept: dict[str, dict] | None = None) -> list[dict]:
    """Caption decoded items ({"key", "shard", "dataset", "source", "image" [and "hr_image" with ``hr``] or
    "status"/"error"}) into manifest rows, in the items' order; ``kept`` (key -> row) are rows made before, kept."""
    kept = kept or {}
    count, _ = _token_counter(settings.base_model)
    limit = settings.max_caption_tokens
    kinds = settings.kinds(hr)
    rows = {item["key"]: kept[item["key"]] for item in items if item["key"] in kept}
    todo = [item for item in items if item["key"] not in kept]
    ready = [item for item in todo if "image" in item]
    if todo or not kept:  # a shard whose rows are all kept needs no captioner
        captioner, quality_captioner = captioners(settings, rank_device(settings.device))
        common = _provenance(settings, captioner, quality_captioner, limit)
    for item in todo:
        if "image" not in item:
            rows[item["key"]] = {**_empty_row(item, kinds), **common, "status": item["status"], "error": item["error"]}
    # a server takes the whole list at once (`concurrency` requests in flight); transformers a batch per generate()
    step = len(ready) if settings.served else settings.batch_size
    for start in range(0, len(ready), max(step, 1)):
        batch = ready[start : start + step]
        texts = _caption_batch(settings, batch, hr, captioner, quality_captioner)
        for i, item in enumerate(batch):
            row = {**_empty_row(item, kinds), **common, "status": Status.OK, "error": ""}
            failures = [f"{kind.replace('_', ' ')} caption: {texts[i, kind].error}" for kind in kinds
                        if isinstance(texts[i, kind], CaptionFailure)]
            if failures:
                rows[item["key"]] = {**row, "status": Status.CAPTION_FAILED, "error": "; ".join(failures)}
                continue
            for kind in kinds:
                text = texts[i, kind]
                tokens = count(text)
                row.update({f"{kind}_caption": text, f"{kind}_clip_tokens": tokens,
                            f"{kind}_truncated": caption_truncated(tokens, limit)})
            empty = [kind.replace("_", " ") for kind in kinds if not texts[i, kind]]
            if empty:
                row.update(status=Status.EMPTY_GENERATION,
                           error=f"the model generated no text for the {' and '.join(empty)} instruction")
            rows[item["key"]] = row
    return [rows[item["key"]] for item in items]


def _provenance(settings: CaptionSettings, captioner, quality_captioner, limit: int) -> dict:
    """The columns every row shares: instructions, models (as loaded, or as the server names them) and their
    revisions, generation settings."""
    model, revision = captioner.model_id, captioner.revision
    common = {
        "content_instruction": settings.content_instruction, "quality_instruction": settings.quality_instruction,
        "captioner": model, "captioner_revision": revision,
        "generation": settings.generation().to_json(), "clip_token_limit": limit,
    }
    if settings.separate_quality:
        common.update(content_captioner=model, content_captioner_revision=revision,
                      quality_captioner=quality_captioner.model_id,
                      quality_captioner_revision=quality_captioner.revision)
    return common


def _caption_batch(settings: CaptionSettings, batch: list[dict], hr: bool, captioner,
                   quality_captioner) -> dict[tuple[int, str], str]:
    """Every caption of a batch of images: (index in batch, kind) -> caption; all prompts of an image share the
    batch, each drawn with a seed of (seed, stream, key, kind)."""
    from ..seeding import derive_seed

    wanted = []  # (index in batch, kind, image, instruction)
    for i, item in enumerate(batch):
        wanted += [(i, "content", item["image"], settings.content_instruction),
                   (i, "quality", item["image"], settings.quality_instruction)]
        if hr:
            wanted.append((i, HR_KIND, item["hr_image"], settings.quality_instruction))
    if settings.separate_quality:  # one generate() per model; the quality model takes the LR and HR prompts
        jobs = [(captioner, SEED_STREAM, [w for w in wanted if w[1] == "content"]),
                (quality_captioner, f"{SEED_STREAM}-quality", [w for w in wanted if w[1] != "content"])]
    else:
        jobs = [(captioner, SEED_STREAM, wanted)]
    texts: dict[tuple[int, str], str] = {}
    for model, stream, job in jobs:
        # sampling (do_sample) draws each caption from its own generator, seeded by (seed, stage, key, kind)
        seeds = [derive_seed(settings.seed, stream, f"{batch[i]['key']}/{kind}") for i, kind, _, _ in job]
        generated = model.caption_pairs([(image, instruction) for _, _, image, instruction in job], seeds)
        for (i, kind, _, _), text in zip(job, generated):
            texts[i, kind] = text
    return texts


def _empty_row(item: dict, kinds: tuple[str, ...] = CAPTION_KINDS) -> dict:
    row = {"key": item["key"], "shard": item.get("shard"), "dataset": item.get("dataset"), "source": item.get("source")}
    for kind in kinds:
        row.update({f"{kind}_caption": None, f"{kind}_clip_tokens": None, f"{kind}_truncated": None})
    return row


def manifest_stats(shard: int, rows: list[dict], kinds: tuple[str, ...] = CAPTION_KINDS) -> dict:
    """A manifest's stats: images, captioned ones (samples), failures, the truncated captions of each kind, the
    limit they were counted against, and each kind's token counts as a histogram (count -> captions)."""
    truncated = {kind: sum(bool(r[f"{kind}_truncated"]) for r in rows) for kind in kinds}
    captioned = sum(r["status"] == Status.OK for r in rows)
    histograms = {}
    for kind in kinds:
        counts = Counter(int(r[f"{kind}_clip_tokens"]) for r in rows if r[f"{kind}_clip_tokens"] is not None)
        histograms[kind] = {str(tokens): n for tokens, n in sorted(counts.items())}
    limits = {r["clip_token_limit"] for r in rows if r.get("clip_token_limit") is not None}
    return shard_stats(shard, (r["status"] for r in rows), captioned, truncated=truncated,
                       clip_token_limit=limits.pop() if len(limits) == 1 else None, clip_tokens=histograms)


QUANTILES = (0.5, 0.9, 0.99)


def histogram_quantiles(histogram: dict[int, int], quantiles=QUANTILES) -> list[int]:
    """Nearest-rank quantiles (the smallest count with at least q of the captions at or below it)."""
    total = sum(histogram.values())
    values = []
    for q in quantiles:
        rank, seen = max(1, math.ceil(q * total)), 0
        for tokens in sorted(histogram):
            seen += histogram[tokens]
            if seen >= rank:
                values.append(tokens)
                break
    return values


def caption_totals(report: dict, all_stats: list[dict]) -> dict:
    """Truncation counts and shares (captions over the limit), token-count quantiles p50/p90/p99 per kind
    (BOS/EOS included), the share of all caption tokens that reach the model, and captions/s (two captions per
    image, three with the HR's)."""
    images = sum(s["inputs"] for s in all_stats)
    kinds = CAPTION_KINDS + ((HR_KIND,) if all_stats and all(HR_KIND in s["truncated"] for s in all_stats) else ())
    truncated = {kind: sum(s["truncated"][kind] for s in all_stats) for kind in kinds}
    limits = {s.get("clip_token_limit") for s in all_stats} - {None}
    limit = limits.pop() if len(limits) == 1 else None
    quantiles, kept = {}, {}
    for kind in kinds:
        merged: Counter = Counter()
        for s in all_stats:
            merged.update({int(tokens): n for tokens, n in s.get("clip_tokens", {}).get(kind, {}).items()})
        if merged:
            quantiles[kind] = histogram_quantiles(merged)
        words = sum((tokens - 2) * n for tokens, n in merged.items())  # BOS/EOS are not the caption's
        if limit is not None and words:
            reach = sum(min(tokens - 2, caption_capacity(limit)) * n for tokens, n in merged.items())
            kept[kind] = round(reach / words, 4)
    return {
        "truncated": truncated,
        "truncated_share": {kind: round(n / max(images, 1), 4) for kind, n in truncated.items()},
        "clip_token_limit": limit,
        "clip_tokens_p50_p90_p99": quantiles,
        "caption_tokens_kept": kept,
        "captions_per_s": round(len(kinds) * report["samples_per_s"], 3) if report.get("samples_per_s") else None,
    }


def _decode_rgb(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _pair_item(sample: dict, shard: int, hr: bool) -> dict:
    """A pair-shard sample as an item: its LR image (and HR image with ``hr``), or why it cannot be decoded."""
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
        item.update(status=Status.DECODE_ERROR, error=f"cannot decode the {which} image: {error}")
    return item


def needs_retry(stats: dict) -> bool:
    """A finished manifest with rows the caption server failed: a rerun captions those rows again."""
    return bool(stats.get("status_counts", {}).get(Status.CAPTION_FAILED))


def kept_rows(out_dir: Path, shard: int) -> dict[str, dict]:
    """The rows of shard ``shard``'s finished manifest (made by this config and code) that a rerun keeps: all but
    its caption_failed ones, by key. None from a manifest without a current done marker."""
    import pyarrow.parquet as pq

    from ..io.outputs import produced_by, read_record

    record = read_record(out_dir)
    if not record or not is_done(out_dir, shard, produced_by(record)) or not index_path(out_dir, shard).is_file():
        return {}
    rows = pq.read_table(index_path(out_dir, shard)).to_pylist()
    return {row["key"]: row for row in rows if row["status"] != Status.CAPTION_FAILED}


def caption_shard(settings: CaptionSettings, in_dir: Path, out_dir: Path, shard: int) -> dict:
    """Caption pair shard ``shard``'s LR images (and HR images with caption_hr); write its manifest, then its stats."""
    hr = settings.caption_hr
    items = [_pair_item(sample, shard, hr) for sample in read_shard(tar_path(in_dir, shard))]
    rows = caption_items(settings, items, hr=hr, kept=kept_rows(out_dir, shard))
    write_index(index_path(out_dir, shard), rows, manifest_schema(settings.separate_quality, hr))
    stats = manifest_stats(shard, rows, settings.kinds(hr))
    write_stats(out_dir, shard, stats)
    return stats


def caption_folder(settings: CaptionSettings, folder: Path, out_file: Path) -> dict:
    """Caption every image below ``folder`` (keyed by sorted order) into one manifest file; returns its stats.

    The input walk is the shard stage's (``walk_inputs``): unreadable paths get rows with their status, and a row's
    ``source`` is readable (non-UTF-8 bytes as \\xNN) with ``source_bytes`` its exact relative path.
    """
    from PIL import Image

    from ..io import images as image_io

    entries, _ = image_io.walk_folder(folder, "image folder")
    rows: list[dict] = []
    for start in range(0, len(entries), settings.batch_size):  # decode lazily: one batch in memory at a time
        items = []
        for index, entry in enumerate(entries[start : start + settings.batch_size], start):
            item = {"key": f"{index:010d}", "shard": None, "dataset": image_io.readable_name(folder.name),
                    "source": image_io.readable_name(entry.relative)}
            try:
                if entry.status is not None:
                    raise image_io.ImageRejected(entry.status, entry.error)
                pixels = image_io.load_image(folder / entry.relative, image_io.DEFAULT_MAX_PIXELS).pixels
                item["image"] = Image.fromarray(pixels)
            except image_io.ImageRejected as rejected:
                item.update(status=rejected.status, error=rejected.message)
            items.append(item)
        captioned = caption_items(settings, items)  # no HR images here: caption_hr applies to pair shards
        for row, entry in zip(captioned, entries[start : start + settings.batch_size]):
            row["source_bytes"] = os.fsencode(entry.relative)
        rows.extend(captioned)
    write_index(out_file, rows, manifest_schema(settings.separate_quality, folder=True))
    return manifest_stats(0, rows)
