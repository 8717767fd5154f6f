"""Main-process cost of receiving a training batch: uint8 images (ours) vs float32 images with the
condition upsampled in the workers (the paper code's dataloader returns float ``pixel_values`` and
``conditioning_pixel_values`` at HR size).

    python benchmarks/bench_loader.py --data TRAINING_SHARDS [--batch 8 --workers 2 --batches 24]

Both streams read the same shards in the same order; the workers are given time to fill their
prefetch queues, so what is timed is the hand-over to the training process (unpickling and mapping
the shared-memory tensors), the part that competes with the training loop for the main thread.
On a GPU the float batch also has an 8x larger host-to-device copy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from xpsr_core.train.data import TrainingStream, images_on_device


class FloatImagesStream(TrainingStream):
    """The reference: images converted and the condition upsampled in the worker, handed over as float32."""

    def __iter__(self):
        for batch in super().__iter__():
            condition, hr = images_on_device(batch, torch.device("cpu"))
            yield {**{k: v for k, v in batch.items() if k not in ("lr", "hr")}, "condition": condition, "hr": hr}


def receive_ms(stream_class, shards, batch: int, workers: int, batches: int) -> tuple[float, int]:
    stream = stream_class(shards, batch, seed=0, shuffle_buffer=8)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=batches))
    first = next(loader)
    size = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
    time.sleep(2 + batches * batch * 0.05)  # the workers fill their queues
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        next(loader)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shards/train"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=24)
    args = parser.parse_args()
    shards = sorted(args.data.glob("*.tar"))
    reference, reference_bytes = receive_ms(FloatImagesStream, shards, args.batch, args.workers, args.batches)
    ours, ours_bytes = receive_ms(TrainingStream, shards, args.batch, args.workers, args.batches)
    print(f"batch {args.batch}, {args.workers} workers, median of {args.batches} hand-overs")
    print(f"float32 images (reference): {reference:6.1f} ms per batch, {reference_bytes / 2**20:6.1f} MiB")
    print(f"uint8 images (xpsr train) : {ours:6.1f} ms per batch, {ours_bytes / 2**20:6.1f} MiB")
    print(f"main-thread time saved    : {reference / ours:6.2f}x")


if __name__ == "__main__":
    main()
