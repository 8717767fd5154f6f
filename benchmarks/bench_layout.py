"""Channels-last weights against PyTorch's default layout on the CPU, side by side in one process.

On the CPU the library stores every UNet, VAE, ControlNet and DFC weight channels-last
(``xpsr_core.models.loading.channels_last_on_cpu``). This times what that gives, on the tiny zoo:

* the VAE encoder on a batch of HR crops (``xpsr embed``, and the on-the-fly reference loop),
* one training step of ``xpsr train`` (``Trainer.micro_step``: pre-encoded data, forward, backward,
  clipping, fused AdamW),
* one super-resolution (``xpsr sr``) of a 64 px LR image to 256 px.

The two layouts alternate round by round so that drifting load on a shared machine hits both alike;
each figure is the median over the rounds.

    python benchmarks/bench_layout.py [--base-model models/tiny/sd15] [--data data/shards/train] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LAYOUTS = {"default (NCHW)": torch.contiguous_format, "channels-last": torch.channels_last}


def timed_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def alternate(cases: dict, rounds: int) -> dict:
    """``cases``: layout name -> zero-argument callable. Median ms per layout, layouts taking turns."""
    for fn in cases.values():  # warm-up: oneDNN primitives, allocator
        fn()
    times: dict = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(timed_ms(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def vae_cases(base_model: str, batch: int, size: int) -> dict:
    from xpsr_core.encoding import encode_latent_moments
    from xpsr_core.models import load_base_sd

    vaes = {
        name: load_base_sd(base_model, components=("vae",)).vae.to(memory_format=fmt) for name, fmt in LAYOUTS.items()
    }
    hr = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {name: (lambda vae=vae: encode_latent_moments(vae, hr)) for name, vae in vaes.items()}


def training_cases(base_model: str, data: Path, batch: int) -> dict:
    from xpsr_core.train.data import TrainingStream
    from xpsr_core.train.loop import Trainer
    from xpsr_core.train.settings import TrainConfig

    stream = iter(TrainingStream(sorted(data.glob("*.tar")), batch, seed=0, shuffle_buffer=1))
    batches = [next(stream) for _ in range(4)]
    cases = {}
    for name, fmt in LAYOUTS.items():
        config = TrainConfig(input_dir=data, base_model=base_model, out=Path(tempfile.mkdtemp()), batch_size=batch,
                             tensorboard=False, metrics_file=None)
        trainer = Trainer(config)
        trainer._trainable().to(memory_format=fmt)  # before the first step creates AdamW's state
        trainer.model.train()
        counter = iter(range(10**9))

        def step(trainer=trainer, counter=counter):
            index = next(counter)
            trainer.micro_step(batches[index % len(batches)], index, 0)

        cases[name] = step
    return cases


def sr_cases(base_model: str, lr_size: int, steps: int) -> dict:
    from xpsr_core.infer import SRSettings, XPSRPipeline
    from xpsr_core.models import XPSRModel, load_base_sd

    base = load_base_sd(base_model)
    pipe = XPSRPipeline.from_model(XPSRModel.from_base(base, with_dfc=False), base, SRSettings(steps=steps))
    lr = (np.random.default_rng(0).random((lr_size, lr_size, 3)) * 255).astype(np.uint8)

    def run(fmt):
        pipe.model.to(memory_format=fmt)
        pipe.vae.to(memory_format=fmt)
        pipe.upscale(lr, "a photo", "sharp")

    return {name: (lambda fmt=fmt: run(fmt)) for name, fmt in LAYOUTS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="models/tiny/sd15")
    parser.add_argument("--data", type=Path, default=Path("data/shards/train"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sr-steps", type=int, default=4)
    args = parser.parse_args()
    print(
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, base model {args.base_model}; "
        f"median ms of {args.rounds} rounds"
    )
    rows = [
        (f"VAE encoder, {args.batch} x 256 px", vae_cases(args.base_model, args.batch, 256)),
        (f"training step, batch {args.batch}", training_cases(args.base_model, args.data, args.batch)),
        (f"SR 64 -> 256 px, {args.sr_steps} steps", sr_cases(args.base_model, 64, args.sr_steps)),
    ]
    default, fast = LAYOUTS
    for label, cases in rows:
        ms = alternate(cases, args.rounds)
        print(
            f"{label:34s} {default} {ms[default]:8.1f} ms | {fast} {ms[fast]:8.1f} ms | "
            f"speed-up {ms[default] / ms[fast]:5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
