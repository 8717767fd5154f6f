"""The authors' inference recipe as the ``official`` preset: each of its items, on the tiny zoo.

What the authors' test script (qyp2000/XPSR test.py, configs/xpsr_test.yaml, pipelines/pipeline_xpsr.py)
does, item by item: prompts, start latent, generator stream, resize chain, colour fix, tiling
thresholds; and how presets layer under params-file and command-line values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo

TORCH_DEFAULT_SEED = 67280421310721


@pytest.fixture(scope="module")
def base(tiny_models):
    from xpsr_core.models.loading import load_base_sd

    return load_base_sd(tiny_models.sd)


@pytest.fixture(scope="module")
def model(base, perturbed_xpsr):
    return perturbed_xpsr(base, seed=1)


@pytest.fixture(scope="module")
def pipe(model, base):
    from xpsr_core.infer import XPSRPipeline

    return XPSRPipeline.from_model(model, base)


def official(**overrides):
    from xpsr_core.infer import preset_settings

    return preset_settings("official", **overrides)


# ---------------------------------------------------------------------------- presets


def test_presets_are_complete_and_keep_todays_defaults():
    from xpsr_core.infer import PRESETS, SRSettings, preset_values
    from xpsr_core.text_conditioning import NEGATIVE_PROMPT

    assert PRESETS == ("default", "paper", "official")
    defaults = SRSettings()
    assert preset_values("default") == asdict(defaults)
    # the new fields default to today's behaviour
    assert (
        defaults.added_prompt,
        defaults.negative_quality_prompt,
        defaults.start_latent,
        defaults.added_noise_level,
        defaults.resize,
        defaults.process_size,
        defaults.latent_tile_threshold,
        defaults.generator_scope,
        defaults.generator_device,
        defaults.seed,
    ) == ("", None, "mean", None, "torch-bicubic", None, None, "image", "cpu", 0)
    paper = preset_values("paper")
    assert (
        paper["guidance_scale"],
        paper["negative_prompt"],
        paper["steps"],
        paper["scheduler"],
        paper["color_fix"],
    ) == (5.5, NEGATIVE_PROMPT, 20, "ddpm", "adain")
    values = preset_values("official")
    assert set(values) == set(asdict(defaults))  # every field: a preset replaces a folder's recipe wholesale
    assert values["guidance_scale"] == 4.5 and values["steps"] == 20 and values["scheduler"] == "ddpm"
    assert values["added_prompt"] == "clean, high-resolution, 8k, high quality, clear text."
    assert values["negative_prompt"] == "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
    assert values["negative_quality_prompt"] == "high resolution, best quality, clear"
    assert (values["start_latent"], values["added_noise_level"], values["resize"], values["process_size"]) == (
        "sample",
        800,
        "pil-bicubic",
        512,
    )
    assert (values["color_fix"], values["generator_scope"], values["seed"]) == ("adain-official", "run", None)
    assert values["controlnet_negative"] and values["cfg_batched"]


def test_official_schedule_is_ddpm_951_to_1(pipe):
    scheduler = pipe._scheduler(official().scheduler)
    scheduler.set_timesteps(official().steps)
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))


# ---------------------------------------------------------------------------- prompts and guidance


def test_official_prompts_reach_the_text_encoder(pipe, monkeypatch):
    seen = []
    encode = pipe.encode_text

    def recording(texts):
        seen.append(list(texts))
        return encode(texts)

    monkeypatch.setattr(pipe, "encode_text", recording)
    lr = photo("chelsea", (16, 16))
    pipe.upscale(lr, "  a cat on a sofa", "slightly blurry", settings=official(steps=1, process_size=None, seed=0))
    assert seen == [[
        "a cat on a sofa clean, high-resolution, 8k, high quality, clear text.",
        "slightly blurry",
        "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed.",
        "high resolution, best quality, clear",
    ]]
    seen.clear()
    pipe.upscale(lr, "  a cat on a sofa", "slightly blurry", steps=1)  # today's recipe: captions as given, c_l shared
    assert seen == [["  a cat on a sofa", "slightly blurry", "blurry, dotted, noise, unclear, low-res, over-smoothed"]]


def test_negative_branch_gets_its_own_low_level_prompt(pipe, model):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    condition = torch.rand(1, 3, 128, 128, generator=generator)
    settings = official()
    c_h, c_l, c_neg, c_l_neg = pipe.encode_text(pipe.prompts("a red boat", "heavy noise", settings)).split(1)
    batched = pipe.guided_noise(latents, 500, condition, c_h, c_l, c_neg, settings, c_l_neg=c_l_neg)
    separate = pipe.guided_noise(
        latents, 500, condition, c_h, c_l, c_neg, replace(settings, cfg_batched=False), c_l_neg=c_l_neg
    )
    t = torch.tensor([500])
    with torch.no_grad():
        positive = model(latents, t, c_h, c_l, condition).sample
        negative = model(latents, t, c_neg, c_l_neg, condition).sample  # the ControlNet sees the negative c_h too
        shared_c_l = model(latents, t, c_neg, c_l, condition).sample
    expected = negative + 4.5 * (positive - negative)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(separate, expected, atol=1e-5, rtol=1e-4)
    assert (negative - shared_c_l).abs().max() > 1e-4  # the negative c_l really is used


# ---------------------------------------------------------------------------- random draws


def test_seed_none_is_torchs_unseeded_generator(pipe):
    settings = official(steps=1, process_size=None)
    assert settings.seed is None
    generator = pipe.make_generator(settings)
    assert generator.initial_seed() == TORCH_DEFAULT_SEED == torch.Generator().initial_seed()
    assert generator.device == pipe.device  # generator_device="device": the model's device (CPU here)
    assert pipe.make_generator(replace(settings, seed=5)).initial_seed() == 5
    lr = photo("rocket", (16, 16))
    unseeded = pipe.upscale(lr, "a rocket", "noisy", settings=settings)
    explicit = pipe.upscale(lr, "a rocket", "noisy", settings=settings, generator=torch.Generator())
    assert np.array_equal(unseeded.image, explicit.image) and unseeded.seed is None


def test_start_latent_is_a_posterior_sample_noised_twice_then_steps_draw_in_order(pipe, monkeypatch):
    """Draw order from one generator: VAE sample, start noise, added noise (t=800), then each step."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from xpsr_core.conditioning import prepare_condition

    seen = []

    def fake_noise(latents, timestep, condition, c_h, c_l, c_neg, settings=None, c_l_neg=None):
        seen.append(latents.clone())
        return 0.1 * latents

    monkeypatch.setattr(pipe, "guided_noise", fake_noise)
    settings = official(steps=2, process_size=None, seed=7)
    lr = photo("astronaut", (16, 16))
    pipe.upscale(lr, "an astronaut", "sharp", settings=settings)

    condition = prepare_condition(lr, 4, "pil-bicubic", None, pipe.vae_factor).image
    posterior = DiagonalGaussianDistribution(pipe.vae_moments(condition * 2 - 1, settings))
    scheduler = pipe._scheduler("ddpm")
    scheduler.set_timesteps(2)
    t0 = scheduler.timesteps[:1]
    generator = torch.Generator().manual_seed(7)
    z = (
        posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    ) * pipe.vae.config.scaling_factor
    start = scheduler.add_noise(z, torch.randn(z.shape, generator=generator), t0)
    start = scheduler.add_noise(start, torch.randn(z.shape, generator=generator), torch.tensor([800]))
    torch.testing.assert_close(seen[0], start, atol=1e-6, rtol=0)
    second = scheduler.step(0.1 * start, t0[0], start, generator=generator).prev_sample
    torch.testing.assert_close(seen[1], second, atol=1e-6, rtol=0)
    # today's start point (posterior mean, noised once) is a different latent
    seen.clear()
    pipe.upscale(lr, "an astronaut", "sharp", steps=2, seed=7)
    assert (seen[0] - start).abs().max() > 0.1


