"""Per-sample randomness: every draw comes from a generator seeded by (global seed, stage, key).

Seeds never depend on global RNG state, the number of workers or the batch a sample lands in,
so a sample's random choices are the same however the work is split.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, stage: str, key: str) -> int:
    """A 63-bit integer seed that is a stable function of (seed, stage, key)."""
    # surrogateescape: a key built from a non-UTF-8 file name seeds from its exact bytes (others encode as UTF-8)
    digest = hashlib.blake2b(f"{seed}\x1f{stage}\x1f{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def numpy_rng(seed: int, stage: str, key: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stage, key))


def torch_generator(seed: int, stage: str, key: str, device: str = "cpu"):
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, stage, key))
    return generator
