"""Offline model zoo: Stable Diffusion 1.5 and LLaVA folders with random weights, in the real layouts.

Nothing here downloads anything. Two presets:

* ``tiny``: a small, randomly initialised SD-1.5 (same block structure as SD-1.5: four down
  blocks, three with cross-attention; a VAE with a downsampling factor of 8 and 4 latent
  channels; a CLIP text encoder with the real 49408-token vocabulary) and a tiny LLaVA captioner
  (tiny CLIP vision tower + tiny Llama). Everything runs on a 2-core CPU in seconds.
* ``sd15-shaped``: the same folders with the real SD-1.5 and LLaVA-1.5-7B shapes and random
  weights, for speed and memory benchmarks on a GPU.

Both are written with the libraries' own ``save_pretrained`` and load with their own
``from_pretrained`` (``HF_HUB_OFFLINE=1`` is fine). The CLIP BPE tokenizer is rebuilt from the
vocabulary that open_clip ships (``bpe_simple_vocab_16e6.txt.gz``), so real words map to the real
CLIP ids.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .errors import UserError
from .io.atomic import share_per_umask

SD_SUBFOLDER = "sd15"
CAPTIONER_SUBFOLDER = "captioner"
CLIP_VOCAB_SIZE = 49408
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

# A chat template in the llava-1.5 style ("USER: <image>\n... ASSISTANT:"), written for this project.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------
# CLIP BPE tokenizer, rebuilt offline
# --------------------------------------------------------------------------------------------


def _byte_alphabet() -> Dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte value mapped to a printable unicode character.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes map to code points 256+.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _open_clip_bpe_file() -> Path:
    try:
        import open_clip
    except ImportError:  # pragma: no cover - dependency of the project
        raise UserError(
            "open_clip_torch is not installed; it ships the CLIP BPE vocabulary the tiny zoo needs. "
            "Install the project's dependencies."
        ) from None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():  # pragma: no cover
        raise UserError(f"open_clip's CLIP vocabulary {path} is missing; reinstall open_clip_torch.")
    return path


def clip_vocab_and_merges() -> tuple[dict, list[str]]:
    """The CLIP vocabulary (token -> id, 49408 entries) and its BPE merges, from open_clip's file."""
    lines = gzip.open(_open_clip_bpe_file()).read().decode("utf-8").split("\n")
    # The file starts with a version line; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [line for line in lines[1 : 49152 - 256 - 2 + 1] if line]
    symbols = list(_byte_alphabet().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    if len(tokens) != CLIP_VOCAB_SIZE:  # pragma: no cover - guards against a changed upstream file
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(tokens)} entries, expected {CLIP_VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> Path:
    """Write vocab.json + merges.txt + tokenizer config for a real CLIP tokenizer and check it loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": CLIP_EOS,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}, indent=2
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"CLIP tokenizer written to {folder} has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}"
        )
    # Re-save through the library so tokenizer.json (fast backend) sits beside vocab/merges.
    tokenizer.save_pretrained(folder)
    return folder


CAPTION_BASE_VOCAB = 32000  # Llama/Vicuna size: 512 byte symbols + 31486 CLIP merges + BOS/EOS
CAPTION_MODEL_VOCAB = 32064  # llava-hf pads the text vocabulary (32000 + <image> + <pad>) to a multiple of 64


def build_caption_tokenizer(clip_folder: Path, base_vocab: int = CAPTION_BASE_VOCAB):
    """A causal-LM tokenizer for the captioner, built offline from the CLIP BPE (real words, real merges).

    CLIP's BPE is merge-ordered: token ``512 + k`` is produced by merge ``k`` from earlier tokens,
    so its first ``base_vocab - 2`` entries with their merges form a smaller, self-contained BPE.
    That gives a Llama-sized base vocabulary (32000 incl. BOS/EOS), then ``<image>`` and ``<pad>``.
    Same normaliser and pre-tokeniser as CLIP (lower-cases), byte-exact decoding; only BOS is
    prepended (prompts get no EOS); left padding for batched generation.
    """
    clip = CLIPTokenizer.from_pretrained(clip_folder)
    vocab, merges = clip_vocab_and_merges()
    keep = base_vocab - 2
    if keep <= 512:
        raise ValueError("base_vocab must leave room for the 512 byte-level symbols")
    by_id = sorted(vocab.items(), key=lambda item: item[1])[:keep]
    sub_vocab = {token: index for token, index in by_id}
    sub_vocab[CLIP_BOS] = keep
    sub_vocab[CLIP_EOS] = keep + 1
    sub_merges = [tuple(m.split()) for m in merges[: keep - 512]]
    backend = Tokenizer(BPE(vocab=sub_vocab, merges=sub_merges, end_of_word_suffix="</w>", unk_token=None))
    source = clip.backend_tokenizer
    backend.normalizer = source.normalizer
    backend.pre_tokenizer = source.pre_tokenizer
    # Byte-exact decoding: the end-of-word marker becomes the byte-level space, then bytes -> text.
    backend.decoder = decoders.Sequence(
        [decoders.Replace("</w>", "\u0120"), decoders.ByteLevel(), decoders.Strip(" ", 0, 1)]
    )
    backend.add_special_tokens([CLIP_BOS, CLIP_EOS])
    backend.post_processor = TemplateProcessing(
        single=f"{CLIP_BOS} $A", pair=f"{CLIP_BOS} $A $B", special_tokens=[(CLIP_BOS, keep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooPreset:
    name: str
    unet: Dict[str, Any]
    vae: Dict[str, Any]
    text_encoder: Dict[str, Any]
    vision: Dict[str, Any]
    llm: Dict[str, Any]
    image_size: int  # captioner input size
    dtype: str = "float32"
    extra: Dict[str, Any] = field(default_factory=dict)


_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4

TINY = ZooPreset(
    name="tiny",
    unet=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=16,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=_VAE_DOWN,
        up_block_types=_VAE_UP,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=128,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
    ),
    # one head of 32 channels in the vision tower and the Llama: vLLM's CPU attention takes head sizes of 32 and up
    vision=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
    ),
    llm=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    ),
    image_size=32,
)

SD15_SHAPED = ZooPreset(
    name="sd15-shaped",
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=_VAE_DOWN,
        up_block_types=_VAE_UP,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 vision tower + Vicuna-7B (Llama-2 7B shapes).
    vision=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    llm=dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    image_size=336,
    dtype="float16",
)

PRESETS = {TINY.name: TINY, SD15_SHAPED.name: SD15_SHAPED}

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def get_preset(name: str) -> ZooPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"Unknown model zoo preset {name!r}; choose one of: {', '.join(PRESETS)}.") from None


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _dtype(name: str):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_sd_components(preset: ZooPreset, seed: int = 0, device: str = "cpu"):
    """Random SD-1.5-layout components (unet, vae, text_encoder, scheduler) for ``preset``."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(_dtype(preset.dtype)):
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        text_config = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **preset.text_encoder)
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), scheduler=scheduler)


