"""Captions per second: the batched captioner against one prompt of one image at a time.

The reference is the practice of the paper's scripts: for each image, for each instruction,
build one prompt, run the processor and generate() alone. Ours renders both instructions of
every image into one left-padded batch. Same model, images, instructions and greedy settings.

    python benchmarks/bench_caption.py [--model DIR --base-model DIR] [--images 32 --batch 16 --tokens 32]

Without --model the tiny zoo is built in a temporary folder. On a GPU pass --device cuda --dtype bfloat16
with a folder from `xpsr models sd15-shaped`.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from stages.demo_data import DEMO_IMAGES, load_sample
from xpsr_core.caption import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, Captioner, GenerationSettings


def lr_images(count: int, size: int) -> list[Image.Image]:
    """LR-sized crops of the real demo photographs, cycling through them."""
    images = []
    for i in range(count):
        pixels = load_sample(DEMO_IMAGES[i % len(DEMO_IMAGES)])
        side = min(pixels.shape[:2])
        offset = (i // len(DEMO_IMAGES)) * 7 % max(side // 4, 1)
        images.append(
            Image.fromarray(pixels[offset : offset + side // 2, offset : offset + side // 2]).resize(
                (size, size), Image.BICUBIC
            )
        )
    return images


def one_at_a_time(captioner: Captioner, images, instructions) -> list[list[str]]:
    results = []
    for image in images:
        results.append([captioner.caption([image], [instruction])[0][0] for instruction in instructions])
    return results


def batched(captioner: Captioner, images, instructions, batch: int) -> list[list[str]]:
    results = []
    for start in range(0, len(images), batch):
        results.extend(captioner.caption(images[start : start + batch], instructions))
    return results


def timed(function, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="LR image size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from xpsr_core.zoo import write_zoo

        model = write_zoo(Path(tempfile.mkdtemp()) / "zoo", "tiny").captioner
    settings = GenerationSettings(max_new_tokens=args.tokens)
    captioner = Captioner(model, dtype=args.dtype, device=args.device, settings=settings)
    images = lr_images(args.images, args.size)
    instructions = [CONTENT_INSTRUCTION, QUALITY_INSTRUCTION]
    batched(captioner, images[:2], instructions, 2)  # warm-up
    reference, reference_s = timed(one_at_a_time, captioner, images, instructions)
    ours, ours_s = timed(batched, captioner, images, instructions, args.batch)
    captions = 2 * len(images)
    same = sum(a == b for r, o in zip(reference, ours) for a, b in zip(r, o))
    print(f"model: {model}  device: {args.device} {args.dtype}  images: {len(images)}  max_new_tokens: {args.tokens}")
    print(f"one prompt at a time : {captions / reference_s:8.2f} captions/s  ({reference_s:.2f} s)")
    print(f"batched (batch {args.batch:>3}) : {captions / ours_s:8.2f} captions/s  ({ours_s:.2f} s)")
    print(f"speed-up             : {reference_s / ours_s:8.2f}x")
    print(f"identical captions   : {same}/{captions} (greedy; padding may change the last digits of logits)")
    print(f"peak RSS             : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (whole process)")
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        print(f"peak GPU memory      : {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