def test_one_generator_serves_every_image_of_a_run(pipe):
    first, second = photo("coffee", (16, 16)), photo("camera", (16, 12))
    settings = official(steps=1, process_size=None)
    results = pipe([first, second], ["a cup", "a man"], ["sharp", "grainy"], **asdict(settings))
    generator = torch.Generator()
    expected_first = pipe.upscale(first, "a cup", "sharp", settings=settings, generator=generator)
    expected_second = pipe.upscale(second, "a man", "grainy", settings=settings, generator=generator)
    assert np.array_equal(results[0].image, expected_first.image)
    assert np.array_equal(results[1].image, expected_second.image)
    fresh = pipe.upscale(second, "a man", "grainy", settings=settings)  # a new unseeded generator
    assert not np.array_equal(fresh.image, expected_second.image)


# ---------------------------------------------------------------------------- resizing and colour


def test_pil_resize_chain_below_and_above_process_size():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from xpsr_core.conditioning import prepare_condition, resize_output

    small = photo("coffee", (100, 60))  # x4 = 400 x 240: short side below 512
    prepared = prepare_condition(small, 4, "pil-bicubic", 512, 8)
    up = Image.fromarray(small).resize((400, 240), Image.BICUBIC)
    enlarged = TF.resize(up, 512, interpolation=InterpolationMode.BILINEAR)
    assert enlarged.size == (853, 512)  # the long side int(512 * 400 / 240)
    assert prepared.size == (512, 848) and prepared.output_size == (240, 400)  # floored to a multiple of 8
    assert np.array_equal(prepared.image_uint8, np.asarray(enlarged.resize((848, 512), Image.BICUBIC)))
    assert np.array_equal(prepared.lr_up, np.asarray(up))
    torch.testing.assert_close(
        prepared.image, torch.from_numpy(prepared.image_uint8).permute(2, 0, 1)[None].float() / 255
    )
    back = resize_output(prepared.image_uint8, prepared.output_size, "pil-bicubic")
    assert np.array_equal(back, np.asarray(Image.fromarray(prepared.image_uint8).resize((400, 240), Image.BICUBIC)))

    large = photo("rocket", (150, 131))  # x4 = 600 x 524: above 512, not a multiple of 8 in height
    prepared = prepare_condition(large, 4, "pil-bicubic", 512, 8)
    up = Image.fromarray(large).resize((600, 524), Image.BICUBIC)
    assert prepared.size == (520, 600) and prepared.output_size == (524, 600)
    assert np.array_equal(prepared.image_uint8, np.asarray(up.resize((600, 520), Image.BICUBIC)))
    exact = prepare_condition(photo("rocket", (150, 140)), 4, "pil-bicubic", 512, 8)
    assert exact.size == exact.output_size == (560, 600)  # nothing to resize
    assert np.array_equal(exact.image_uint8, exact.lr_up)


