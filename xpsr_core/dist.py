"""Rank sharding for multi-process stages started by torchrun or accelerate launch.

Each rank takes the shards whose number is congruent to its rank; results merge by shard id,
so no shard is processed twice and the union equals a single-process run.
"""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent RANK={rank} / WORLD_SIZE={world} in the environment")
    return rank, world


def shards_for_rank(shards: list[int], rank: int, world: int) -> list[int]:
    return [s for s in shards if s % world == rank]


def rank_device(device: str) -> str:
    """The device this process should use: under a launcher, plain ``cuda`` means this rank's GPU;
    ``auto`` means that GPU when PyTorch sees one, else the CPU.

    Raises UserError when a GPU is asked for and PyTorch sees none.
    """
    if device != "auto" and not device.startswith("cuda"):
        return device
    import torch

    from .errors import UserError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            return device
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {device} was asked for, but PyTorch sees no CUDA GPU on this machine. Use --device cpu."
        )
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
