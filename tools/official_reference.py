#!/usr/bin/env python
"""Known-answer reference data from the XPSR authors' code (github qyp2000/XPSR), for parity tests.

This script is NOT part of the xpsr package and does not run in the project's venv. It runs in a
separate venv holding the authors' pinned stack (torch 2.1.2, diffusers 0.21.4, transformers 4.36.2,
basicsr 1.4.2, accelerate 0.25, numpy<2, Pillow 10.2) and imports the authors' classes
(``models.xpsr.*``, ``pipelines.pipeline_xpsr``, ``myutils.wavelet_color_fix``) from a checkout of
their repository named on the command line. None of their code is copied here.

Regenerate the fixture (from the repository root; the tokenizer folder comes from our own zoo,
``xpsr models tiny --out /tmp/zoo`` with the project venv, and is not written into the fixture):

    REFVENV/bin/python tools/official_reference.py \\
        --authors-repo XPSR_CHECKOUT --tokenizer /tmp/zoo/sd15/tokenizer \\
        --out tests/fixtures/official --authors-commit b5e84113f5dd58eff00f726f3bbf450343147cc7

What it writes (tests/fixtures/official/README.md says more):

* ``base/``: a tiny SD-1.5-layout diffusers folder (model_index.json, unet/, vae/, text_encoder/,
  scheduler/; safetensors) with the shapes of ``xpsr_core.zoo.TINY``, built with stock diffusers
  0.21.4 / transformers 4.36.2 classes. No tokenizer/: tests copy one in.
* ``checkpoint/unet/``, ``checkpoint/controlnet/``: the authors' XPSR UNet and ControlNet built the
  way their train.py builds them, with every ControlNet parameter and every UNet pixel_attentions
  parameter perturbed, saved with ``save_pretrained`` as their checkpoint hook does.
* ``forward.safetensors`` + ``forward.json``: ControlNet and UNet forward passes on seeded inputs.
* ``pipeline_A/``, ``pipeline_B/``: their test.py flow end to end (process_size 128).
* ``train_loss.safetensors`` + ``train_loss.json``: one training loss as train.py computes it.
* ``manifest.json``: versions, seeds, file sizes and sha256.

Why the weights look odd: they are drawn at random, then rounded to a power-of-two grid with a
step about equal to each tensor's standard deviation, so every value is a float32 that is exact in
fp16 and each tensor takes only a handful of distinct values. Random float32 hardly compresses
(~3.7 bytes per value under zlib); grid values take ~0.55, which keeps the committed fixture to a
few MB, and fp16 casts of it are lossless. The token-embedding rows that no fixture prompt uses are
zero for the same reason. ``XPSR_REF_GRID_DIV`` (default 1.0; larger = finer grid) changes the step.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

# Mirrors xpsr_core.zoo.TINY / SD15_SCHEDULER (checked against it below when importable).
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=128,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
)
CLIP_IDS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

GENERATED = [
    "base",
    "checkpoint",
    "pipeline_A",
    "pipeline_B",
    "forward.safetensors",
    "forward.json",
    "train_loss.safetensors",
    "train_loss.json",
    "manifest.json",
]

# Seeds (one per section, so a section can be changed without moving the others).
SEED_BASE = 0  # torch.manual_seed before building the stock models
SEED_BASE_NOISE = 1  # generator for the base perturbation
SEED_XPSR_NOISE = 2  # generator for the ControlNet / pixel_attentions perturbation
SEED_FORWARD = 3  # generator for the forward-pass inputs
SEED_TRAIN = 4  # torch.manual_seed (global RNG, as train.py draws) for the training loss

# test.py's argparse defaults that the pipeline reads (not overridden by configs/xpsr_test.yaml).
TEST_PY_DEFAULTS = dict(
    latent_tiled_size=320,
    latent_tiled_overlap=8,
    decoder_tiled_size=224,
    encoder_tiled_size=1024,
    added_noise_level=800,
    offset_noise_scale=0.0,
    upscale=4,
    seed=None,
)
PROCESS_SIZE = 128  # fixture value; configs/xpsr_test.yaml uses 512

# Prompt file contents. Their caption writers store one line; the LLaVA caption keeps the
# space that follows "ASSISTANT:", which test.py strips with .lstrip().
CASES = {
    "A": dict(
        image="astronaut",
        crop=(100, 20, 400, 200),  # PIL box on skimage.data.astronaut() (512x512)
        lr_size=(40, 24),  # (width, height); x4 = 160x96, short side < 128
        seed=123,
        highlevel_file=" The image shows a smiling woman in a white space suit in front of an American flag,"
        " holding a helmet.",
        lowlevel_file="The image is blurry and has a low resolution. The face lacks fine details and there is"
        " visible noise. Overall, the quality of the image is poor.",
    ),
    "B": dict(
        image="chelsea",
        crop=(50, 20, 450, 380),  # PIL box on skimage.data.chelsea() (451x300)
        lr_size=(40, 36),  # x4 = 160x144, short side >= 128
        seed=None,
        highlevel_file=" The image shows an orange tabby cat with green eyes lying on a wooden floor.",
        lowlevel_file="The quality of the image is average. The cat's fur lacks fine details and the edges"
        " are slightly blurred.",
    ),
}
# Negative low-level prompt hard-coded in their pipeline __call__ (recorded here to list its tokens).
PIPELINE_LOWLEVEL_NEGATIVE = "high resolution, best quality, clear"

FORWARD_PROMPTS = dict(
    c_h=[
        "a red fox standing in the snow, clean, high-resolution, 8k",
        "an old stone bridge over a river at sunset",
    ],
    c_l=[
        "The image is very noisy and blurry, the quality is poor.",
        "The image is sharp and clear with rich details, the quality is excellent.",
    ],
    c_h2=["a bowl of fresh fruit on a kitchen table"],
    c_l2=["The image is slightly blurry, with some compression artifacts."],
)
TRAIN_LOWLEVEL = [
    "The image is blurry with noticeable noise, the quality is low.",
    "The image has average quality, the texture of the hair is unclear.",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-repo", required=True, type=Path, help="checkout of qyp2000/XPSR")
    p.add_argument("--tokenizer", required=True, type=Path, help="CLIP tokenizer folder (xpsr models tiny)")
    p.add_argument("--out", required=True, type=Path, help="fixture folder to (re)write")
    p.add_argument("--authors-commit", default=None, help="commit of the checkout, recorded in manifest.json")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


# Perturbation of ControlNet / pixel_attentions: noise std = max(XPSR_REL * rms, floor) before the
# grid rounding, so that about half the entries of every copied tensor move by at least one grid step.
XPSR_REL = 0.5
GRID_DIV = float(os.environ.get("XPSR_REF_GRID_DIV", "1.0"))


def grid_round(t):
    """Round to a power-of-two grid of about spread/GRID_DIV; the result is float32 and exact in fp16."""
    import torch

    x = t.detach().double()
    spread = x.std().item() if x.numel() > 1 else 0.0
    if spread == 0.0:
        spread = x.abs().max().item()
    if spread == 0.0:
        return t.detach().float().clone()
    step = 2.0 ** round(math.log2(spread / GRID_DIV))
    step = max(step, 2.0**-24)
    while (x.abs().max().item() / step) >= 1024:  # keep the integer part within fp16's significand
        step *= 2.0
    out = (torch.round(x / step) * step).float()
    if not torch.equal(out.half().float(), out):
        raise AssertionError("grid value not exact in fp16")
    return out


def perturbation(t, g, rel, floor_1d, floor_w):
    """Seeded noise: std = max(rel * rms(t), floor); floor = floor_w / sqrt(fan_in) for >1-D tensors."""
    import torch

    rms = t.detach().double().pow(2).mean().sqrt().item()
    if t.dim() > 1:
        floor = floor_w / math.sqrt(t[0].numel())
    else:
        floor = floor_1d
    std = max(rel * rms, floor)
    return torch.randn(t.shape, generator=g, dtype=torch.float32) * std


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(tensors: dict, order: list) -> list:
    return [
        dict(name=k, shape=list(tensors[k].shape), dtype=str(tensors[k].dtype).replace("torch.", "")) for k in order
    ]


def save_tensors(path: Path, tensors: dict):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def check_finite(name, tensors):
    import torch

    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise AssertionError(f"{name}: {k} has non-finite values")


def encode_text(tokenizer, text_encoder, prompts):
    """Token ids (padded to 77, truncated) and CLIP last_hidden_state, as their pipeline and train.py do."""
    import torch

    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
    return ids, emb


def pil_to_u8(im):
    """PIL RGB -> uint8 tensor [3,H,W]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def u8_to_unit(u8):
    """uint8 -> float32 in [0,1], the same arithmetic as torchvision ToTensor (float then div 255)."""
    import torch

    return u8.to(torch.float32).div(255)