def test_pipeline_output_is_resized_back_to_lr_times_scale(pipe):
    below = pipe.upscale(photo("coffee", (24, 20)), "a cup", "sharp", settings=official(steps=1, process_size=128))
    assert below.info["condition_size"] == [152, 128]  # 96 x 80 -> short side 128: 153 x 128 -> multiple of 8
    assert below.image.shape == (80, 96, 3) and below.lr_up.shape == (80, 96, 3)
    above = pipe.upscale(photo("coffee", (41, 36)), "a cup", "sharp", settings=official(steps=1, process_size=128))
    assert above.info["condition_size"] == [160, 144] and above.image.shape == (144, 164, 3)


def test_adain_official_matches_a_hand_computed_value():
    from xpsr_core.infer.color import adain_color_fix_uint8

    image = np.zeros((2, 2, 3), np.uint8)
    reference = np.zeros((2, 2, 3), np.uint8)
    image[..., 0], reference[..., 0] = [[100, 100], [100, 101]], [[0, 85], [170, 255]]
    image[..., 1], reference[..., 1] = [[0, 0], [255, 255]], [[51, 102], [153, 204]]
    image[..., 2], reference[..., 2] = [[10, 20], [30, 40]], [[200, 200], [200, 200]]
    fixed = adain_color_fix_uint8(image, reference)
    # channel 0 by hand: x = u8 / 255; var unbiased (n - 1 = 3) + 1e-5:
    #   std_x = sqrt(0.75 / 255^2 / 3 + 1e-5) = 3.7209e-3, std_ref = sqrt(0.185185 + 1e-5) = 0.430343
    #   100: (-0.25 / 255) / std_x * std_ref + 0.5 = 0.386610 -> 98.586 -> 98 (truncated, not 99)
    #   101: (0.75 / 255) / std_x * std_ref + 0.5 = 0.840170 -> 214.243 -> 214
    # (the biased variance would give 101 and 205)
    assert fixed[..., 0].tolist() == [[98, 98], [98, 214]]
    assert fixed[..., 1].tolist() == [[70, 70], [184, 184]]  # 184.52 truncated
    assert fixed[..., 2].tolist() == [[199, 199], [200, 200]]  # a flat reference: std = sqrt(1e-5)

    def by_hand(x, r):
        x, r = x.astype(np.float64) / 255, r.astype(np.float64) / 255
        y = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-5) * np.sqrt(r.var(ddof=1) + 1e-5) + r.mean()
        return np.floor(np.clip(y, 0, 1) * 255)

    rng = np.random.default_rng(0)
    image, reference = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), rng.integers(30, 200, (9, 7, 3), dtype=np.uint8)
    fixed = adain_color_fix_uint8(image, reference)
    for c in range(3):
        assert np.abs(fixed[..., c].astype(int) - by_hand(image[..., c], reference[..., c])).max() <= 1  # float32 vs 64
        assert np.mean(fixed[..., c] == by_hand(image[..., c], reference[..., c])) > 0.95


