"""Batched content and quality captions from a LLaVA-style model.

Any image-text-to-text model whose processor ships a chat template loads through transformers'
Auto classes (llava-hf LLaVA-1.5 by default, LLaVA-NeXT and similar alike). For each image the
two instructions of the paper are rendered with the chat template and run in the same batch,
left-padded, so a batch of B images is one generate() call over 2B prompts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPTokenizer, LogitsProcessorList

from ..errors import UserError
from ..io.model_files import is_local_source, loading_model
from .settings import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, GenerationSettings  # noqa: F401 (re-exported)


class SeededSampler:
    """Samples each row of a batch from its own generator (seeded per key), so a sampled caption never
    depends on its batch-mates or on global RNG state. A logits processor: it applies temperature and
    top-p, draws the row's token, and leaves only that token possible, so the (greedy) decoding step
    that follows takes it."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device="cpu"):
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]

    def __call__(self, input_ids, scores):
        logits = scores.float().cpu() / max(self.temperature, 1e-6)
        chosen = []
        for row, generator in zip(logits, self.generators):
            probs = torch.softmax(row, dim=-1)
            if self.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                keep = (ordered.cumsum(0) - ordered) < self.top_p  # the smallest set reaching top_p (at least one)
                keep[0] = True
                probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
            chosen.append(int(torch.multinomial(probs, 1, generator=generator)))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), torch.tensor(chosen)] = 0.0
        return out


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def model_revision(path: str | Path) -> str:
    """A revision id for a model: the hub commit when known, else a hash of the folder's config and weight files."""
    folder = Path(path)
    if not folder.is_dir():
        return "hub"
    digest = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".txt")):
        file = folder / name
        digest.update(name.encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
        else:  # weights are large: their size stands in for their content
            digest.update(str(file.stat().st_size).encode())
    return "local-" + digest.hexdigest()[:16]


class Captioner:
    """Loads a captioning model once and captions batches of PIL images with several instructions."""

    def __init__(
        self,
        model: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        settings: GenerationSettings | None = None,
        trust_remote_code: bool = False,
    ):
        """``trust_remote_code`` runs the model folder's own Python code (only for models that need it)."""
        self.model_id = str(model)
        self.settings = settings or GenerationSettings()
        self.device = device
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        hint = ("It must be an image-text-to-text model folder in the Hugging Face layout (config.json, weights, "
                "processor and tokenizer files with a chat template), e.g. llava-hf/llava-1.5-7b-hf; "
                "`xpsr models tiny --out DIR` builds a tiny one.")
        if is_local_source(model) and not Path(os.path.expanduser(str(model))).is_dir():
            raise UserError(f"The captioner folder {model} does not exist. {hint}")
        # TypeError: a processor or model class that rejects the folder's recorded arguments
        with loading_model("a captioner", model, hint, also=(TypeError,)):
            self.processor = AutoProcessor.from_pretrained(model, **remote)
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype), **remote)
        tokenizer = getattr(self.processor, "tokenizer", None)
        has_template = getattr(self.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if tokenizer is None or not has_template:
            raise UserError(f"The captioner at {model} has no chat template; prompts cannot be built for it.")
        tokenizer.padding_side = "left"  # generation continues from the right edge of every prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model.to(device).eval()
        self.revision = model_revision(model)

    def prompt(self, instruction: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def caption(self, images: Sequence, instructions: Sequence[str]) -> list[list[str]]:
        """Captions[i][j] for image i and instruction j; all prompts of an image share one batch.

        On a GPU out-of-memory error the batch is split in halves and retried.
        """
        prompts = [self.prompt(text) for text in instructions]
        items = [(image, prompt) for image in images for prompt in prompts]
        texts = self._generate(items)
        width = len(prompts)
        return [texts[i * width : (i + 1) * width] for i in range(len(images))]

    def caption_pairs(self, pairs: Sequence[tuple], seeds: Sequence[int] | None = None) -> list[str]:
        """One caption per (image, instruction) pair, all in one batch (split in halves on out-of-memory).

        With sampling on (``do_sample``, one beam), ``seeds`` (one per pair, e.g. from (seed, stage, key))
        seed each caption's own draws, so it does not depend on its batch-mates."""
        if not pairs:
            return []
        prompts = {text: self.prompt(text) for text in dict.fromkeys(text for _, text in pairs)}
        items = [(image, prompts[text]) for image, text in pairs]
        if seeds is None or not self.settings.do_sample:  # greedy decoding draws nothing
            return self._generate(items)
        return self._generate(items, list(seeds))

    def _generate(self, items: list, seeds: list[int] | None = None) -> list[str]:
        kwargs = self.settings.generate_kwargs()
        if seeds is not None and self.settings.do_sample and self.settings.num_beams == 1:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p")}
            kwargs.update(do_sample=False, logits_processor=LogitsProcessorList(
                [SeededSampler(seeds, self.settings.temperature, self.settings.top_p)]))
        try:
            inputs = self.processor(
                images=[i for i, _ in items], text=[p for _, p in items], padding=True, return_tensors="pt"
            )
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                output = self.model.generate(**inputs, **kwargs, pad_token_id=self.processor.tokenizer.pad_token_id)
        except Exception as error:
            if not _is_out_of_memory(error) or len(items) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(items) // 2
            halves = (seeds[:half], seeds[half:]) if seeds is not None else (None, None)
            return self._generate(items[:half], halves[0]) + self._generate(items[half:], halves[1])
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def clip_token_counter(base_model: str | Path) -> tuple[Callable[[str], int], int]:
    """(count, limit): the base model's CLIP tokenizer's token count of a text (BOS/EOS included) and its limit."""
    folder = Path(base_model)
    source = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"Cannot load the base model's CLIP tokenizer from {source}: {error}") from None
    limit = int(tokenizer.model_max_length)

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False)["input_ids"])

    return count, limit
