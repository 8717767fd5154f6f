"""Frozen encoders of the base model: CLIP prompt embeddings and VAE latent moments.

Used once offline by the embed stage (pre-encoding) and by anything that must encode on the fly,
so both paths compute exactly the same tensors.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .text_conditioning import CLIP_WINDOW, WINDOW_TOKENS, caption_capacity, check_max_caption_tokens


def caption_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The CLIP token ids of each text, whole (no BOS/EOS, no truncation)."""
    return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False).input_ids


def window_token_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """[N * windows] rows of 77 ids: each text cut into 75-token windows, each as BOS + tokens + EOS + padding.

    A window past a text's end holds no tokens, which is exactly the empty prompt's window.
    """
    windows = max_tokens // CLIP_WINDOW
    rows = []
    for ids in caption_token_ids(tokenizer, texts):
        for window in range(windows):
            row = [tokenizer.bos_token_id, *ids[window * WINDOW_TOKENS : (window + 1) * WINDOW_TOKENS],
                   tokenizer.eos_token_id]
            rows.append(row + [tokenizer.pad_token_id] * (CLIP_WINDOW - len(row)))
    return rows


def encode_prompts(text_encoder, tokenizer, texts: Sequence[str], max_tokens: Optional[int] = None):
    """CLIP last hidden states [N, max_tokens, D] (float32) of ``texts``.

    At 77 (the default) each text is padded and truncated to one CLIP window. Above, every text becomes
    ``max_tokens / 77`` windows (:func:`window_token_ids`), encoded independently in one batch and concatenated.
    """
    if max_tokens is None or max_tokens == CLIP_WINDOW:
        tokens = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        input_ids = tokens.input_ids
    else:
        input_ids = torch.tensor(window_token_ids(tokenizer, texts, check_max_caption_tokens(max_tokens)))
    with torch.no_grad():
        hidden = text_encoder(input_ids.to(text_encoder.device))[0]
    return hidden.reshape(len(texts), -1, hidden.shape[-1]).float()


def truncation_notices(tokenizer, texts: dict[str, str], max_tokens: int) -> list[str]:
    """One line per text (by name) longer than the model reads at ``max_tokens``, naming the counts."""
    capacity = caption_capacity(max_tokens)
    notices = []
    for name, ids in zip(texts, caption_token_ids(tokenizer, list(texts.values()))):
        if len(ids) > capacity:
            notices.append(f"the {name} has {len(ids)} CLIP tokens; the model reads the first {capacity} "
                           f"(max_caption_tokens {max_tokens}), {len(ids) - capacity} are dropped")
    return notices


def encode_latent_moments(vae, hr):
    """VAE posterior moments [N, 2C, h, w] (mean then log-variance, float32) of HR images in [-1, 1].

    Storing the moments rather than one sampled latent lets training draw a fresh latent each step,
    exactly as encoding online would.
    """
    with torch.no_grad():
        return vae.encode(hr.to(vae.device, dtype=vae.dtype)).latent_dist.parameters.float()


def sample_latent(moments, scaling_factor: float, generator=None):
    """A scaled latent drawn from stored moments, as ``vae.encode(x).latent_dist.sample() * scale``."""
    distribution = DiagonalGaussianDistribution(moments)
    if generator is None:
        return distribution.sample() * scaling_factor
    noise = torch.randn(distribution.mean.shape, generator=generator, device=moments.device, dtype=moments.dtype)
    return (distribution.mean + distribution.std * noise) * scaling_factor


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