def test_adain_official_in_the_pipeline_fixes_the_quantised_output(pipe, monkeypatch):
    from xpsr_core.infer import pipeline as pipeline_module

    calls = []
    real = pipeline_module.adain_color_fix_uint8

    def recording(image, reference):
        calls.append((image.copy(), reference.copy()))
        return real(image, reference)

    monkeypatch.setattr(pipeline_module, "adain_color_fix_uint8", recording)
    result = pipe.upscale(
        photo("chelsea", (16, 16)), "a cat", "clear", settings=official(steps=1, process_size=None, seed=0)
    )
    (image, reference), = calls
    assert image.dtype == reference.dtype == np.uint8 and image.shape == reference.shape == (64, 64, 3)
    assert np.array_equal(reference, result.lr_up)  # the condition, as 8-bit
    assert np.array_equal(result.image, real(image, reference))


# ---------------------------------------------------------------------------- tiling thresholds


def test_official_tiling_thresholds(pipe, monkeypatch):
    from xpsr_core.infer.pipeline import tiles_for

    settings = official()
    assert tiles_for(pipe, 512, 512, settings) == 1
    assert tiles_for(pipe, 2560, 2560, settings) == 1
    # the authors' rule is on the latent's area: 400 x 200 latent px (<= 320^2) runs whole ...
    assert tiles_for(pipe, 1600, 3200, settings) == 1
    assert (
        tiles_for(pipe, 1600, 3200, replace(settings, latent_tile_threshold=None)) == 2
    )  # ... a per-side rule would not
    assert tiles_for(pipe, 2624, 2624, settings) == 4  # above it: 320 px latent tiles

    calls = {"encode": 0, "decode": 0}
    encode, decode = pipe.vae.encode, pipe.vae.decode

    def counting_encode(x, *args, **kwargs):
        calls["encode"] += 1
        return encode(x, *args, **kwargs)

    def counting_decode(z, *args, **kwargs):
        calls["decode"] += 1
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", counting_encode)
    monkeypatch.setattr(pipe.vae, "decode", counting_decode)
    for width, expected in ((1088, 1), (1096, 2)):  # encoded whole up to 1024 + 2 x 32 px
        calls["encode"] = 0
        assert pipe.vae_moments(torch.zeros(1, 3, 16, width), settings).shape[-1] == width // 8
        assert calls["encode"] == expected, (width, calls)
    for width, expected in ((246, 1), (247, 2)):  # decoded whole up to 224 + 2 x 11 latent px
        calls["decode"] = 0
        assert pipe.vae_decode(torch.zeros(1, 4, 2, width), settings).shape[-1] == width * 8
        assert calls["decode"] == expected, (width, calls)


