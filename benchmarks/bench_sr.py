"""XPSR inference speed and peak memory: 128 -> 512, tiled 512 -> 2048, batched vs two-pass guidance.

Each case runs in its own subprocess so its peak memory (RSS on CPU, allocated CUDA memory on a
GPU) is its own. Uses the tiny zoo (written to a temporary folder) unless --base-model/--xpsr are
given; the XPSR parts are freshly initialised (speed does not depend on training).

    python benchmarks/bench_sr.py [--steps 4] [--device cpu] [--dtype float32]
    python benchmarks/bench_sr.py --base-model models/sd15-shaped/sd15 --device cuda --dtype float16 --steps 20

The tiny zoo's native size is 128 px, so the benchmark uses 512 px latent tiles (64 x 64 latents,
SD-1.5's native size) and 512 px VAE tiles: 128 -> 512 is one tile, 512 -> 2048 is 5 x 5 tiles.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load(args):
    import torch

    from xpsr_core.infer import SRSettings, XPSRPipeline
    from xpsr_core.models.loading import load_base_sd
    from xpsr_core.models.xpsr import XPSRModel

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    settings = SRSettings(steps=args.steps, tile_size=512, tile_overlap=128, vae_tile_size=512, vae_tile_overlap=128)
    if args.xpsr:
        return XPSRPipeline.from_pretrained(
            base_model=args.base_model, xpsr=args.xpsr, dtype=args.dtype, device=args.device, settings=settings
        )
    base = load_base_sd(args.base_model, dtype=dtype, device=args.device)
    model = XPSRModel.from_base(base, with_dfc=False, dtype=dtype, device=args.device)
    return XPSRPipeline.from_model(model, base, settings)


def peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def case_image(args, lr_size: int) -> dict:
    import numpy as np
    import torch

    pipe = load(args)
    rng = np.random.default_rng(0)
    lr = (rng.random((lr_size, lr_size, 3)) * 255).astype(np.uint8)
    pipe.upscale(np.ascontiguousarray(lr[:32, :32]), "warm-up", "warm-up", steps=1)  # kernels, allocator
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = pipe.upscale(lr, "a photograph of a city street", "slightly blurry, some noise")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {
        "lr": lr_size,
        "sr": result.image.shape[0],
        "latent_tiles": result.latent_tiles,
        "steps": args.steps,
        "seconds_per_image": min(times),
        "seconds_per_step": min(times) / args.steps,
        "peak_gib": peak_memory_gib(args.device),
    }


def case_cfg(args) -> dict:
    import torch

    from xpsr_core.infer import SRSettings

    pipe = load(args)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 64, 64, generator=generator).to(args.device)
    condition = torch.rand(1, 3, 512, 512, generator=generator).to(args.device)
    c_h, c_l, c_neg = pipe.encode_text(["a city street", "blurry", pipe.settings.negative_prompt]).split(1)
    results = {}
    for batched in (True, False, True, False):
        settings = SRSettings(cfg_batched=batched)
        with torch.inference_mode():
            pipe.guided_noise(latents, 500, condition, c_h, c_l, c_neg, settings)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.cfg_repeats):
                pipe.guided_noise(latents, 500, condition, c_h, c_l, c_neg, settings)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.cfg_repeats
        key = "batched" if batched else "two_passes"
        results[key] = min(seconds, results.get(key, float("inf")))
    results["speedup"] = results["two_passes"] / results["batched"]
    return results


def run_case(name: str, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        name,
        "--base-model",
        args.base_model,
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--cfg-repeats",
        str(args.cfg_repeats),
    ]
    if args.xpsr:
        command += ["--xpsr", args.xpsr]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--xpsr", default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cfg-repeats", type=int, default=5)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = {
            "128to512": lambda: case_image(args, 128),
            "512to2048": lambda: case_image(args, 512),
            "cfg": lambda: case_cfg(args),
        }[args.case]()
        print(json.dumps(result))
        return
    if args.base_model is None:
        from xpsr_core.zoo import write_zoo

        args.base_model = str(write_zoo(Path(tempfile.mkdtemp()) / "zoo", "tiny", seed=0).sd)
    results = {name: run_case(name, args) for name in ("128to512", "512to2048", "cfg")}
    print(json.dumps({"machine": platform.processor() or platform.machine(), "device": args.device, "dtype": args.dtype,
                      "steps": args.steps, **results}, indent=2))


if __name__ == "__main__":
    main()
