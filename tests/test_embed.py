"""The embed stage: training shards with pre-encoded prompts and latent moments."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import output_bytes
from stages import embed as embed_stage
from xpsr_core.encoding import encode_latent_moments, encode_prompts, npy_load, sample_latent
from xpsr_core.errors import UserError
from xpsr_core.io.images import decode_png
from xpsr_core.io.shards import read_shard
from xpsr_core.models.loading import load_base_sd
from xpsr_core.text_conditioning import NEGATIVE_PROMPT


@pytest.fixture
def captions(pair_captions):
    """The caption manifests of the test pairs (shared with the training shards' fixture)."""
    return pair_captions


def make_config(tiny_models, pair_shards, captions, out, **changes):
    values = dict(input_dir=pair_shards, captions_dir=captions, out=out, base_model=str(tiny_models.sd), batch_size=4)
    values.update(changes)
    return embed_stage.EmbedConfig(**values)


def test_training_shards_hold_exact_encodings(tiny_models, pair_shards, captions, tmp_path):
    out = tmp_path / "train"
    report = embed_stage.run(make_config(tiny_models, pair_shards, captions, out))
    assert report["samples"] == 6
    base = load_base_sd(tiny_models.sd, components=("text_encoder", "tokenizer", "vae"))
    width = base.text_encoder.config.hidden_size
    negative = npy_load((out / "negative.npy").read_bytes())
    assert negative.dtype == np.float16 and negative.shape == (77, width)
    expected_negative = (
        encode_prompts(base.text_encoder, base.tokenizer, [NEGATIVE_PROMPT])[0].numpy().astype(np.float16)
    )
    assert np.array_equal(negative, expected_negative)
    samples = [s for p in sorted(out.glob("*.tar")) for s in read_shard(p)]
    assert len(samples) == 6
    for sample in samples:
        assert {"lr.png", "hr.png", "content.npy", "quality.npy", "latent.npy", "json"} <= set(sample)
        import json

        meta = json.loads(sample["json"])
        content = npy_load(sample["content.npy"])
        assert content.dtype == np.float16 and content.shape == (77, width)
        recomputed = (
            encode_prompts(base.text_encoder, base.tokenizer, [meta["captions"]["content"]])[0]
            .numpy()
            .astype(np.float16)
        )
        assert np.array_equal(content, recomputed)
        moments = npy_load(sample["latent.npy"])
        assert moments.shape == (8, 12, 12) and moments.dtype == np.float32
        hr = torch.from_numpy(decode_png(sample["hr.png"])).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert torch.allclose(torch.from_numpy(moments)[None], encode_latent_moments(base.vae, hr), atol=1e-4), (
            "batched and single encodings agree to float tolerance"
        )
        # a latent drawn from the stored moments equals online encoding with the same noise
        online = (
            base.vae.encode(hr).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * base.vae_scaling_factor
        )
        stored = sample_latent(
            torch.from_numpy(moments)[None], base.vae_scaling_factor, torch.Generator().manual_seed(3)
        )
        assert torch.allclose(online, stored, atol=1e-5)


def test_ranks_and_resume_give_identical_shards(tiny_models, pair_shards, captions, tmp_path, monkeypatch):
    embed_stage.run(make_config(tiny_models, pair_shards, captions, tmp_path / "single"))
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        embed_stage.run(make_config(tiny_models, pair_shards, captions, tmp_path / "ranked"))
    assert output_bytes(tmp_path / "ranked") == output_bytes(tmp_path / "single")
    assert (tmp_path / "ranked" / "negative.npy").read_bytes() == (tmp_path / "single" / "negative.npy").read_bytes()


def test_mismatched_inputs_are_refused_with_the_keys(tiny_models, pair_shards, captions, tmp_path):
    import shutil

    broken = tmp_path / "captions"
    shutil.copytree(captions, broken)
    table = pq.read_table(broken / "00001.parquet")
    missing_key = table.column("key")[0].as_py()
    pq.write_table(table.slice(1), broken / "00001.parquet")
    with pytest.raises(UserError, match=missing_key):
        embed_stage.run(make_config(tiny_models, pair_shards, broken, tmp_path / "refused"))
    report = embed_stage.run(make_config(tiny_models, pair_shards, broken, tmp_path / "dropped", drop_missing=True))
    assert report["samples"] == 5 and report["status_counts"]["dropped"] == 1
    keys = {s["__key__"] for p in sorted((tmp_path / "dropped").glob("*.tar")) for s in read_shard(p)}
    assert missing_key not in keys and len(keys) == 5


def test_hr_quality_captions_reach_the_training_shards(
    tiny_models, pair_shards, captions, hr_captions, train_shards_hr, tmp_path
):
    import json

    import pandas as pd

    manifest = pd.concat([pd.read_parquet(f) for f in sorted(hr_captions.glob("*.parquet"))]).set_index("key")
    base = load_base_sd(tiny_models.sd, components=("text_encoder", "tokenizer"))
    samples = [s for p in sorted(train_shards_hr.glob("*.tar")) for s in read_shard(p)]
    assert len(samples) == 6
    for sample in samples:
        meta = json.loads(sample["json"])
        row = manifest.loc[sample["__key__"]]
        assert meta["captions"] == {
            "content": row["content_caption"],
            "quality": row["quality_caption"],
            "hr_quality": row["hr_quality_caption"],
        }
        assert meta["caption_clip_tokens"]["hr_quality"] == row["hr_quality_clip_tokens"]
        stored = npy_load(sample["hr_quality.npy"])
        assert stored.dtype == np.float16 and stored.shape == npy_load(sample["quality.npy"]).shape
        expected = (
            encode_prompts(base.text_encoder, base.tokenizer, [row["hr_quality_caption"]])[0].numpy().astype(np.float16)
        )
        assert np.array_equal(stored, expected)
    # without HR captions in the manifests the shards are as before: no hr_quality.npy, no hr_quality caption
    embed_stage.run(make_config(tiny_models, pair_shards, captions, tmp_path / "plain"))
    plain = [s for p in sorted((tmp_path / "plain").glob("*.tar")) for s in read_shard(p)]
    assert plain and all(
        "hr_quality.npy" not in s and "hr_quality" not in json.loads(s["json"])["captions"] for s in plain
    )