def load_rgb(name):
    import numpy as np
    import skimage.data
    from PIL import Image

    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


def check_against_zoo():
    """Cross-check the shapes above with xpsr_core.zoo when the repository is importable."""
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    try:
        from xpsr_core.zoo import SD15_SCHEDULER as Z_SCHED
        from xpsr_core.zoo import TINY
    except Exception as exc:  # pragma: no cover - informational
        return f"not checked ({type(exc).__name__}: {exc})"
    finally:
        sys.path.pop(0)
    for mine, theirs, what in (
        (TINY_UNET, TINY.unet, "unet"),
        (TINY_VAE, TINY.vae, "vae"),
        (TINY_TEXT, TINY.text_encoder, "text"),
    ):
        if {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in mine.items()} != {
            k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in theirs.items()
        }:
            raise SystemExit(f"{what} shapes differ from xpsr_core.zoo.TINY: {mine} vs {theirs}")
    if SD15_SCHEDULER != Z_SCHED:
        raise SystemExit("scheduler config differs from xpsr_core.zoo.SD15_SCHEDULER")
    return "matches xpsr_core.zoo.TINY and SD15_SCHEDULER"


def fixture_token_ids(tokenizer, added_prompt, negative_prompt):
    prompts = [""]
    for case in CASES.values():
        prompts.append(case["highlevel_file"].lstrip() + " " + added_prompt)
        prompts.append(case["lowlevel_file"].lstrip())
    prompts += [negative_prompt, PIPELINE_LOWLEVEL_NEGATIVE]
    for v in FORWARD_PROMPTS.values():
        prompts += v
    prompts += TRAIN_LOWLEVEL
    ids = set()
    for p in prompts:
        ids.update(tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids)
    return sorted(ids)


def build_base(out: Path, tokenizer, keep_ids):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED_BASE)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_IDS, **TINY_TEXT))
    scheduler = DDPMScheduler(**SD15_SCHEDULER)

    g = torch.Generator().manual_seed(SEED_BASE_NOISE)
    keep = torch.zeros(TINY_TEXT["vocab_size"], dtype=torch.bool)
    keep[torch.tensor(keep_ids)] = True
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for name, p in model.named_parameters():
                # norms (1/0 at init) get varied too, so a swapped norm key shows
                p.copy_(grid_round(p + perturbation(p, g, rel=0.1, floor_1d=0.02, floor_w=0.0)))
        emb = text_encoder.text_model.embeddings.token_embedding.weight
        emb[~keep] = 0.0
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    base = out / "base"
    pipe.save_pretrained(base, safe_serialization=True)
    shutil.rmtree(base / "tokenizer")  # tests copy our tokenizer in
    return base


