"""Frozen encoders of the base model: CLIP prompt embeddings and VAE latent moments.

Used once offline by the embed stage (pre-encoding) and by anything that must encode on the fly,
so both paths compute exactly the same tensors.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

NEGATIVE_PROMPT = "blurry, dotted, noise, unclear, low-res, over-smoothed"


def encode_prompts(text_encoder, tokenizer, texts: Sequence[str]):
    """CLIP last hidden states [N, 77, D] (float32) of ``texts``, padded and truncated to the model's limit."""
    import torch

    tokens = tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids.to(text_encoder.device))[0]
    return hidden.float()


def encode_latent_moments(vae, hr):
    """VAE posterior moments [N, 2C, h, w] (mean then log-variance, float32) of HR images in [-1, 1].

    Storing the moments rather than one sampled latent lets training draw a fresh latent each step,
    exactly as encoding online would.
    """
    import torch

    with torch.no_grad():
        return vae.encode(hr.to(vae.device, dtype=vae.dtype)).latent_dist.parameters.float()


def sample_latent(moments, scaling_factor: float, generator=None):
    """A scaled latent drawn from stored moments, as ``vae.encode(x).latent_dist.sample() * scale``."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

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