# ---------------------------------------------------------------------------- saved folders, configs, CLI


@pytest.fixture(scope="module")
def official_folder(model, base, tmp_path_factory):
    from xpsr_core.infer import XPSRPipeline

    return XPSRPipeline.from_model(model, base, official()).save_pretrained(
        tmp_path_factory.mktemp("official") / "pipe"
    )


def test_saved_folder_round_trips_the_official_defaults(official_folder):
    from xpsr_core.infer import XPSRPipeline

    saved = json.loads((official_folder / "xpsr_pipeline.json").read_text())["defaults"]
    assert saved == asdict(official())
    assert XPSRPipeline.from_pretrained(official_folder).settings == official()


def invoke_capturing(monkeypatch, command: str, *args: str):
    """Run `xpsr COMMAND ARGS` with the stage's run replaced, and return the resolved config."""
    from typer.testing import CliRunner

    from stages import evaluate, sr
    from stages.cli import app

    captured = []
    monkeypatch.setattr(sr if command == "sr" else evaluate, "run", captured.append)
    result = CliRunner().invoke(app, [command, *args])
    assert result.exit_code == 0, result.output
    return captured[0]


def test_precedence_preset_below_params_below_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "p.yaml"
    params.write_text("sr:\n  preset: official\n  guidance_scale: 3.0\nevaluate:\n  preset: official\n")

    def sr(*args):
        return invoke_capturing(monkeypatch, "sr", "x.png", "--params", str(params), *args).sr_settings()

    assert sr() == official(guidance_scale=3.0)  # the params value over the preset's
    assert sr("--guidance-scale", "2").guidance_scale == 2.0  # the CLI over the params value
    paper = sr("--preset", "paper")  # the CLI's preset name over the params file's ...
    assert (paper.color_fix, paper.added_noise_level, paper.resize, paper.seed) == ("adain", None, "torch-bicubic", 0)
    assert paper.guidance_scale == 3.0  # ... still below the params file's values
    overridden = sr("--set", "added_noise_level=600", "--added-prompt", "sharp", "--process-size", "256", "--seed", "3",
                    "--negative-quality-prompt", "crisp", "--color-fix", "adain", "--set", "generator_scope=image")
    assert overridden == official(
        guidance_scale=3.0,
        added_noise_level=600,
        added_prompt="sharp",
        process_size=256,
        seed=3,
        negative_quality_prompt="crisp",
        color_fix="adain",
        generator_scope="image",
    )
    assert sr("--added-noise-level", "700").added_noise_level == 700
    assert invoke_capturing(monkeypatch, "evaluate", "--params", str(params)).sr_settings() == official()
    # no params file: the preset alone, named on the command line or with --set
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert invoke_capturing(monkeypatch, "sr", "x.png", "--preset", "official").sr_settings() == official()
    assert invoke_capturing(monkeypatch, "sr", "x.png", "--set", "preset=official").sr_settings() == official()
    from xpsr_core.infer import SRSettings

    assert invoke_capturing(monkeypatch, "sr", "x.png").sr_settings() == SRSettings()


def test_pipeline_folder_defaults_apply_unless_a_preset_is_named(official_folder, tmp_path, monkeypatch):
    from xpsr_core.infer import SRSettings

    monkeypatch.chdir(tmp_path)
    folder = str(official_folder)
    assert invoke_capturing(monkeypatch, "sr", "x.png", "--pipeline", folder).sr_settings() == official()
    assert invoke_capturing(
        monkeypatch, "sr", "x.png", "--pipeline", folder, "--guidance-scale", "2"
    ).sr_settings() == official(guidance_scale=2.0)
    assert (
        invoke_capturing(monkeypatch, "sr", "x.png", "--pipeline", folder, "--preset", "default").sr_settings()
        == SRSettings()
    )
    assert invoke_capturing(monkeypatch, "evaluate", "--pipeline", folder).sr_settings() == official()