def build_checkpoint(out: Path, base: Path):
    """XPSR UNet + ControlNet as train.py builds them, then perturbed and saved as its checkpoint hook does."""
    import torch
    from models.xpsr.controlnet import ControlNetModel
    from models.xpsr.unet_2d_condition import UNet2DConditionModel

    # train.py: UNet2DConditionModel.from_pretrained_orig(sd, subfolder="unet") -> SD weights copied,
    # keys missing from SD (pixel_attentions) keep their random init; then ControlNetModel.from_unet(unet).
    # (train.py reads diffusion_pytorch_model.bin; use_safetensors=True reads the same weights from .safetensors.)
    torch.manual_seed(SEED_BASE + 10)
    unet = UNet2DConditionModel.from_pretrained_orig(str(base), subfolder="unet", use_safetensors=True)
    controlnet = ControlNetModel.from_unet(unet)

    from safetensors.torch import load_file

    sd = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    own = unet.state_dict()
    extra = sorted(set(own) - set(sd))
    if set(sd) - set(own) or any("pixel_attentions" not in k for k in extra):
        raise AssertionError("unexpected key sets between SD UNet and XPSR UNet")
    for k, v in sd.items():
        if not torch.equal(own[k], v):
            raise AssertionError(f"frozen UNet weight {k} not copied")

    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    g = torch.Generator().manual_seed(SEED_XPSR_NOISE)
    perturbed = {"controlnet": 0, "unet.pixel_attentions": 0}
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            p.copy_(grid_round(p + perturbation(p, g, rel=XPSR_REL, floor_1d=0.02, floor_w=0.25)))
            perturbed["controlnet"] += 1
        for name, p in unet.named_parameters():
            if "pixel_attentions" in name:
                p.copy_(grid_round(p + perturbation(p, g, rel=XPSR_REL, floor_1d=0.02, floor_w=0.25)))
                perturbed["unet.pixel_attentions"] += 1

    ckpt = out / "checkpoint"
    # train.py's save_model_hook: model.save_pretrained(os.path.join(output_dir, "unet" | "controlnet")),
    # diffusers 0.21.4 default safe_serialization=True -> diffusion_pytorch_model.safetensors.
    unet.save_pretrained(str(ckpt / "unet"))
    controlnet.save_pretrained(str(ckpt / "controlnet"))

    # zero-initialised or copied parameters must now all differ from their source
    cn_sd = controlnet.state_dict()
    same_as_unet = [k for k, v in cn_sd.items() if k in own and own[k].shape == v.shape and torch.equal(own[k], v)]
    zero = [k for k, v in cn_sd.items() if not v.any()]
    if same_as_unet or zero:
        raise AssertionError(f"perturbation left copies {same_as_unet[:3]} or zeros {zero[:3]}")
    changed = [
        (cn_sd[k] != before[k]).double().mean().item() for k in cn_sd if before[k].any()
    ]
    frac_changed = dict(min=min(changed), mean=sum(changed) / len(changed))
    info = dict(
        unet_params=sum(v.numel() for v in unet.state_dict().values()),
        unet_pixel_attention_params=sum(v.numel() for k, v in unet.state_dict().items() if "pixel_attentions" in k),
        controlnet_params=sum(v.numel() for v in cn_sd.values()),
        perturbed_tensors=perturbed,
        controlnet_fraction_of_entries_changed_in_copied_or_random_tensors=frac_changed,
        unet_keys_not_in_sd=len(extra),
        controlnet_config={
            k: v
            for k, v in controlnet.config.items()
            if k
            in (
                "return_rgbs",
                "use_rrdb",
                "use_lowlevel_prompt",
                "use_latent_pred",
                "conditioning_embedding_out_channels",
            )
        },
        unet_config={k: v for k, v in unet.config.items() if "lowlevel" in k},
    )
    return ckpt, info


