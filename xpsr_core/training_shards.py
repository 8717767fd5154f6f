"""Training shards from pair shards and caption manifests: join by key, pre-encode the conditions, write.

    settings = EmbedSettings(base_model="models/tiny/sd15")
    plan = plan_join(settings, pairs_dir, captions_dir, n_shards)   # keys per shard; refuses mismatches
    write_prompt_embeddings(settings, out)
    for shard in range(n_shards):
        embed_shard(settings, pairs_dir, captions_dir, out, shard, plan=plan)

Per key a training shard holds the LR and HR images (copied bytes), the fp16 CLIP last hidden
states of the content and quality captions, optionally the VAE posterior moments of the HR
image (so training samples the latent exactly as online encoding would), and the JSON of the
pair plus both captions. The embeddings are ``max_caption_tokens x D`` (77 x 768 for SD-1.5 by
default; longer in 75-token windows, see ``encoding.encode_prompts``); each shard's stats record
that shape (``caption_embedding``), and training refuses shards of another length. When the
manifests hold the HR images' quality captions (caption_hr), each key also gets ``hr_quality.npy``,
the c_l of the samples that training conditions on the HR image. ``negative.npy`` and ``empty.npy``
(the negative and the empty prompt's embeddings) are stored once beside the shards.
"""

from __future__ import annotations

import functools
import json
import tarfile
from pathlib import Path
from typing import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .config import DeviceName, device_field
from .dist import rank_device
from .errors import UserError
from .io.atomic import atomic_write_bytes, atomic_write_json
from .io.shards import TarShardWriter, index_path, read_shard, tar_path, write_stats
from .sharded import Status, shard_stats
from .text_conditioning import CLIP_WINDOW, NEGATIVE_PROMPT, MaxCaptionTokens, max_caption_tokens_field

LISTED_KEYS = 20  # keys named per problem when pairs and captions do not match


class EmbedSettings(BaseModel):
    """The encoders, what they encode, and what to do with keys that lack an image or an ok caption."""

    model_config = ConfigDict(extra="forbid")
    base_model: str = Field("models/tiny/sd15", description="Base SD folder or hub id (text encoder, tokenizer, VAE).")
    encode_latents: bool = Field(True, description="Pre-encode the HR image's VAE posterior moments.")
    negative_prompt: str = Field(NEGATIVE_PROMPT, description="Encoded once, for the guidance's negative branch.")
    max_caption_tokens: MaxCaptionTokens = max_caption_tokens_field()
    drop_missing: bool = Field(False, description="Drop keys without an image or an ok caption instead of failing.")
    batch_size: int = Field(16, ge=1, le=4096, description="Samples encoded together.")
    device: DeviceName = device_field()


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({name.partition(".")[0] for name in tar.getnames()})


def _read_captions(captions_dir: Path, shard: int) -> dict[str, dict]:
    import pyarrow.parquet as pq

    path = index_path(captions_dir, shard)
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"Cannot read the caption manifest {path}: {' '.join(str(error).split())} "
                        "Caption the pairs again (`xpsr caption --overwrite`).") from error
    return {row["key"]: row for row in table.to_pylist()}


def plan_join(settings: EmbedSettings, pairs_dir: Path, captions_dir: Path, n_shards: int) -> dict[int, list[str]]:
    """Keys to embed per shard; refuses, listing keys, when images and captions do not match (unless drop_missing)."""
    keep: dict[int, list[str]] = {}
    no_caption, failed_caption, no_image = [], [], []
    for shard in range(n_shards):
        image_keys = _tar_keys(tar_path(pairs_dir, shard))
        captions = _read_captions(captions_dir, shard)
        no_caption += [k for k in image_keys if k not in captions]
        failed_caption += [k for k in image_keys if k in captions and captions[k]["status"] != Status.OK]
        no_image += sorted(k for k in captions if k not in set(image_keys) and captions[k]["status"] == Status.OK)
        keep[shard] = [k for k in image_keys if k in captions and captions[k]["status"] == Status.OK]
    found = (("have no caption", no_caption), ("have a failed caption", failed_caption),
             ("have a caption but no image", no_image))
    problems = [(what, keys) for what, keys in found if keys]
    if problems and not settings.drop_missing:
        details = "; ".join(f"{len(keys)} keys {what} ({', '.join(keys[:LISTED_KEYS])}"
                            f"{', ...' if len(keys) > LISTED_KEYS else ''})" for what, keys in problems)
        raise UserError(
            f"The pair shards in {pairs_dir} and the caption manifests in {captions_dir} do not match: {details}. "
            "Rerun `xpsr caption` on these pairs, or pass --drop-missing to leave those keys out."
        )
    return keep


