"""max_caption_tokens: captions past CLIP's 77 positions, in 75-token windows, through caption, embed, train and sr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import photo
from xpsr_core.encoding import caption_token_ids, encode_prompts
from xpsr_core.errors import UserError
from xpsr_core.io.shards import read_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCE = ("a weathered red fishing boat rests on the pebbled shore beneath a grey sky while gulls circle "
            "over calm water and distant hills fade into the morning mist")


def long_caption(tokenizer, tokens: int) -> str:
    """Real words, cut to exactly ``tokens`` CLIP tokens (BOS/EOS not counted)."""
    ids = caption_token_ids(tokenizer, [" ".join([SENTENCE] * 20)])[0][:tokens]
    text = tokenizer.decode(ids)
    assert len(caption_token_ids(tokenizer, [text])[0]) == tokens
    return text


@pytest.fixture(scope="module")
def clip(tiny_models):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.sd / "tokenizer")
    return CLIPTextModel.from_pretrained(tiny_models.sd / "text_encoder").eval(), tokenizer


def test_short_caption_first_window_unchanged_and_rest_is_the_empty_prompt(clip):
    encoder, tokenizer = clip
    texts = [long_caption(tokenizer, 75), "a cat on a table", ""]
    at_77, at_231 = encode_prompts(encoder, tokenizer, texts), encode_prompts(encoder, tokenizer, texts, 231)
    assert at_77.shape == (3, 77, encoder.config.hidden_size) and at_231.shape == (3, 231, encoder.config.hidden_size)
    torch.testing.assert_close(at_231[:, :77], at_77, atol=1e-5, rtol=1e-5)
    empty = at_77[2]
    for window in (1, 2):
        torch.testing.assert_close(at_231[:, 77 * window : 77 * (window + 1)], empty.expand(3, -1, -1),
                                   atol=1e-5, rtol=1e-5)


def test_long_caption_windows_are_clip_on_each_slice(clip):
    encoder, tokenizer = clip
    text = long_caption(tokenizer, 200)
    ids = caption_token_ids(tokenizer, [text])[0]
    encoded = encode_prompts(encoder, tokenizer, [text, "a boat"], 231)[0]
    for window, start in enumerate((0, 75, 150)):
        row = [tokenizer.bos_token_id, *ids[start : start + 75], tokenizer.eos_token_id]
        row += [tokenizer.pad_token_id] * (77 - len(row))
        with torch.no_grad():
            expected = encoder(torch.tensor([row]))[0][0]
        torch.testing.assert_close(encoded[77 * window : 77 * (window + 1)], expected, atol=1e-5, rtol=1e-5)
    # at 77 only the first 75 tokens reach the model: the same as the first window
    torch.testing.assert_close(encode_prompts(encoder, tokenizer, [text])[0], encoded[:77], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [0, 76, 100, 78])
def test_max_caption_tokens_must_be_a_multiple_of_77(value):
    from xpsr_core.caption.manifests import CaptionSettings
    from xpsr_core.models.xpsr import XPSRSettings
    from xpsr_core.training_shards import EmbedSettings

    for settings in (XPSRSettings, EmbedSettings, CaptionSettings):
        with pytest.raises(ValueError, match=r"max_caption_tokens must be 77 or a multiple of it \(154, 231"):
            settings(max_caption_tokens=value)
    assert XPSRSettings(max_caption_tokens=154).max_caption_tokens == 154


def test_bad_length_is_a_one_line_cli_error(tmp_path):
    from conftest import assert_one_line_error, run_xpsr

    result = run_xpsr("embed", "--set", "max_caption_tokens=100", cwd=tmp_path)
    assert_one_line_error(result, "max_caption_tokens", "multiple of it")


# ---------------------------------------------------------------- the stages on tiny data, at 77 and 231


@pytest.fixture(scope="module")
def long_manifests(tiny_models, pair_shards, tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    """Caption manifests of the six test pairs with long captions (120 generated tokens), counted at 77 and 231."""
    from stages import caption

    made = {}
    for limit in (77, 231):
        out = tmp_path_factory.mktemp(f"long-captions-{limit}")
        report = caption.run(caption.CaptionConfig(
            input_dir=pair_shards, out=out, captioner=str(tiny_models.captioner), base_model=str(tiny_models.sd),
            max_new_tokens=120, batch_size=6, max_caption_tokens=limit))
        made[limit] = out, report
    return made


def _manifest(folder: Path):
    import pandas as pd

    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(folder.glob("*.parquet"))], ignore_index=True)


def test_manifests_count_against_the_limit_and_report_quantiles(long_manifests):
    at_77, at_231 = (_manifest(long_manifests[limit][0]) for limit in (77, 231))
    for table, limit in ((at_77, 77), (at_231, 231)):
        assert (table["clip_token_limit"] == limit).all()
        for kind in ("content", "quality"):
            tokens = table[f"{kind}_clip_tokens"]
            assert list(table[f"{kind}_truncated"]) == [n - 2 > limit // 77 * 75 for n in tokens]
    # the same captions, only the limit differs: long ones are truncated at 77, fewer or none at 231
    assert list(at_77["content_caption"]) == list(at_231["content_caption"])
    assert at_77["content_truncated"].sum() > at_231["content_truncated"].sum()
    report_77, report_231 = long_manifests[77][1], long_manifests[231][1]
    assert report_77["clip_token_limit"] == 77 and report_231["clip_token_limit"] == 231
    assert report_77["truncated_share"]["content"] == round(at_77["content_truncated"].sum() / len(at_77), 4) > 0
    for kind in ("content", "quality"):
        counts = np.sort(at_77[f"{kind}_clip_tokens"].to_numpy())
        expected = [int(counts[int(np.ceil(q * len(counts))) - 1]) for q in (0.5, 0.9, 0.99)]
        assert report_77["clip_tokens_p50_p90_p99"][kind] == report_231["clip_tokens_p50_p90_p99"][kind] == expected
        # how much of each caption reaches the model: all of it at 231 (none over 225 tokens), less at 77
        words = at_77[f"{kind}_clip_tokens"] - 2
        for report, limit in ((report_77, 77), (report_231, 231)):
            kept = words.clip(upper=limit // 77 * 75).sum() / words.sum()
            assert report["caption_tokens_kept"][kind] == round(kept, 4)
    assert report_77["caption_tokens_kept"]["content"] < 1.0
    if not at_231["content_truncated"].any():
        assert report_231["caption_tokens_kept"]["content"] == 1.0


@pytest.fixture(scope="module")
def long_shards(tiny_models, pair_shards, long_manifests, tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    from stages import embed

    made = {}
    for limit in (77, 231):
        out = tmp_path_factory.mktemp(f"long-shards-{limit}")
        report = embed.run(embed.EmbedConfig(input_dir=pair_shards, captions_dir=long_manifests[limit][0], out=out,
                                             base_model=str(tiny_models.sd), batch_size=4, max_caption_tokens=limit))
        made[limit] = out, report
    return made


def _embeddings(folder: Path, name: str) -> dict[str, np.ndarray]:
    from xpsr_core.encoding import npy_load

    return {s["__key__"]: npy_load(s[name]) for tar in sorted(folder.glob("*.tar")) for s in read_shard(tar)}


def test_shards_hold_the_longer_embeddings_in_fp16(long_shards, long_manifests):
    (short, short_report), (long, long_report) = long_shards[77], long_shards[231]
    width = 32  # the tiny text encoder
    for folder, tokens in ((short, 77), (long, 231)):
        stats = json.loads((folder / "00000.stats.json").read_text())
        assert stats["caption_embedding"] == {"shape": [tokens, width], "dtype": "float16"}
        for name in ("negative.npy", "empty.npy"):
            assert np.load(folder / name).shape == (tokens, width)
    per_sample = long_report["caption_bytes_per_sample"]
    assert per_sample == 3 * short_report["caption_bytes_per_sample"] == 3 * 2 * 77 * 32 * 2
    assert "3x the 77-token size" in long_report["caption_memory"]
    manifest = _manifest(long_manifests[231][0]).set_index("key")
    for kind in ("content", "quality"):
        at_77, at_231 = _embeddings(short, f"{kind}.npy"), _embeddings(long, f"{kind}.npy")
        empty = np.load(long / "empty.npy")[:77].astype(np.float32)
        for key, embedding in at_231.items():
            assert embedding.dtype == np.float16 and embedding.shape == (231, width)
            # window 1 is the 77-token encoding; the caption's words past 75 tokens fill the next windows
            np.testing.assert_allclose(embedding[:77].astype(np.float32), at_77[key].astype(np.float32), atol=2e-3)
            windows_used = -(-(manifest.loc[key, f"{kind}_clip_tokens"] - 2) // 75)
            for window in range(1, 3):
                is_empty = np.allclose(embedding[77 * window : 77 * (window + 1)].astype(np.float32), empty, atol=2e-3)
                assert is_empty == (window >= windows_used), (key, kind, window)


def _train_config(tiny_models, train_dir: Path, out: Path, **changes):
    from stages import train

    values = dict(input_dir=train_dir, out=out, base_model=str(tiny_models.sd), batch_size=2, max_train_steps=2,
                  checkpointing_steps=2, shuffle_buffer=2, tensorboard=False, metrics_file=None, device="cpu")
    values.update(changes)
    return train.TrainConfig(**values)


@pytest.fixture
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_training_refuses_shards_of_another_length(tiny_models, long_shards, tmp_path):
    from stages import train

    with pytest.raises(UserError, match=r"embeddings of 231 tokens, but this run expects max_caption_tokens=77"):
        train.run(_train_config(tiny_models, long_shards[231][0], tmp_path / "run"))
    with pytest.raises(UserError, match=r"of 77 tokens, but this run expects max_caption_tokens=154"):
        train.run(_train_config(tiny_models, long_shards[77][0], tmp_path / "run154", max_caption_tokens=154))


@pytest.fixture(scope="module")
def long_model(tiny_models, long_shards, tmp_path_factory) -> Path:
    """Two training steps at 231 tokens (with a validation grid, which samples through the pipeline)."""
    from accelerate.state import AcceleratorState

    from stages import train

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("long-run")
    train.run(_train_config(tiny_models, long_shards[231][0], out, max_caption_tokens=231, validation_steps=2,
                            validation_samples=1, validation_inference_steps=1))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_training_at_231_records_the_length(long_model):
    settings = json.loads((long_model / "final" / "xpsr.json").read_text())["settings"]
    assert settings["max_caption_tokens"] == 231
    assert (long_model / "validation" / "step-0000002.png").is_file(), "validation sampled at 231 tokens"


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_training_prints_caption_memory(tiny_models, long_shards, tmp_path, capfd):
    from stages import train

    train.run(_train_config(tiny_models, long_shards[231][0], tmp_path / "run", max_caption_tokens=231,
                            max_train_steps=1))
    printed = capfd.readouterr().out
    assert "Caption embeddings: 2 x 231 x 32 fp16 = 28.9 KiB per sample (3x the 77-token size)" in printed


def test_sr_reads_the_whole_caption_up_to_the_model_limit(tiny_models, long_model, clip, tmp_path, capfd):
    from stages import sr
    from xpsr_core.infer.pipeline import XPSRPipeline

    _, tokenizer = clip
    pipe = XPSRPipeline.from_pretrained(base_model=tiny_models.sd, xpsr=long_model / "final")
    assert pipe.max_caption_tokens == 231
    fits, too_long = long_caption(tokenizer, 200), long_caption(tokenizer, 260)
    embeddings = pipe.encode_text([fits, "sharp", pipe.settings.negative_prompt])
    assert embeddings.shape[:2] == (3, 231)  # the negative prompt too: guidance batches both branches
    assert pipe.truncation_notices(fits, "sharp") == []
    assert pipe.truncation_notices(too_long, "sharp") == [
        "the content caption has 260 CLIP tokens; the model reads the first 225 (max_caption_tokens 231), 35 are "
        "dropped"]
    saved = pipe.save_pretrained(tmp_path / "pipeline")
    assert XPSRPipeline.from_pretrained(saved).max_caption_tokens == 231, "a pipeline folder records its limit"

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(photo("astronaut", (24, 24))).save(images / "astronaut.png")
    common = dict(inputs=[str(images)], base_model=str(tiny_models.sd), xpsr=str(long_model / "final"), steps=1,
                  scale=2, captions="given", quality_caption="sharp")
    capfd.readouterr()
    sr.run(sr.SRConfig(out=tmp_path / "fits", content_caption=fits, **common))
    assert "CLIP tokens" not in capfd.readouterr().err
    sr.run(sr.SRConfig(out=tmp_path / "long", content_caption=too_long, **common))
    notices = [line for line in capfd.readouterr().err.splitlines() if "CLIP tokens" in line]
    assert notices == ["astronaut.png: the content caption has 260 CLIP tokens; the model reads the first 225 "
                       "(max_caption_tokens 231), 35 are dropped"]
    # the words past the first 75 tokens change the result: they reach the model
    sr.run(sr.SRConfig(out=tmp_path / "first75", content_caption=long_caption(tokenizer, 75), **common))
    images_out = [np.asarray(Image.open(tmp_path / name / "astronaut.png")) for name in ("fits", "first75")]
    assert not np.array_equal(*images_out)