def test_params_official_selects_the_recipe():
    from stages import caption, degrade, embed, evaluate, import_official, shard, sr, train
    from xpsr_core.config import load_params, resolve_config

    sections = {
        "shard": shard.ShardConfig,
        "degrade": degrade.DegradeConfig,
        "caption": caption.CaptionConfig,
        "embed": embed.EmbedConfig,
        "train": train.TrainConfig,
        "sr": sr.SRConfig,
        "evaluate": evaluate.EvaluateConfig,
        "import_official": import_official.ImportOfficialConfig,
    }
    root = Path(__file__).resolve().parents[1]
    params = load_params(root / "params-official.yaml")
    assert set(params) <= set(sections)
    configs = {name: resolve_config(sections[name], name, params) for name in params}
    for name in ("sr", "evaluate"):
        assert configs[name].preset == "official" and configs[name].dtype == "float32"
        assert configs[name].sr_settings() == official()
    # the authors' training: their architecture, objective, initialisation and data recipe
    trained = configs["train"]
    assert (
        trained.fusion,
        trained.conditional_attention_type,
        trained.dfc_latent_heads,
        trained.dfc_target_resize,
        trained.init,
    ) == ("transformer", "transformer", "residuals", "bilinear", "official")
    assert (
        not trained.use_high_prompt and trained.hr_condition_probability == 0.1 and trained.lr_scheduler == "constant"
    )
    assert trained.batch_size * 8 * trained.gradient_accumulation_steps == 32
    assert configs["caption"].caption_hr and configs["caption"].quality_model
    assert configs["import_official"].out == Path(params["sr"]["pipeline"])
    for name in ("params.yaml", "params-paper.yaml"):  # neither states a value that would shadow a preset
        for section in ("sr", "evaluate"):
            stated = set(load_params(root / name)[section])
            assert not stated & {"guidance_scale", "color_fix", "negative_prompt", "steps", "scale", "scheduler"}, (
                name,
                section,
            )


def test_sr_stage_official_run_shares_one_generator_and_resumes_exactly(official_folder, tmp_path):
    from stages import sr
    from xpsr_core.infer import XPSRPipeline

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(photo("camera", (16, 12))).save(images / "b.png")
    Image.fromarray(photo("astronaut", (16, 16))).save(images / "a.png")
    config = sr.SRConfig(inputs=[str(images)], out=tmp_path / "out", pipeline=str(official_folder), captions="given",
                         content_caption="a photo", quality_caption="a bit blurry", steps=1, process_size=None)
    assert config.sr_settings() == official(steps=1, process_size=None)
    report = sr.run(config)
    assert report["done"] == 2
    meta = json.loads((tmp_path / "out" / "b.json").read_text())
    assert meta["seed"] is None and meta["settings"]["generator_scope"] == "run" and meta["generator_state"]
    assert meta["prompts"][0] == "a photo clean, high-resolution, 8k, high quality, clear text."

    # the same stream by hand: sorted order (a, then b), one unseeded generator
    pipe = XPSRPipeline.from_pretrained(official_folder)
    generator = torch.Generator()
    settings = official(steps=1, process_size=None)
    for name in ("a", "b"):
        lr = np.asarray(Image.open(images / f"{name}.png").convert("RGB"))
        expected = pipe.upscale(lr, "a photo", "a bit blurry", settings=settings, generator=generator)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), expected.image), name

    # interrupted after a: the rerun continues the stream from a's recorded generator state
    first_b = (tmp_path / "out" / "b.png").read_bytes()
    (tmp_path / "out" / "b.png").unlink()
    (tmp_path / "out" / "b.json").unlink()
    again = sr.run(config)
    assert (again["done"], again["skipped"]) == (1, 1)
    assert (tmp_path / "out" / "b.png").read_bytes() == first_b