@functools.lru_cache(maxsize=1)
def _encoders(base_model: str, device: str, with_vae: bool):
    from .models.loading import load_base_sd

    components = ("text_encoder", "tokenizer") + (("vae",) if with_vae else ())
    return load_base_sd(base_model, device=rank_device(device), components=components)


def embed_shard(settings: EmbedSettings, pairs_dir: Path, captions_dir: Path, out_dir: Path, shard: int, *,
                plan: Mapping[int, Sequence[str]]) -> dict:
    """Encode the captions (and HR latents) of shard ``shard``'s keys in ``plan``; write its tar, then its stats."""
    base = _encoders(settings.base_model, settings.device, settings.encode_latents)
    captions = _read_captions(captions_dir, shard)
    wanted = set(plan[shard])
    pairs = list(read_shard(tar_path(pairs_dir, shard)))
    samples = [s for s in pairs if s["__key__"] in wanted]
    with TarShardWriter(tar_path(out_dir, shard)) as writer:
        for start in range(0, len(samples), settings.batch_size):
            batch = samples[start : start + settings.batch_size]
            encoded = _encode_batch(settings, base, batch, [captions[s["__key__"]] for s in batch])
            for sample, fields in zip(batch, encoded):
                writer.write(sample["__key__"], fields)
        written = writer.count
    statuses = [Status.OK if s["__key__"] in wanted else Status.DROPPED for s in pairs]
    embedding = {"shape": [settings.max_caption_tokens, int(base.text_encoder.config.hidden_size)],
                 "dtype": "float16"}
    stats = shard_stats(shard, statuses, written, dropped=len(pairs) - written, caption_embedding=embedding)
    write_stats(out_dir, shard, stats)
    return stats


def _encode_batch(settings: EmbedSettings, base, batch: list[dict], rows: list[dict]) -> list[dict[str, bytes]]:
    """The training sample fields of a batch of pairs and their manifest rows."""
    import numpy as np
    import torch

    from .encoding import encode_latent_moments, encode_prompts, npy_bytes
    from .io.images import decode_png

    def prompts(texts: list[str]) -> np.ndarray:
        embeddings = encode_prompts(base.text_encoder, base.tokenizer, texts, settings.max_caption_tokens)
        return embeddings.cpu().numpy().astype(np.float16)

    content = prompts([r["content_caption"] for r in rows])
    quality = prompts([r["quality_caption"] for r in rows])
    # the HR image's quality caption, when the manifest has it (caption_hr)
    with_hr = [r.get("hr_quality_caption") is not None for r in rows]
    hr_quality = prompts([r.get("hr_quality_caption") or "" for r in rows]) if any(with_hr) else None
    moments = None
    if settings.encode_latents:
        pixels = torch.from_numpy(np.stack([decode_png(s["hr.png"]) for s in batch])).permute(0, 3, 1, 2)
        hr = pixels.float() / 127.5 - 1.0
        moments = encode_latent_moments(base.vae, hr).cpu().numpy()
    encoded = []
    for i, (sample, row) in enumerate(zip(batch, rows)):
        meta = json.loads(sample["json"])
        kinds = ("content", "quality") + (("hr_quality",) if with_hr[i] else ())
        meta["captions"] = {kind: row[f"{kind}_caption"] for kind in kinds}
        meta["caption_clip_tokens"] = {kind: row[f"{kind}_clip_tokens"] for kind in kinds}
        fields = {"lr.png": sample["lr.png"], "hr.png": sample["hr.png"], "content.npy": npy_bytes(content[i]),
                  "quality.npy": npy_bytes(quality[i]), "json": json.dumps(meta, sort_keys=True).encode()}
        if with_hr[i]:
            fields["hr_quality.npy"] = npy_bytes(hr_quality[i])
        if moments is not None:
            fields["latent.npy"] = npy_bytes(moments[i])
        encoded.append(fields)
    return encoded


