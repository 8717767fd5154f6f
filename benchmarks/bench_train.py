"""Training samples/s with pre-encoded embeddings and latents vs encoding on the fly.

The reference is the paper code's practice: every step runs the CLIP text encoder on both
captions and the VAE encoder on the HR batch. Ours reads the fp16 embeddings and the VAE
posterior moments that `xpsr embed` stored. Same model, data, batch and steps, one process.

    python benchmarks/bench_train.py --data data/shards/train --base-model models/tiny/sd15
        [--steps 30 --batches 4 --rounds 3]
    python benchmarks/bench_train.py --build mid [--pairs data/shards/pairs --captions manifests/captions]
    python benchmarks/bench_train.py --build sd15 --mixed-precision bf16 --batches 4 8 --workers 4   # on a GPU
    python benchmarks/bench_train.py --flops   # the work alone, any machine, seconds

``--build mid`` builds a base model with SD-1.5's proportions at a fifth to a quarter of its width
(UNet 1/5, VAE and text encoder 1/4; the tiny zoo's VAE and text encoder are relatively much smaller
than SD-1.5's), embeds the pair shards with it, and compares on that. ``--build sd15`` does the same
with SD-1.5's real shapes (random weights drawn on the GPU when there is one); give it pair shards
with 512 px HR crops for the paper's setting. ``--json`` also writes every figure to a file.
``--flops`` counts the work of a training step and of the encoders at tiny, mid and SD-1.5 shapes:
the speed-up that removing the encoders can give on hardware that runs both equally well.

``--recipes`` compares training recipes instead (pre-encoded, same data, optimizer and prompts):

    python benchmarks/bench_train.py --recipes default official --steps 20 --batches 2 4 --rounds 3
    python benchmarks/bench_train.py --recipes default official --build mid --steps 8 --batches 2 --rounds 2

``default`` is TrainConfig's defaults; ``official`` the authors' architecture and objective
(``XPSRSettings.official()``: CA_f and the pixel attentions as full transformers, 13 latent DFC heads
on the post-zero-conv residuals + 3 RGB, bilinear DFC targets, their initialisation). Each recipe
runs in a fresh process, the recipes taking turns round by round; it reports the median samples/s,
the ratio of each recipe to the first, the CPU seconds per sample (steadier than wall time on shared
cores with ``--threads 1``), and the peak memory: the process's peak RSS and, on CUDA,
``torch.cuda.max_memory_allocated``. ``--threads N`` sets torch's threads in every measured process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xpsr_core.train.loop import Trainer
from xpsr_core.train.settings import TrainConfig


def recipe_options(name: str) -> dict:
    """TrainConfig options of a training recipe: ``default`` (none) or ``official`` (the fields where
    ``XPSRSettings.official()`` differs from the default settings)."""
    if name == "default":
        return {}
    from xpsr_core.models import XPSRSettings

    official, default = dataclasses.asdict(XPSRSettings.official()), dataclasses.asdict(XPSRSettings())
    return {k: v for k, v in official.items() if v != default[k] and k in TrainConfig.model_fields}


RECIPES = ("default", "official")


def samples_per_second(data: Path, base_model: str, steps: int, batch: int, online: bool, mixed_precision: str,
                       workers: int, recipe: str = "default") -> tuple[float, float, float]:
    """(samples/s, peak GPU GiB or nan, CPU seconds per sample) over the steps after two warm-up steps. The CPU
    seconds are this process's (all its threads): with one torch thread they barely depend on what else loads the
    cores."""
    out = Path(tempfile.mkdtemp())
    config = TrainConfig(
        input_dir=data,
        base_model=base_model,
        out=out,
        batch_size=batch,
        max_train_steps=steps + 2,
        online_encoding=online,
        checkpointing_steps=10**9,
        tensorboard=False,
        metrics_file=None,
        mixed_precision=mixed_precision,
        shuffle_buffer=8,
        num_workers=workers,
        **recipe_options(recipe),
    )
    trainer = Trainer(config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cpu = {}
    trainer.train(after_step=lambda step: cpu.__setitem__(step, time.process_time()))
    log = (out / "train_log.tsv").read_text().splitlines()[1:]
    columns = (out / "train_log.tsv").read_text().splitlines()[0].split("\t")
    rates = [float(line.split("\t")[columns.index("samples_per_s")]) for line in log][2:]  # skip warm-up steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    cpu_per_sample = (cpu[steps + 2] - cpu[2]) / (steps * batch)
    # harmonic mean of per-step rates = total samples / total time
    return len(rates) / sum(1 / r for r in rates), peak, cpu_per_sample


def frozen_encoders(base_model: str, mixed_precision: str):
    """The VAE and text encoder, loaded as the on-the-fly reference loads them."""
    from xpsr_core.models import load_base_sd
    from xpsr_core.train.loop import frozen_weight_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_base_sd(base_model, dtype=frozen_weight_dtype(mixed_precision), device=device,
                        components=("vae", "text_encoder", "tokenizer"))


def encoder_ms(base, data: Path, batch: int, repeats: int = 10) -> float:
    """Median ms of what pre-encoding takes out of a step: the VAE encoder on the HR batch and the
    text encoder on both captions, alone."""
    from xpsr_core.encoding import encode_latent_moments, encode_prompts
    from xpsr_core.train.data import TrainingStream, images_on_device

    device = base.vae.device
    sample = next(
        iter(TrainingStream(sorted(data.glob("*.tar")), batch, seed=0, shuffle_buffer=1, online_encoding=True))
    )
    _, hr = images_on_device(sample, device)

    def once() -> float:
        started = time.perf_counter()
        encode_latent_moments(base.vae, hr)
        encode_prompts(base.text_encoder, base.tokenizer, sample["content_text"])
        encode_prompts(base.text_encoder, base.tokenizer, sample["quality_text"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000

    once()
    return statistics.median(once() for _ in range(repeats))


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured_apart(args, batch: int, case: str) -> dict:
    """``samples_per_second`` in a fresh process, so one run's leftovers never count in the other's peak memory.
    ``case``: online or ours (encoding on the fly or pre-encoded, default recipe), or a recipe of RECIPES (pre-encoded).
    Returns rate (samples/s), peak (GPU GiB, nan on the CPU), cpu (CPU seconds per sample) and rss (the process's peak
    RSS, GiB)."""
    result = Path(tempfile.mkdtemp()) / "case.json"
    threads = ["--threads", str(args.threads)] if args.threads else []
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--case",
            case,
            "--data",
            str(args.data),
            "--base-model",
            args.base_model,
            "--steps",
            str(args.steps),
            "--batches",
            str(batch),
            "--mixed-precision",
            args.mixed_precision,
            "--workers",
            str(args.workers),
            *threads,
            "--json",
            str(result),
        ],
        check=True,
    )
    return json.loads(result.read_text())


def compare_recipes(args, device: str) -> list[dict]:
    """Each recipe of ``args.recipes`` in fresh processes, taking turns round by round; medians, ratios to the first."""
    first = args.recipes[0]
    rows = []
    for batch in args.batches:
        runs = [{recipe: measured_apart(args, batch, recipe) for recipe in args.recipes} for _ in range(args.rounds)]
        for recipe in args.recipes:
            rates = [run[recipe]["rate"] for run in runs]
            cpus = [run[recipe]["cpu"] for run in runs]
            rows.append(
                dict(
                    batch=batch,
                    recipe=recipe,
                    rate=statistics.median(rates),
                    rounds=rates,
                    cpu_s=statistics.median(cpus),
                    cpu_rounds=cpus,
                    rss_gib=max(run[recipe]["rss"] for run in runs),
                    peak_gib=max(run[recipe]["peak"] for run in runs),
                )
            )
        base = next(r for r in rows if r["batch"] == batch and r["recipe"] == first)
        for row in rows[-len(args.recipes):]:
            row["ratio"] = row["rate"] / base["rate"]
            row["round_ratios"] = [run[row["recipe"]]["rate"] / run[first]["rate"] for run in runs]
            row["cpu_ratio"] = base["cpu_s"] / row["cpu_s"]  # as a speed: 1 / CPU time
        print(f"batch {batch}, each round (samples/s): " + "; ".join(
            ", ".join(f"{recipe} {run[recipe]['rate']:.3f}" for recipe in args.recipes) for run in runs), flush=True)
    gpu = torch.cuda.is_available()
    print(f"\nbase model {args.build or args.base_model}, {args.steps} timed steps (+2 warm-up), {args.rounds} rounds, "
          f"precision {args.mixed_precision}, threads {args.threads or torch.get_num_threads()}, device {device}")
    print(
        f"| batch | recipe | samples/s (median) | per round | {first}=1 (median; per round) | CPU s/sample (median) | "
        f"{first}=1 by CPU time | peak RSS GiB |" + (" peak GPU GiB |" if gpu else "")
    )
    print("|---:|---|---:|---|---|---:|---:|---:|" + ("---:|" if gpu else ""))
    for row in rows:
        print(
            f"| {row['batch']} | {row['recipe']} | {row['rate']:.3f} | "
            f"{', '.join(f'{r:.3f}' for r in row['rounds'])} | "
            f"{row['ratio']:.2f}x; {', '.join(f'{r:.2f}' for r in row['round_ratios'])} | {row['cpu_s']:.3f} | "
            f"{row['cpu_ratio']:.2f}x | {row['rss_gib']:.2f} |" + (f" {row['peak_gib']:.2f} |" if gpu else ""),
            flush=True,
        )
    return rows


def base_preset(kind: str):
    """The zoo preset of ``kind``: tiny (the embedded default's), mid (SD-1.5's proportions at a fifth
    to a quarter of its width, float32) or sd15 (SD-1.5's shapes, float16)."""
    from xpsr_core.zoo import SD15_SHAPED, TINY

    if kind == "tiny":
        return TINY
    if kind == "mid":
        return dataclasses.replace(
            SD15_SHAPED,
            name="mid",
            dtype="float32",
            unet={
                **SD15_SHAPED.unet,
                "block_out_channels": (64, 128, 256, 256),
                "cross_attention_dim": 192,
                "sample_size": 32,
            },
            vae={**SD15_SHAPED.vae, "block_out_channels": (32, 64, 128, 128), "sample_size": 256},
            text_encoder={
                **SD15_SHAPED.text_encoder,
                "hidden_size": 192,
                "intermediate_size": 768,
                "projection_dim": 192,
            },
        )
    return SD15_SHAPED


# HR crop size per base model: the embedded default's crops for tiny and mid, the paper's 512 px for sd15
FLOP_CASES = {"tiny": 256, "mid": 256, "sd15": 512}


def gflop_per_sample(kind: str, hr_size: int) -> tuple[float, float]:
    """GFLOP per sample of (a training step, the encoders that pre-encoding removes), counted by
    torch's FlopCounterMode (matmuls, convolutions, attention) on the meta device: no weights are
    allocated, so SD-1.5's shapes count as quickly as the tiny zoo's.

    The step is the full XPSR model (ControlNet with SFA, Conditional Attention, DFC heads) forward
    through the frozen UNet, and the backward; the encoders are the VAE encoder on the HR crop and
    the CLIP text encoder on the two captions."""
    from torch.utils.flop_counter import FlopCounterMode

    from xpsr_core.models import XPSRModel
    from xpsr_core.zoo import build_sd_components

    preset = dataclasses.replace(base_preset(kind), dtype="float32")
    with torch.device("meta"):
        parts = build_sd_components(preset, device="meta")
        model = XPSRModel.build(parts["unet"]).train()
        latent = hr_size // 2 ** (len(preset.vae["block_out_channels"]) - 1)
        width = preset.unet["cross_attention_dim"]
        noisy = torch.randn(1, 4, latent, latent)
        hr = torch.randn(1, 3, hr_size, hr_size)
        captions = torch.randn(1, 77, width), torch.randn(1, 77, width)
        tokens = torch.zeros(2, 77, dtype=torch.long)
        timesteps = torch.zeros(1, dtype=torch.long)
    counters = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with counters[0]:
        out = model(noisy, timesteps, *captions, hr, hr_image=hr, hr_latent=noisy, return_dfc=True)
        (out.sample.square().mean() + out.dfc.total).backward()
    with counters[1], torch.no_grad():
        parts["vae"].encode(hr)
        parts["text_encoder"](tokens)
    return tuple(counter.get_total_flops() / 1e9 for counter in counters)


def print_flops() -> None:
    for kind, size in FLOP_CASES.items():
        step, encoders = gflop_per_sample(kind, size)
        share = encoders / (step + encoders)
        print(
            f"{kind:5s} at {size} px: training step {step:8.1f} GFLOP/sample, encoders {encoders:7.1f} GFLOP/sample = "
            f"{100 * share:4.1f}% of an on-the-fly step's work: removing them can give at most {1 / (1 - share):.2f}x",
            flush=True,
        )


def built_data(kind: str, pairs: Path, captions: Path, tokenizer: Path | None) -> tuple[Path, str]:
    """A base model of SD-1.5's proportions (``mid``: a quarter width) or shapes (``sd15``), and training shards
    embedded with it."""
    from stages import embed
    from xpsr_core.zoo import write_sd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = base_preset(kind)
    root = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    sd = write_sd(root / "sd15", preset, device=device, tokenizer_from=tokenizer)
    print(f"built the {kind} base model in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    embed.run(
        embed.EmbedConfig(
            input_dir=pairs, captions_dir=captions, out=root / "train", base_model=str(sd), batch_size=8, device=device
        )
    )
    print(f"embedded the pair shards in {time.perf_counter() - started:.1f} s", flush=True)
    return root / "train", str(sd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shards/train"))
    parser.add_argument("--base-model", default="models/tiny/sd15")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[4])
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument(
        "--workers", type=int, default=0, help="dataloader workers (the training shards must number at least this)"
    )
    parser.add_argument(
        "--build", choices=["mid", "sd15"], help="build a base model and embed --pairs/--captions with it (see above)"
    )
    parser.add_argument("--pairs", type=Path, default=Path("data/shards/pairs"))
    parser.add_argument("--captions", type=Path, default=Path("manifests/captions"))
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="with --build: copy this CLIP tokenizer folder (where open_clip is not installed)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure each case this many times, alternating; report medians"
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="only count the work of a step and of the encoders at tiny, mid and SD-1.5 shapes",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=RECIPES,
        help="compare these training recipes (pre-encoded) instead of on-the-fly against pre-encoded conditions",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads in each measured process (default: torch's, one per core)"
    )
    parser.add_argument("--case", choices=["online", "ours", *RECIPES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:  # one measurement, in a process of its own (see measured_apart)
        recipe = args.case if args.case in RECIPES else "default"
        rate, peak, cpu = samples_per_second(
            args.data,
            args.base_model,
            args.steps,
            args.batches[0],
            args.case == "online",
            args.mixed_precision,
            args.workers,
            recipe,
        )
        args.json.write_text(json.dumps({"rate": rate, "peak": peak, "cpu": cpu, "rss": peak_rss_gib()}))
        return
    if args.flops:
        print_flops()
        return
    if args.build:
        args.data, args.base_model = built_data(args.build, args.pairs, args.captions, args.tokenizer)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if args.recipes:
        rows = compare_recipes(args, device)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "device": device,
                        "base_model": args.build or args.base_model,
                        "steps": args.steps,
                        "mixed_precision": args.mixed_precision,
                        "workers": args.workers,
                        "rounds": args.rounds,
                        "threads": args.threads or torch.get_num_threads(),
                        "recipes": rows,
                    },
                    indent=1,
                )
            )
        return
    print(
        f"base model: {args.build or args.base_model}  steps {args.steps} (+2 warm-up)  "
        f"precision {args.mixed_precision}  "
        f"workers {args.workers}  device {device}"
    )
    encoders_alone = frozen_encoders(args.base_model, args.mixed_precision)
    rows = []
    for batch in args.batches:
        # the two cases take turns, so that drifting load on a shared machine hits both alike
        runs = [
            tuple(
                (m["rate"], m["peak"])
                for m in (measured_apart(args, batch, "online"), measured_apart(args, batch, "ours"))
            )
            for _ in range(args.rounds)
        ]
        if args.rounds > 1:
            print(f"batch {batch}, each round (on the fly -> pre-encoded samples/s): "
                  + ", ".join(f"{a[0]:.2f} -> {b[0]:.2f}" for a, b in runs), flush=True)
        online, online_peak = statistics.median(a[0] for a, _ in runs), max(a[1] for a, _ in runs)
        ours, ours_peak = statistics.median(b[0] for _, b in runs), max(b[1] for _, b in runs)
        encoders = encoder_ms(encoders_alone, args.data, batch)
        share = encoders / (1000 * batch / online)  # of an on-the-fly step
        rows.append(
            dict(
                batch=batch,
                online=online,
                online_peak_gib=online_peak,
                ours=ours,
                ours_peak_gib=ours_peak,
                speedup=ours / online,
                encoders_ms=encoders,
                encoders_share=share,
            )
        )
        print(
            f"batch {batch}: encode on the fly (reference) {online:8.3f} samples/s  peak GPU {online_peak:6.2f} GiB | "
            f"pre-encoded (xpsr train) {ours:8.3f} samples/s  peak GPU {ours_peak:6.2f} GiB | "
            f"speed-up {ours / online:5.2f}x",
            flush=True,
        )
        print(
            f"         the encoders alone take {encoders:.1f} ms per batch, {100 * share:.0f}% of an on-the-fly step: "
            f"removing them can give at most {1 / (1 - min(share, 0.99)):.2f}x",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device,
                    "base_model": args.build or args.base_model,
                    "steps": args.steps,
                    "mixed_precision": args.mixed_precision,
                    "workers": args.workers,
                    "rounds": args.rounds,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
