"""Training samples/s with pre-encoded embeddings and latents vs encoding on the fly.

The reference is the paper code's practice: every step runs the CLIP text encoder on both
captions and the VAE encoder on the HR batch. Ours reads the fp16 embeddings and the VAE
posterior moments that `xpsr embed` stored. Same model, data, batch and steps, one process.

    python benchmarks/bench_train.py --data data/shards/train --base-model models/tiny/sd15 [--steps 30 --batch 4]
    python benchmarks/bench_train.py --mid [--pairs data/shards/pairs --captions manifests/captions]

``--mid`` builds a base model with SD-1.5's proportions at a fifth to a quarter of its width (UNet 1/5, VAE and text encoder 1/4; 
the tiny zoo's VAE and text encoder are relatively much smaller than
SD-1.5's), embeds the pair shards with it, and compares on that.

On a GPU add --mixed-precision bf16 and point --base-model at `xpsr models sd15-shaped` output
(training shards embedded with that model).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from xpsr_core.train.loop import Trainer
from xpsr_core.train.settings import TrainConfig


def samples_per_second(data: Path, base_model: str, steps: int, batch: int, online: bool, mixed_precision: str) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp())
    config = TrainConfig(
        train_dir=data, base_model=base_model, out=out, batch_size=batch, max_train_steps=steps + 2, online_encoding=online,
        checkpointing_steps=10**9, tensorboard=False, metrics_file=None, mixed_precision=mixed_precision, shuffle_buffer=8,
    )
    trainer = Trainer(config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = trainer.train()
    log = (out / "train_log.tsv").read_text().splitlines()[1:]
    columns = (out / "train_log.tsv").read_text().splitlines()[0].split("\t")
    rates = [float(line.split("\t")[columns.index("samples_per_s")]) for line in log][2:]  # skip warm-up steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    del trainer, report
    # harmonic mean of per-step rates = total samples / total time
    return len(rates) / sum(1 / r for r in rates), peak


def mid_size_data(pairs: Path, captions: Path) -> tuple[Path, str]:
    """A quarter-width SD-1.5-proportioned base model, and training shards embedded with it."""
    import dataclasses

    from stages import embed
    from xpsr_core.zoo import SD15_SHAPED, write_sd

    preset = dataclasses.replace(
        SD15_SHAPED,
        name="mid",
        dtype="float32",
        unet={**SD15_SHAPED.unet, "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 192, "sample_size": 32},
        vae={**SD15_SHAPED.vae, "block_out_channels": (32, 64, 128, 128), "sample_size": 256},
        text_encoder={**SD15_SHAPED.text_encoder, "hidden_size": 192, "intermediate_size": 768, "projection_dim": 192},
    )
    root = Path(tempfile.mkdtemp())
    sd = write_sd(root / "sd15", preset)
    embed.run(embed.EmbedConfig(pairs_dir=pairs, captions_dir=captions, out=root / "train", base_model=str(sd), batch_size=8))
    return root / "train", str(sd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shards/train"))
    parser.add_argument("--base-model", default="models/tiny/sd15")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--mid", action="store_true", help="SD-1.5 proportions at a quarter width (see above)")
    parser.add_argument("--pairs", type=Path, default=Path("data/shards/pairs"))
    parser.add_argument("--captions", type=Path, default=Path("manifests/captions"))
    args = parser.parse_args()
    if args.mid:
        args.data, args.base_model = mid_size_data(args.pairs, args.captions)
    online, online_peak = samples_per_second(args.data, args.base_model, args.steps, args.batch, True, args.mixed_precision)
    ours, ours_peak = samples_per_second(args.data, args.base_model, args.steps, args.batch, False, args.mixed_precision)
    print(f"base model: {args.base_model}  batch {args.batch}  steps {args.steps} (+2 warm-up)  precision {args.mixed_precision}")
    print(f"encode on the fly (reference): {online:8.3f} samples/s   peak GPU {online_peak:.2f} GiB")
    print(f"pre-encoded (xpsr train)     : {ours:8.3f} samples/s   peak GPU {ours_peak:.2f} GiB")
    print(f"speed-up                     : {ours / online:8.2f}x")


if __name__ == "__main__":
    main()