def write_sd(
    folder: Path, preset: ZooPreset, seed: int = 0, device: str = "cpu", tokenizer_from: Path | None = None
) -> Path:
    """Write a diffusers SD-1.5 folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    ``device="cuda"`` draws the random weights on the GPU (SD-1.5 shapes: 12-14 s, saving included, on an H200).
    ``tokenizer_from`` reuses a CLIP tokenizer folder instead of building one from open_clip's vocabulary.
    """
    folder = Path(folder)
    if tokenizer_from is None:
        tokenizer_dir = write_clip_tokenizer(folder / "tokenizer")
    else:
        tokenizer_dir = Path(tokenizer_from)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    parts = build_sd_components(preset, seed=seed, device=device)
    pipe = StableDiffusionPipeline(
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def captioner_configs(preset: ZooPreset, vocab_size: int, image_token_id: int, bos_id: int, eos_id: int, pad_id: int):
    """(LlavaConfig, image_seq_length) for ``preset``."""
    vision = CLIPVisionConfig(**preset.vision)
    text = LlamaConfig(
        vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, **preset.llm
    )
    patches = (preset.vision["image_size"] // preset.vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = pad_id
    return config, patches


def write_captioner(folder: Path, preset: ZooPreset, clip_tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a llava-hf style folder: config, weights, processor (image processor + tokenizer + chat template)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_caption_tokenizer(clip_tokenizer_dir)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config, patches = captioner_configs(
        preset,
        max(CAPTION_MODEL_VOCAB, len(tokenizer)),
        image_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with _default_dtype(_dtype(preset.dtype)):  # built directly in the target dtype: a 7B model has no fp32 copy
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
    )
    model.eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    _write_llava_hf_names(folder)
    size = preset.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.vision["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder


# transformers saves the CLIP vision tower without its inner module name; llava-hf checkpoints (and other engines
# that load them, such as vLLM) have it. transformers loads either.
VISION_TOWER = "vision_tower."
LLAVA_HF_VISION_TOWER = "vision_tower.vision_model."


def _write_llava_hf_names(folder: Path) -> None:
    """Rename the saved weights of ``folder`` to llava-hf's names, shard by shard (and in the shard index)."""
    def renamed(key: str) -> str:
        if key.startswith(VISION_TOWER) and not key.startswith(LLAVA_HF_VISION_TOWER):
            return LLAVA_HF_VISION_TOWER + key[len(VISION_TOWER):]
        return key

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            metadata = weights.metadata()
            tensors = {renamed(key): weights.get_tensor(key) for key in weights.keys()}
        save_file(tensors, shard, metadata=metadata)
        del tensors
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        record = json.loads(index.read_text())
        record["weight_map"] = {renamed(key): file for key, file in record["weight_map"].items()}
        index.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@dataclass
class ZooResult:
    root: Path
    sd: Path
    captioner: Path
    preset: str


def write_zoo(out: Path, preset_name: "str | ZooPreset" = "tiny", seed: int = 0, overwrite: bool = False) -> ZooResult:
    """Write ``out/sd15`` (diffusers SD-1.5 layout) and ``out/captioner`` (llava-hf layout)."""
    preset = preset_name if isinstance(preset_name, ZooPreset) else get_preset(preset_name)
    out = Path(out)
    targets = [out / SD_SUBFOLDER, out / CAPTIONER_SUBFOLDER]
    if any(t.exists() and any(t.iterdir()) for t in targets):
        if not overwrite:
            raise UserError(
                f"{out} already holds a model zoo. Rerun with --overwrite to replace it, or choose another folder."
            )
        for t in targets:
            if t.exists():
                shutil.rmtree(t)
    sd = write_sd(out / SD_SUBFOLDER, preset, seed=seed)
    captioner = write_captioner(out / CAPTIONER_SUBFOLDER, preset, sd / "tokenizer", seed=seed + 1)
    (out / "zoo.json").write_text(
        json.dumps(
            {"preset": preset.name, "seed": seed, "sd": SD_SUBFOLDER, "captioner": CAPTIONER_SUBFOLDER}, indent=2
        )
    )
    for written in (sd, captioner):  # safetensors writes 0600
        share_per_umask(written)
    return ZooResult(root=out, sd=sd, captioner=captioner, preset=preset.name)


def parameter_counts(preset_name: str) -> Dict[str, int]:
    """Parameter counts of every model of a preset, built on the meta device (no memory, no weights)."""
    preset = get_preset(preset_name)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**preset.unet),
            "vae": AutoencoderKL(**preset.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**preset.text_encoder)),
        }
        config, _ = captioner_configs(
            preset,
            CAPTION_MODEL_VOCAB,
            CAPTION_BASE_VOCAB + 1,
            CAPTION_BASE_VOCAB - 2,
            CAPTION_BASE_VOCAB - 1,
            CAPTION_BASE_VOCAB,
        )
        models["captioner"] = LlavaForConditionalGeneration(config)
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