def write_prompt_embeddings(settings: EmbedSettings, out_dir: Path) -> None:
    """negative.npy and empty.npy: the fixed prompts inference and training reuse."""
    import numpy as np

    from .encoding import encode_prompts, npy_bytes

    base = _encoders(settings.base_model, settings.device, settings.encode_latents)
    texts = [settings.negative_prompt, ""]
    embeddings = encode_prompts(base.text_encoder, base.tokenizer, texts, settings.max_caption_tokens)
    embeddings = embeddings.cpu().numpy().astype(np.float16)
    atomic_write_bytes(out_dir / "negative.npy", npy_bytes(embeddings[0]))
    atomic_write_bytes(out_dir / "empty.npy", npy_bytes(embeddings[1]))
    atomic_write_json(out_dir / "prompts.json", {"negative": settings.negative_prompt, "empty": ""})


def embedding_totals(report: dict, all_stats: list[dict]) -> dict:
    """The caption embeddings' shape and what they cost per sample (fp16, content + quality), against 77 tokens."""
    shapes = {tuple(s["caption_embedding"]["shape"]) for s in all_stats if "caption_embedding" in s}
    if len(shapes) != 1:
        return {}
    (tokens, width), = shapes
    return {"caption_embedding_shape": [tokens, width], "caption_bytes_per_sample": caption_bytes(tokens, width),
            "caption_memory": caption_memory(tokens, width)}


def caption_bytes(tokens: int, width: int) -> int:
    """Bytes of one sample's two caption embeddings in fp16."""
    return 2 * tokens * width * 2


def caption_memory(tokens: int, width: int) -> str:
    """One sample's caption embeddings in words: shape, size, and how many times the 77-token size."""
    return (f"2 x {tokens} x {width} fp16 = {caption_bytes(tokens, width) / 1024:.1f} KiB per sample "
            f"({tokens / CLIP_WINDOW:g}x the {CLIP_WINDOW}-token size)")


def embedding_length(train_dir: Path, shard: Path) -> int | None:
    """The caption-embedding length of a training shard: from its stats, else from its first sample (None: empty)."""
    stats_file = Path(train_dir) / f"{shard.name.partition('.')[0]}.stats.json"
    if stats_file.is_file():
        recorded = json.loads(stats_file.read_text()).get("caption_embedding")
        if recorded:
            return int(recorded["shape"][0])
    from .encoding import npy_load

    sample = next(read_shard(shard), None)
    return None if sample is None or "content.npy" not in sample else int(npy_load(sample["content.npy"]).shape[0])


def check_embedding_length(train_dir: Path, max_caption_tokens: int) -> None:
    """Refuse training shards whose caption embeddings have another length than ``max_caption_tokens``."""
    for shard in sorted(Path(train_dir).glob("*.tar")):
        length = embedding_length(train_dir, shard)
        if length is not None and length != max_caption_tokens:
            raise UserError(
                f"The training shard {shard} holds caption embeddings of {length} tokens, but this run expects "
                f"max_caption_tokens={max_caption_tokens}. Rebuild the shards with `xpsr embed --set "
                f"max_caption_tokens={max_caption_tokens} --overwrite`, or train with max_caption_tokens={length}."
            )