def load_models(base: Path, ckpt: Path, tokenizer_dir: Path):
    """Load everything back from disk the way test.py's load_xpsr_pipeline does (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from models.xpsr.controlnet import ControlNetModel
    from models.xpsr.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    m = dict(
        scheduler=DDPMScheduler.from_pretrained(str(base), subfolder="scheduler"),
        text_encoder=CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        vae=AutoencoderKL.from_pretrained(str(base), subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(str(ckpt), subfolder="unet"),
        controlnet=ControlNetModel.from_pretrained(str(ckpt), subfolder="controlnet"),
    )
    for k in ("text_encoder", "vae", "unet", "controlnet"):
        m[k].requires_grad_(False)
        m[k].eval()
    return m


def run_forward(out: Path, m):
    import torch
    from PIL import Image
    from torchvision import transforms

    g = torch.Generator().manual_seed(SEED_FORWARD)
    tok, te, cn, unet = m["tokenizer"], m["text_encoder"], m["controlnet"], m["unet"]
    to_tensor = transforms.ToTensor()
    tensors, order, runs = {}, [], []

    def add(name, value):
        tensors[name] = value
        order.append(name)

    def one(prefix, latent_hw, timesteps, ch_prompts, cl_prompts, images, scale):
        b = len(timesteps)
        h, w = latent_hw
        sample = torch.randn((b, 4, h, w), generator=g)
        t = torch.tensor(timesteps, dtype=torch.int64)
        ch_ids, c_h = encode_text(tok, te, ch_prompts)
        cl_ids, c_l = encode_text(tok, te, cl_prompts)
        cond_u8 = torch.stack(
            [pil_to_u8(load_rgb(name).resize((8 * w, 8 * h), Image.BICUBIC)) for name in images]
        )  # [b,3,8h,8w] uint8
        cond = u8_to_unit(cond_u8)  # == torchvision ToTensor, [0,1]
        assert torch.equal(cond[0], to_tensor(load_rgb(images[0]).resize((8 * w, 8 * h), Image.BICUBIC)))
        with torch.no_grad():
            dfc, dfc_mid, down, mid, rgbs = cn(
                sample,
                t,
                encoder_hidden_states=c_h,
                controlnet_cond=cond,
                lowlevel_encoder_hidden_states=c_l,
                conditioning_scale=scale,
                return_dict=False,
            )
            eps = unet(
                sample,
                t,
                encoder_hidden_states=c_h,
                lowlevel_encoder_hidden_states=c_l,
                down_block_additional_residuals=list(down),
                mid_block_additional_residual=mid,
            ).sample
        for k, v in (
            ("sample", sample),
            ("timestep", t),
            ("c_h", c_h),
            ("c_l", c_l),
            ("cond_u8", cond_u8),
            ("c_h_ids", ch_ids),
            ("c_l_ids", cl_ids),
        ):
            add(f"{prefix}.in.{k}", v)
        for i, v in enumerate(dfc):
            add(f"{prefix}.cn.latent_dfc.{i:02d}", v)
        add(f"{prefix}.cn.latent_dfc_mid", dfc_mid)
        for i, v in enumerate(down):
            add(f"{prefix}.cn.down_res.{i:02d}", v)
        add(f"{prefix}.cn.mid_res", mid)
        for i, v in enumerate(rgbs):
            add(f"{prefix}.cn.rgb.{i}", v)
        add(f"{prefix}.unet.eps", eps)
        runs.append(
            dict(
                prefix=prefix,
                latent_hw=[h, w],
                timesteps=list(timesteps),
                conditioning_scale=scale,
                c_h_prompts=ch_prompts,
                c_l_prompts=cl_prompts,
                cond_images=[
                    f"skimage.data.{n}() resized with PIL BICUBIC to {8 * w}x{8 * h} (WxH), ToTensor" for n in images
                ],
                counts=dict(latent_dfc=len(dfc), down_res=len(down), rgb=len(rgbs)),
            )
        )

    one("f1", (8, 12), [37, 803], FORWARD_PROMPTS["c_h"], FORWARD_PROMPTS["c_l"], ["astronaut", "chelsea"], 1.0)
    one("f2", (16, 8), [500], FORWARD_PROMPTS["c_h2"], FORWARD_PROMPTS["c_l2"], ["coffee"], 0.75)
    check_finite("forward", tensors)
    save_tensors(out / "forward.safetensors", tensors)
    doc = dict(
        file="forward.safetensors",
        description=(
            "For each run <p>: inputs <p>.in.*; outputs of the authors' ControlNetModel.forward("
            "sample, timestep, encoder_hidden_states=c_h, controlnet_cond=cond, "
            "lowlevel_encoder_hidden_states=c_l, conditioning_scale=s, return_dict=False), which returns "
            "the tuple (latent_dfc[12], latent_dfc_mid, down_res[12], mid_res, rgb[3]) in that order; then "
            "<p>.unet.eps = authors' UNet2DConditionModel(sample, timestep, encoder_hidden_states=c_h, "
            "lowlevel_encoder_hidden_states=c_l, down_block_additional_residuals=down_res, "
            "mid_block_additional_residual=mid_res).sample. down_res/mid_res are already multiplied by "
            "conditioning_scale; latent_dfc are computed from the unscaled zero-conv outputs. "
            "rgb.i are the conditioning-embedding RGB heads at 1/2, 1/4, 1/8 of the condition size "
            "(i = 0, 1, 2). Indices follow the authors' order: down_res.00 is conv_in+cond embedding, "
            "then 3 per down block (2 resnets/attentions + downsampler; the last block has no downsampler)."
        ),
        dtypes="float32 except *.in.timestep and *.in.*_ids (int64) and *.in.cond_u8 (uint8)",
        cond=(
            "the ControlNet condition is cond = <p>.in.cond_u8.float().div(255) (exactly torchvision ToTensor), "
            "[b,3,8h,8w] in [0,1]"
        ),
        runs=runs,
        tensors=describe(tensors, order),
    )
    (out / "forward.json").write_text(json.dumps(doc, indent=1))
    return doc


def run_pipeline_case(out: Path, m, case_name: str, yaml_cfg: dict):
    import numpy as np
    import torch
    from accelerate.utils import set_seed
    from diffusers.models.autoencoder_kl import AutoencoderKL
    from myutils.wavelet_color_fix import adain_color_fix
    from PIL import Image
    from pipelines.pipeline_xpsr import StableDiffusionControlNetPipeline
    from torchvision import transforms
    from transformers import CLIPImageProcessor

    case = CASES[case_name]
    folder = out / f"pipeline_{case_name}"
    folder.mkdir(parents=True, exist_ok=True)

    # --- the LR input: a real photo crop, downscaled with PIL bicubic, saved as PNG and read back.
    lr = load_rgb(case["image"]).crop(case["crop"]).resize(case["lr_size"], Image.BICUBIC)
    lr.save(folder / "lr.png")

    # --- args: test.py parser defaults, then configs/xpsr_test.yaml overrides, then the fixture's process_size.
    args = argparse.Namespace(**TEST_PY_DEFAULTS)
    for k, v in yaml_cfg.items():
        setattr(args, k, v)
    args.process_size = PROCESS_SIZE
    args.seed = case["seed"]
    if args.mixed_precision != "no":
        raise SystemExit("expected mixed_precision 'no' in xpsr_test.yaml")

    # --- test.py main(): set_seed when a seed is given; one CPU generator for the whole run.
    if args.seed is not None:
        set_seed(args.seed)
    generator = torch.Generator(device="cpu")
    if args.seed is not None:
        generator.manual_seed(args.seed)
    initial_seed = generator.initial_seed()
    gen_state = generator.get_state().clone()

    # --- load_xpsr_pipeline(): fp32; their enable_xformers... is skipped (no xformers on CPU; the
    # default torch-2 SDPA attention processor is used instead).
    vae = m["vae"]
    pipe = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=m["text_encoder"],
        tokenizer=m["tokenizer"],
        feature_extractor=CLIPImageProcessor(),
        unet=m["unet"],
        controlnet=m["controlnet"],
        scheduler=m["scheduler"],
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe._init_tiled_vae(encoder_tile_size=args.encoder_tiled_size, decoder_tile_size=args.decoder_tiled_size)
    pipe.set_progress_bar_config(disable=True)

    # --- prompts exactly as test.py builds them from the prompt files
    validation_prompt = case["highlevel_file"].splitlines()[0].lstrip() if case["highlevel_file"] else ""
    validation_prompt += " " + args.added_prompt
    negative_prompt = args.negative_prompt
    lowlevel_prompt = case["lowlevel_file"].splitlines()[0].lstrip() if case["lowlevel_file"] else ""

    validation_image = Image.open(folder / "lr.png").convert("RGB")
    sizes = dict(lr=list(validation_image.size))
    ori_width, ori_height = validation_image.size
    rscale = args.upscale
    validation_image = validation_image.resize((validation_image.size[0] * rscale, validation_image.size[1] * rscale))
    sizes["upscaled_pil_default_resample"] = list(validation_image.size)
    resized_to_process_size = min(validation_image.size) < args.process_size
    if resized_to_process_size:
        validation_image = transforms.Compose(
            [transforms.Resize(args.process_size, interpolation=transforms.InterpolationMode.BILINEAR)]
        )(validation_image)
    sizes["after_process_size_resize"] = list(validation_image.size)
    validation_image = validation_image.resize((validation_image.size[0] // 8 * 8, validation_image.size[1] // 8 * 8))
    sizes["condition_multiple_of_8"] = list(validation_image.size)
    validation_image.save(folder / "cond.png")

    # --- capture intermediates without changing the computation
    cap = {}
    orig_prepare_latents = pipe.prepare_latents
    orig_encode = AutoencoderKL.encode
    orig_unet_forward = pipe.unet.forward
    orig_cn_forward = pipe.controlnet.forward
    orig_step = pipe.scheduler.step
    orig_decode = AutoencoderKL.decode

    @functools.wraps(orig_prepare_latents)
    def prepare_latents(*a, **k):
        lat = orig_prepare_latents(*a, **k)
        cap["start_latents"] = lat.clone()
        return lat

    @functools.wraps(orig_encode)
    def encode(self, x, *a, **k):
        res = orig_encode(self, x, *a, **k)
        cap.setdefault("posterior_mean", res.latent_dist.mean.clone())
        cap.setdefault("posterior_std", res.latent_dist.std.clone())
        return res

    @functools.wraps(orig_cn_forward)
    def cn_forward(*a, **k):
        res = orig_cn_forward(*a, **k)
        if "step0_cn_mid_res" not in cap:
            cap["step0_cn_mid_res"] = res[3].clone()
            cap["step0_prompt_embeds"] = k["encoder_hidden_states"].clone()
            cap["step0_lowlevel_prompt_embeds"] = k["lowlevel_encoder_hidden_states"].clone()
        return res

    @functools.wraps(orig_unet_forward)
    def unet_forward(*a, **k):
        res = orig_unet_forward(*a, **k)
        if "step0_unet_eps" not in cap:
            cap["step0_unet_eps"] = res[0].clone()
        return res

    steps = []

    # functools.wraps keeps the signature: the pipeline inspects scheduler.step for `generator`
    @functools.wraps(orig_step)
    def step(model_output, t, sample, *a, **k):
        res = orig_step(model_output, t, sample, *a, **k)
        steps.append(int(t))
        if len(steps) == 1:
            cap["step0_guided_eps"] = model_output.clone()
            cap["step0_latents_out"] = res[0].clone()
        return res

    @functools.wraps(orig_decode)
    def decode(self, z, *a, **k):
        cap["vae_decode_input"] = z.clone()
        return orig_decode(self, z, *a, **k)

    pipe.prepare_latents = prepare_latents
    pipe.unet.forward = unet_forward
    pipe.controlnet.forward = cn_forward
    pipe.scheduler.step = step
    AutoencoderKL.encode = encode
    AutoencoderKL.decode = decode
    try:
        image = pipe(
            args,
            validation_prompt,
            validation_image,
            lowlevel_prompt=lowlevel_prompt,
            num_inference_steps=args.num_inference_steps,
            generator=generator,
            guidance_scale=args.guidance_scale,
            negative_prompt=negative_prompt,
            conditioning_scale=args.conditioning_scale,
        ).images[0]
    finally:
        AutoencoderKL.encode = orig_encode
        AutoencoderKL.decode = orig_decode
        del pipe.unet.forward, pipe.controlnet.forward, pipe.scheduler.step
    image.save(folder / "pipe_out.png")
    image = adain_color_fix(image, validation_image)  # test.py: always (if True)
    image = image.resize((ori_width * rscale, ori_height * rscale))  # resize_flag is always True
    sizes["sr"] = list(image.size)
    image.save(folder / "sr.png")

    # --- replay the generator to record its first draws and confirm the order of draws
    lat_shape = tuple(cap["posterior_mean"].shape)
    replay = torch.Generator().set_state(gen_state)
    draw_vae = torch.randn(lat_shape, generator=replay)
    draw_noise = torch.randn(lat_shape, generator=replay)
    draw_added = torch.randn(lat_shape, generator=replay)
    draw_step0 = torch.randn(lat_shape, generator=replay)
    sched = m["scheduler"]
    z0 = (cap["posterior_mean"] + cap["posterior_std"] * draw_vae) * vae.config.scaling_factor
    t0 = torch.tensor([steps[0]])
    z = sched.add_noise(z0, draw_noise, t0)
    z = sched.add_noise(z, draw_added, torch.tensor([args.added_noise_level]))
    replay_err = (z - cap["start_latents"]).abs().max().item()
    if replay_err > 1e-5:
        raise AssertionError(f"case {case_name}: replayed start latent differs by {replay_err}")

    # step 0 of DDPM with the 4th draw as its variance noise reproduces the captured latents
    from diffusers import DDPMScheduler

    check = DDPMScheduler.from_config(sched.config)
    check.set_timesteps(args.num_inference_steps)
    g4 = torch.Generator().set_state(gen_state)
    for _ in range(3):
        torch.randn(lat_shape, generator=g4)
    z1 = check.step(cap["step0_guided_eps"], steps[0], cap["start_latents"], generator=g4).prev_sample
    step_err = (z1 - cap["step0_latents_out"]).abs().max().item()
    if step_err > 1e-5:
        raise AssertionError(f"case {case_name}: step-0 replay differs by {step_err}")

    cap.update(draw_vae=draw_vae, draw_start_noise=draw_noise, draw_added_noise=draw_added, draw_step0_noise=draw_step0)
    check_finite(f"pipeline_{case_name}", cap)
    arr = np.asarray(image)
    if arr.std() < 1.0:
        raise AssertionError(f"case {case_name}: SR image is (nearly) constant")
    save_tensors(folder / "intermediates.safetensors", cap)

    info = dict(
        case=case_name,
        source=f"skimage.data.{case['image']}(), PIL crop box {list(case['crop'])}, resized with PIL BICUBIC to "
        f"{case['lr_size'][0]}x{case['lr_size'][1]} -> lr.png",
        highlevel_prompt_file=case["highlevel_file"],
        lowlevel_prompt_file=case["lowlevel_file"],
        prompt=validation_prompt,
        negative_prompt=negative_prompt,
        lowlevel_prompt=lowlevel_prompt,
        lowlevel_negative_prompt_in_pipeline=PIPELINE_LOWLEVEL_NEGATIVE,
        seed=args.seed,
        generator_initial_seed=initial_seed,
        set_seed_called=args.seed is not None,
        settings=dict(
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            conditioning_scale=args.conditioning_scale,
            added_noise_level=args.added_noise_level,
            process_size=args.process_size,
            upscale=args.upscale,
            init_latent_with_noise=args.init_latent_with_noise,
            offset_noise_scale=args.offset_noise_scale,
            latent_tiled_size=args.latent_tiled_size,
            latent_tiled_overlap=args.latent_tiled_overlap,
            encoder_tiled_size=args.encoder_tiled_size,
            decoder_tiled_size=args.decoder_tiled_size,
            mixed_precision=args.mixed_precision,
            scheduler="DDPMScheduler from base/scheduler",
            color_fix="adain_color_fix(pipeline output, condition image)",
            attention="torch SDPA (diffusers AttnProcessor2_0); their test.py asks for xformers",
        ),
        sizes_wh=sizes,
        resized_to_process_size=resized_to_process_size,
        latent_shape=list(lat_shape),
        scheduler_timesteps=steps,
        start_latent_replay_max_abs_err=replay_err,
        step0_replay_max_abs_err=step_err,
        intermediates={
            k: dict(shape=list(v.shape), dtype=str(v.dtype).replace("torch.", "")) for k, v in sorted(cap.items())
        },
        intermediates_notes=dict(
            posterior_mean=(
                "VAE posterior mean (unscaled) of vae.encode(cond*2-1), cond = cond.png as float/255 [1,3,H,W]"
            ),
            posterior_std="VAE posterior std (unscaled)",
            draw_vae="1st generator draw: posterior sample = mean + std*draw_vae, then x scaling_factor",
            draw_start_noise="2nd draw: add_noise at timesteps[0]",
            draw_added_noise="3rd draw: add_noise at added_noise_level (800)",
            draw_step0_noise="4th draw: DDPM variance noise of step 0 (one draw per step, t>0 at every step)",
            start_latents="prepare_latents output (x init_noise_sigma = 1)",
            step0_prompt_embeds="[2,77,32]: cat([negative_prompt, prompt]) CLIP embeddings",
            step0_lowlevel_prompt_embeds="[2,77,32]: cat(['high resolution, best quality, clear', lowlevel_prompt])",
            step0_cn_mid_res="ControlNet mid residual at step 0 (CFG batch of 2)",
            step0_unet_eps="UNet output at step 0, [uncond, cond]",
            step0_guided_eps="uncond + guidance_scale*(cond-uncond), passed to scheduler.step",
            step0_latents_out="latents after step 0",
            vae_decode_input="final latents / scaling_factor",
        ),
        files=dict(
            lr="lr.png: LR input",
            cond="cond.png: condition image given to the pipeline (after x4, process_size and multiple-of-8 resizes)",
            pipe_out="pipe_out.png: pipeline output image (before colour fix)",
            sr="sr.png: final output (AdaIN colour fix against cond.png, then PIL resize to 4x LR size)",
        ),
        sr_stats=dict(mean=float(arr.mean()), std=float(arr.std()), min=int(arr.min()), max=int(arr.max())),
    )
    (folder / "case.json").write_text(json.dumps(info, indent=1))
    return info


def run_train_loss(out: Path, m):
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    tok, te, vae, cn, unet, sched = (
        m[k] for k in ("tokenizer", "text_encoder", "vae", "controlnet", "unet", "scheduler")
    )
    to_tensor = transforms.ToTensor()
    # HR crops (96x64, WxH) and their degraded versions (x1/4 then x4, PIL bicubic), as the LocalImageDataset
    # would hand them over: pixel_values = ToTensor*2-1, conditioning_pixel_values = ToTensor (LR at HR size).
    hr_imgs = [
        load_rgb("astronaut").crop((120, 40, 312, 168)).resize((96, 64), Image.BICUBIC),
        load_rgb("chelsea").crop((100, 60, 292, 188)).resize((96, 64), Image.BICUBIC),
    ]
    lr_imgs = [im.resize((24, 16), Image.BICUBIC).resize((96, 64), Image.BICUBIC) for im in hr_imgs]
    hr_u8 = torch.stack([pil_to_u8(im) for im in hr_imgs])
    lr_u8 = torch.stack([pil_to_u8(im) for im in lr_imgs])
    pixel_values = u8_to_unit(hr_u8) * 2.0 - 1.0
    controlnet_image = u8_to_unit(lr_u8)
    assert torch.equal(controlnet_image[1], to_tensor(lr_imgs[1]))

    cn.train()
    unet.train()
    torch.manual_seed(SEED_TRAIN)
    with torch.no_grad():
        posterior = vae.encode(pixel_values).latent_dist
        post_mean, post_std = posterior.mean.clone(), posterior.std.clone()
        rng_before_sample = torch.get_rng_state()
        latents = posterior.sample()  # global RNG, as train.py
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = sched.add_noise(latents, noise, timesteps)

        ids_h, encoder_hidden_states = encode_text(tok, te, [""] * bsz)  # input_ids = tokenize("")
        ids_l, lowlevel_encoder_hidden_states = encode_text(tok, te, TRAIN_LOWLEVEL)

        dfc, dfc_mid, down, mid, rgbs = cn(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            lowlevel_encoder_hidden_states=lowlevel_encoder_hidden_states,
            controlnet_cond=controlnet_image,
            return_dict=False,
        )
        model_pred = unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            lowlevel_encoder_hidden_states=lowlevel_encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

        lambda_d = 0.05
        terms = []
        mse_loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        degradation_loss = torch.tensor(0.0)
        for i, values in enumerate(rgbs):
            target = F.interpolate(pixel_values, size=values.shape[-2:], mode="bilinear")
            l1 = F.l1_loss(target.float(), values.float(), reduction="mean")
            degradation_loss += lambda_d * l1
            terms.append(
                dict(
                    name=f"rgb.{i}",
                    output=f"rgb.{i}",
                    target="pixel_values",
                    size=list(values.shape[-2:]),
                    l1=l1.item(),
                    weighted=(lambda_d * l1).item(),
                )
            )
        for i, values in enumerate(dfc):
            target = F.interpolate(latents, size=values.shape[-2:], mode="bilinear")
            l1 = F.l1_loss(values.float(), target.float(), reduction="mean")
            degradation_loss += lambda_d * l1
            terms.append(
                dict(
                    name=f"latent_dfc.{i:02d}",
                    output=f"latent_dfc.{i:02d}",
                    target="latents",
                    size=list(values.shape[-2:]),
                    l1=l1.item(),
                    weighted=(lambda_d * l1).item(),
                )
            )
        target = F.interpolate(latents, size=dfc_mid.shape[-2:], mode="bilinear")
        l1 = F.l1_loss(dfc_mid.float(), target.float(), reduction="mean")
        degradation_loss += lambda_d * l1
        terms.append(
            dict(
                name="latent_dfc_mid",
                output="latent_dfc_mid",
                target="latents",
                size=list(dfc_mid.shape[-2:]),
                l1=l1.item(),
                weighted=(lambda_d * l1).item(),
            )
        )
        loss = mse_loss + degradation_loss
    cn.eval()
    unet.eval()

    # the posterior draw, reproduced from the recorded RNG state
    torch.set_rng_state(rng_before_sample)
    draw_vae = torch.randn(post_mean.shape)
    if not torch.allclose((post_mean + post_std * draw_vae) * vae.config.scaling_factor, latents, atol=1e-6):
        raise AssertionError("posterior draw replay mismatch")

    tensors = dict(
        hr_u8=hr_u8,
        lr_u8=lr_u8,
        posterior_mean=post_mean,
        posterior_std=post_std,
        draw_vae=draw_vae,
        latents=latents,
        noise=noise,
        timesteps=timesteps,
        noisy_latents=noisy_latents,
        ids_c_h=ids_h,
        ids_c_l=ids_l,
        c_h=encoder_hidden_states,
        c_l=lowlevel_encoder_hidden_states,
        model_pred=model_pred,
        latent_dfc_mid=dfc_mid,
        mse_loss=mse_loss,
        degradation_loss=degradation_loss,
        loss=loss,
    )
    for i, v in enumerate(dfc):
        tensors[f"latent_dfc.{i:02d}"] = v
    for i, v in enumerate(rgbs):
        tensors[f"rgb.{i}"] = v
    check_finite("train_loss", tensors)
    save_tensors(out / "train_loss.safetensors", tensors)
    doc = dict(
        file="train_loss.safetensors",
        recipe=[
            "pixel_values = hr_u8.float().div(255)*2-1 (HR in [-1,1], [2,3,64,96]); "
            "controlnet_image = lr_u8.float().div(255) (LR at HR size in [0,1]); "
            ".div(255) is exactly torchvision ToTensor",
            f"torch.manual_seed({SEED_TRAIN}) (global RNG), then in this order:",
            (
                "latents = vae.encode(pixel_values).latent_dist.sample() * scaling_factor  "
                "(draw 1: randn like posterior mean)"
            ),
            "noise = torch.randn_like(latents)  (draw 2)",
            "timesteps = torch.randint(0, 1000, (bsz,)).long()  (draw 3)",
            "noisy_latents = DDPMScheduler.add_noise(latents, noise, timesteps)",
            (
                "c_h = CLIP(tokenize(''))[0] for every sample "
                "(train.py: input_ids = tokenize(''); the high-level caption is not used)"
            ),
            "c_l = CLIP(tokenize(quality caption))[0]",
            "(latent_dfc[12], latent_dfc_mid, down_res[12], mid_res, rgb[3]) = "
            "controlnet(noisy_latents, timesteps, encoder_hidden_states=c_h, lowlevel_encoder_hidden_states=c_l, "
            "controlnet_cond=controlnet_image, return_dict=False)",
            "model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=c_h, "
            "lowlevel_encoder_hidden_states=c_l, "
            "down_block_additional_residuals=down_res, mid_block_additional_residual=mid_res).sample",
            "mse_loss = F.mse_loss(model_pred, noise, reduction='mean')  (epsilon prediction)",
            "degradation_loss = sum over rgb.0..2 of "
            "0.05*F.l1_loss(F.interpolate(pixel_values, size=rgb.shape[-2:], mode='bilinear'), rgb), "
            "then over latent_dfc.00..11 of "
            "0.05*F.l1_loss(latent_dfc, F.interpolate(latents, size=..., mode='bilinear')), "
            "then 0.05*F.l1_loss(latent_dfc_mid, F.interpolate(latents, ...)); "
            "accumulated in float32 in that order starting from tensor(0.0)",
            "loss = mse_loss + degradation_loss",
        ],
        interpolate=(
            "F.interpolate(..., mode='bilinear') with align_corners=None (= False) "
            "and antialias=False (torch defaults)"
        ),
        lambda_d=lambda_d,
        loss_kind="L1 (mean) for all 16 DFC terms (3 rgb + 12 latent + 1 mid); MSE (mean) for eps",
        n_terms=dict(rgb=len(rgbs), latent_dfc=len(dfc), latent_dfc_mid=1),
        terms=terms,
        mse_loss=mse_loss.item(),
        degradation_loss=degradation_loss.item(),
        loss=loss.item(),
        timesteps=timesteps.tolist(),
        prompts=dict(c_h=[""] * bsz, c_l=TRAIN_LOWLEVEL),
        images=dict(
            hr=[
                "skimage.data.astronaut() crop (120,40,312,168) -> 96x64 PIL BICUBIC",
                "skimage.data.chelsea() crop (100,60,292,188) -> 96x64 PIL BICUBIC",
            ],
            lr="HR -> 24x16 -> 96x64, PIL BICUBIC both ways",
        ),
        modes="controlnet.train(), unet.train() (as in train.py; dropout is 0 so it changes nothing), no grad",
        tensors=describe(tensors, list(tensors)),
    )
    (out / "train_loss.json").write_text(json.dumps(doc, indent=1))
    return doc


def main():
    a = parse_args()
    authors = a.authors_repo.resolve()
    out = a.out.resolve()
    tokenizer_dir = a.tokenizer.resolve()
    warnings.filterwarnings("ignore")
    zoo_check = check_against_zoo()

    sys.path.insert(0, str(authors))
    import accelerate
    import diffusers
    import numpy
    import PIL
    import torch
    import torchvision
    import transformers
    import yaml
    from transformers import CLIPTokenizer

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    torch.set_grad_enabled(False)

    # replace only what this script writes (README.md and .gitattributes beside it are kept)
    out.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    yaml_cfg = yaml.safe_load((authors / "configs" / "xpsr_test.yaml").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    keep_ids = fixture_token_ids(tokenizer, yaml_cfg["added_prompt"], yaml_cfg["negative_prompt"])

    base = build_base(out, tokenizer, keep_ids)
    ckpt, ckpt_info = build_checkpoint(out, base)
    m = load_models(base, ckpt, tokenizer_dir)
    run_forward(out, m)
    cases = {name: run_pipeline_case(out, m, name, yaml_cfg) for name in CASES}
    train = run_train_loss(out, m)

    authors_commit = a.authors_commit
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.relative_to(out).parts[0] in GENERATED and p.name != "manifest.json":
            files[str(p.relative_to(out))] = dict(bytes=p.stat().st_size, sha256=sha256(p))
    manifest = dict(
        generator="tools/official_reference.py",
        authors_repository="qyp2000/XPSR",
        authors_commit=authors_commit,
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            torchvision=torchvision.__version__,
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
            accelerate=accelerate.__version__,
            numpy=numpy.__version__,
            pillow=PIL.__version__,
        ),
        torch_threads=torch.get_num_threads(),
        shapes_check=zoo_check,
        seeds=dict(
            base=SEED_BASE,
            base_noise=SEED_BASE_NOISE,
            xpsr_noise=SEED_XPSR_NOISE,
            forward=SEED_FORWARD,
            train=SEED_TRAIN,
        ),
        text_encoder_nonzero_token_rows=keep_ids,
        checkpoint=ckpt_info,
        checkpoint_format=(
            "save_pretrained -> diffusion_pytorch_model.safetensors + config.json "
            "(diffusers 0.21.4 default safe_serialization=True)"
        ),
        cases={
            k: dict(seed=v["seed"], generator_initial_seed=v["generator_initial_seed"], sizes_wh=v["sizes_wh"])
            for k, v in cases.items()
        },
        train_loss=dict(loss=train["loss"], mse_loss=train["mse_loss"], degradation_loss=train["degradation_loss"]),
        files=files,
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(dict(out=str(out), files=len(files), total_bytes=sum(f["bytes"] for f in files.values()),
                          train_loss=manifest["train_loss"], cases=manifest["cases"]), indent=1))


if __name__ == "__main__":
    main()
