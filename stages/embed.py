"""Stage embed: pair shards + caption manifests -> training shards with pre-encoded conditions.

Per key a training shard holds the LR and HR images (copied bytes), the fp16 CLIP last hidden
states of the content and quality captions, optionally the VAE posterior moments of the HR
image (so training samples the latent exactly as online encoding would), and the JSON of the
pair plus both captions. When the manifests hold the HR images' quality captions (``xpsr
caption`` with ``caption_hr``), each key also gets ``hr_quality.npy``, the c_l of the samples
that training conditions on the HR image. ``negative.npy`` and ``empty.npy`` (the negative and
the empty prompt's embeddings) are stored once beside the shards.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydantic import Field

from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.encoding import NEGATIVE_PROMPT
from xpsr_core.errors import UserError

STAGE = "embed"
LISTED_KEYS = 20


class EmbedConfig(StageConfig):
    pairs_dir: Path = runtime_field(Path("data/shards/pairs"), "Pair shards from `xpsr degrade`.")
    captions_dir: Path = runtime_field(Path("manifests/captions"), "Caption manifests from `xpsr caption`.")
    out: Path = runtime_field(Path("data/shards/train"), "Folder for the training shards.")
    base_model: str = Field("models/tiny/sd15", description="Base SD folder or hub id (text encoder, tokenizer, VAE).")
    encode_latents: bool = Field(True, description="Pre-encode the HR image's VAE posterior moments.")
    negative_prompt: str = NEGATIVE_PROMPT
    drop_missing: bool = Field(False, description="Drop keys without an image or an ok caption instead of failing.")
    batch_size: int = Field(16, ge=1, le=4096)
    device: str = runtime_field("cpu", "cpu, cuda or cuda:N.")
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


def _tar_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return sorted({name.partition(".")[0] for name in tar.getnames()})


def _read_captions(captions_dir: Path, shard: int) -> dict[str, dict]:
    import pyarrow.parquet as pq

    path = captions_dir / f"{shard:05d}.parquet"
    if not path.is_file():
        return {}
    return {row["key"]: row for row in pq.read_table(path).to_pylist()}


def plan_join(config: EmbedConfig, n_shards: int) -> dict[int, list[str]]:
    """Keys to embed per shard; refuses, listing keys, when images and captions do not match."""
    from xpsr_core.io.shards import tar_path

    keep: dict[int, list[str]] = {}
    no_caption, failed_caption, no_image = [], [], []
    for shard in range(n_shards):
        image_keys = _tar_keys(tar_path(config.pairs_dir, shard))
        captions = _read_captions(config.captions_dir, shard)
        no_caption += [k for k in image_keys if k not in captions]
        failed_caption += [k for k in image_keys if k in captions and captions[k]["status"] != "ok"]
        no_image += sorted(k for k in captions if k not in set(image_keys) and captions[k]["status"] == "ok")
        keep[shard] = [k for k in image_keys if k in captions and captions[k]["status"] == "ok"]
    problems = [(what, keys) for what, keys in (("have no caption", no_caption), ("have a failed caption", failed_caption), ("have a caption but no image", no_image)) if keys]
    if problems and not config.drop_missing:
        details = "; ".join(f"{len(keys)} keys {what} ({', '.join(keys[:LISTED_KEYS])}{', ...' if len(keys) > LISTED_KEYS else ''})" for what, keys in problems)
        raise UserError(
            f"The pair shards in {config.pairs_dir} and the caption manifests in {config.captions_dir} do not match: {details}. "
            "Rerun `xpsr caption` on these pairs, or pass --drop-missing to leave those keys out."
        )
    return keep


@functools.lru_cache(maxsize=1)
def _encoders(base_model: str, device: str, with_vae: bool):
    from xpsr_core.dist import rank_device
    from xpsr_core.models.loading import load_base_sd

    device = rank_device(device)
    components = ("text_encoder", "tokenizer") + (("vae",) if with_vae else ())
    return load_base_sd(base_model, device=device, components=components)


def embed_shard(config: EmbedConfig, out: Path, keep: dict[int, list[str]], shard: int) -> dict:
    """Encode one shard's captions (and HR latents); write its tar, then its stats."""
    import numpy as np
    import torch

    from xpsr_core.encoding import encode_latent_moments, encode_prompts, npy_bytes
    from xpsr_core.io.images import decode_png
    from xpsr_core.io.shards import TarShardWriter, read_shard, tar_path, write_stats

    base = _encoders(config.base_model, config.device, config.encode_latents)
    captions = _read_captions(config.captions_dir, shard)
    wanted = set(keep[shard])
    pairs = list(read_shard(tar_path(config.pairs_dir, shard)))
    samples = [s for s in pairs if s["__key__"] in wanted]
    with TarShardWriter(tar_path(out, shard)) as writer:
        for start in range(0, len(samples), config.batch_size):
            batch = samples[start : start + config.batch_size]
            rows = [captions[s["__key__"]] for s in batch]
            content = encode_prompts(base.text_encoder, base.tokenizer, [r["content_caption"] for r in rows])
            quality = encode_prompts(base.text_encoder, base.tokenizer, [r["quality_caption"] for r in rows])
            # the HR image's quality caption, when the manifest has it (caption_hr)
            with_hr = [r.get("hr_quality_caption") is not None for r in rows]
            hr_quality = None
            if any(with_hr):
                hr_quality = encode_prompts(base.text_encoder, base.tokenizer, [r.get("hr_quality_caption") or "" for r in rows])
            moments = None
            if config.encode_latents:
                hr = torch.from_numpy(np.stack([decode_png(s["hr.png"]) for s in batch])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                moments = encode_latent_moments(base.vae, hr).cpu().numpy()
            for i, (sample, row) in enumerate(zip(batch, rows)):
                meta = json.loads(sample["json"])
                kinds = ("content", "quality") + (("hr_quality",) if with_hr[i] else ())
                meta["captions"] = {kind: row[f"{kind}_caption"] for kind in kinds}
                meta["caption_clip_tokens"] = {kind: row[f"{kind}_clip_tokens"] for kind in kinds}
                fields = {
                    "lr.png": sample["lr.png"],
                    "hr.png": sample["hr.png"],
                    "content.npy": npy_bytes(content[i].cpu().numpy().astype(np.float16)),
                    "quality.npy": npy_bytes(quality[i].cpu().numpy().astype(np.float16)),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                }
                if with_hr[i]:
                    fields["hr_quality.npy"] = npy_bytes(hr_quality[i].cpu().numpy().astype(np.float16))
                if moments is not None:
                    fields["latent.npy"] = npy_bytes(moments[i])
                writer.write(sample["__key__"], fields)
        written = writer.count
    dropped = len(pairs) - written
    stats = {"shard": shard, "inputs": written + dropped, "samples": written, "failed": 0, "dropped": dropped,
             "status_counts": {"ok": written, **({"dropped": dropped} if dropped else {})}}
    write_stats(out, shard, stats)
    return stats


def write_prompt_embeddings(config: EmbedConfig, out: Path) -> None:
    """negative.npy and empty.npy: the fixed prompts inference and training reuse."""
    import numpy as np

    from xpsr_core.encoding import encode_prompts, npy_bytes
    from xpsr_core.io.atomic import atomic_write_bytes, atomic_write_json

    base = _encoders(config.base_model, config.device, config.encode_latents)
    embeddings = encode_prompts(base.text_encoder, base.tokenizer, [config.negative_prompt, ""]).cpu().numpy().astype(np.float16)
    atomic_write_bytes(out / "negative.npy", npy_bytes(embeddings[0]))
    atomic_write_bytes(out / "empty.npy", npy_bytes(embeddings[1]))
    atomic_write_json(out / "prompts.json", {"negative": config.negative_prompt, "empty": ""})


def run(config: EmbedConfig) -> dict:
    from stages.common import run_sharded_stage
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.io.shards import SIZES_FILE, read_sizes

    for folder, what, command in ((config.pairs_dir, "pair-shard", "xpsr degrade"), (config.captions_dir, "caption-manifest", "xpsr caption")):
        if not (Path(folder) / SIZES_FILE).is_file():
            raise UserError(f"{folder} is not a finished {what} folder (no {SIZES_FILE}). Run `{command}` to completion first.")
    n_shards = max(read_sizes(config.pairs_dir), default=-1) + 1
    keep = plan_join(config, n_shards)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    if not (out / "empty.npy").exists():
        write_prompt_embeddings(config, out)
    work = functools.partial(embed_shard, config, out, keep)
    return run_sharded_stage(STAGE, out, n_shards, work, 1, "spawn", 1.0, "samples")
