"""The offline model zoo: real layouts, real tokenizers, loadable with the libraries' own from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
COMMON_WORDS = ["photo", "cat", "dog", "image", "quality", "noise", "light", "color", "the", "blue", "house", "tree"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_sd_folder_has_the_diffusers_layout_and_loads_as_a_pipeline(tiny_models):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = Path(tiny_models.sd)
    for name in ("unet", "vae", "text_encoder"):
        assert (sd / name / "config.json").is_file()
    assert (sd / "scheduler" / "scheduler_config.json").is_file()
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (sd / "tokenizer").iterdir()}
    index = json.loads((sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]

    pipe = StableDiffusionPipeline.from_pretrained(sd)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.safety_checker is None

    # SD-1.5 structure: 3 cross-attention down blocks + 1 plain, VAE factor 8, 4 latent channels.
    assert list(pipe.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        latent = pipe.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        embedding = pipe.text_encoder(ids).last_hidden_state
    assert latent.shape == (1, 4, 8, 8)
    assert embedding.shape == (1, 77, pipe.unet.config.cross_attention_dim)


def test_clip_tokenizer_encodes_real_words_to_real_clip_ids(tiny_models):
    from transformers import CLIPTokenizer

    folder = Path(tiny_models.sd) / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 49408
    assert len(json.loads((folder / "vocab.json").read_text())) == 49408
    # The ids of the real CLIP vocabulary (the SD-1.5 tokenizer gives the same).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for word in COMMON_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("Blurry, noisy photograph with low lighting").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "blurry , noisy photograph with low lighting"
    assert tokenizer.model_max_length == 77


def test_tiny_captioner_loads_offline_and_generates_in_left_padded_batches(tiny_models):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    folder = Path(tiny_models.captioner)
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert isinstance(processor, LlavaProcessor)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id

    text = "please describe the quality of this image"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert len(ids) == 1 + len(text.split())  # common words are single real tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    questions = ["Please provide a descriptive summary of the content of this image", "Describe it"]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    assert prompts[1] == "USER: <image>\nDescribe it ASSISTANT:"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in questions]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    image_tokens = (batch["input_ids"] == model.config.image_token_index).sum(1)
    assert image_tokens.tolist() == [model.config.image_seq_length] * 2
    assert batch["attention_mask"][1, 0] == 0 and batch["input_ids"][1, 0] == tokenizer.pad_token_id  # left padding
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
        alone = processor(images=images[1:], text=prompts[1:], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)
    new_batched = batched[1, batch["input_ids"].shape[1]:]
    new_single = single[0, alone["input_ids"].shape[1]:]
    assert new_batched.shape[0] > 0
    assert new_batched.tolist() == new_single.tolist()


def test_sd15_shaped_preset_has_the_real_parameter_counts():
    from xpsr_core.zoo import parameter_counts

    counts = parameter_counts("sd15-shaped")
    assert counts == {
        "unet": 859_520_964,  # SD-1.5 UNet
        "vae": 83_653_863,  # SD-1.5 VAE
        "text_encoder": 123_060_480,  # CLIP ViT-L/14 text encoder
        "captioner": 7_063_427_072,  # llava-hf/llava-1.5-7b-hf
    }


def test_models_stage_writes_skips_and_refuses_mixed_configs(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    runner = CliRunner()
    out = tmp_path / "zoo"
    result = runner.invoke(app, ["models", "tiny", "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "sd15" / "model_index.json").is_file() and (out / "captioner" / "config.json").is_file()
    weights = (out / "sd15" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    from stages.models import ModelsConfig, run

    report = run(ModelsConfig(kind="tiny", out=out, seed=1))
    assert report["skipped"] is True
    assert (out / "sd15" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights

    refused = runner.invoke(app, ["models", "tiny", "--out", str(out), "--seed", "2"])
    assert refused.exit_code != 0
    assert "different configuration" in refused.output and "Traceback" not in refused.output


def test_models_help_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from stages.cli import app; "
        "r = CliRunner().invoke(app, ['models', 'sd15-shaped', '--help']); "
        "assert r.exit_code == 0, r.output; assert '--out' in r.output; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_half_precision_preset_path_writes_fp16_weights_that_load(tmp_path):
    """The sd15-shaped preset writes fp16 weights; the same code path on tiny shapes."""
    import dataclasses

    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from xpsr_core.models import load_base_sd
    from xpsr_core.zoo import SD15_SHAPED, TINY, write_zoo

    assert SD15_SHAPED.dtype == "float16"
    result = write_zoo(tmp_path / "half", dataclasses.replace(TINY, name="tiny-fp16", dtype="float16"), seed=0)
    weights = load_file(result.sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert torch.get_default_dtype() == torch.float32  # restored after building
    base = load_base_sd(result.sd, dtype=torch.float16)
    assert base.unet.dtype == torch.float16 and base.text_encoder.dtype == torch.float16
    assert LlavaForConditionalGeneration.from_pretrained(result.captioner).dtype == torch.float16
