"""What a longer text conditioning (max_caption_tokens 77 -> 154 -> 231) costs a training step.

Run by hand (not in CI):

    PYTHONPATH=. .venv/bin/python benchmarks/bench_caption_length.py            # FLOPs, then CPU step times
    PYTHONPATH=. .venv/bin/python benchmarks/bench_caption_length.py --flops    # FLOPs alone (seconds)

FLOPs: torch's ``FlopCounterMode`` on the meta device (no weights allocated), for one sample: the full XPSR
training step (ControlNet with SFA, Conditional Attention, DFC heads, frozen UNet, forward and backward) with
c_h and c_l of L tokens, and the CLIP text encoder on the two captions (L / 77 windows each), at the tiny zoo's
shapes (128 px HR) and SD-1.5's (512 px HR). Time: the same step on the tiny zoo's random weights on the CPU,
batch 2, median of ``--repeats`` steps after a warm-up, lengths interleaved round-robin. Memory: the fp16 bytes of
one sample's two stored caption embeddings, and on the CPU the bytes autograd saves for backward.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

LENGTHS = (77, 154, 231)
SHAPES = {"tiny": 128, "sd15": 512}  # HR pixels per preset


def preset(kind: str):
    import dataclasses

    from xpsr_core.zoo import SD15_SHAPED, TINY

    return dataclasses.replace(TINY if kind == "tiny" else SD15_SHAPED, dtype="float32")


def gflop(kind: str, tokens: int) -> tuple[float, float]:
    """GFLOP per sample of (the training step, the text encoder on both captions) at ``tokens``."""
    from torch.utils.flop_counter import FlopCounterMode

    from xpsr_core.models import XPSRModel
    from xpsr_core.zoo import build_sd_components

    zoo = preset(kind)
    hr_size = SHAPES[kind]
    with torch.device("meta"):
        parts = build_sd_components(zoo, device="meta")
        model = XPSRModel.build(parts["unet"]).train()
        latent = hr_size // 2 ** (len(zoo.vae["block_out_channels"]) - 1)
        width = zoo.unet["cross_attention_dim"]
        noisy = torch.randn(1, 4, latent, latent)
        hr = torch.randn(1, 3, hr_size, hr_size)
        captions = torch.randn(1, tokens, width), torch.randn(1, tokens, width)
        windows = torch.zeros(2 * tokens // 77, 77, dtype=torch.long)
        timesteps = torch.zeros(1, dtype=torch.long)
    step, text = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with step:
        out = model(noisy, timesteps, *captions, (hr + 1) / 2, hr_image=hr, hr_latent=noisy, return_dfc=True)
        (out.sample.square().mean() + out.dfc.total).backward()
    with text, torch.no_grad():
        parts["text_encoder"](windows)
    return step.get_total_flops() / 1e9, text.get_total_flops() / 1e9


def print_flops() -> None:
    print("| shapes | HR px | tokens | training step GFLOP/sample | step / 77 | text encoder GFLOP/sample | "
          "stored fp16 captions per sample |")
    print("|---|---|---|---|---|---|---|")
    for kind in SHAPES:
        base = None
        width = preset(kind).unet["cross_attention_dim"]
        for tokens in LENGTHS:
            step, text = gflop(kind, tokens)
            base = base or step
            print(f"| {kind} | {SHAPES[kind]} | {tokens} | {step:.1f} | {step / base:.3f}x | {text:.2f} | "
                  f"{2 * tokens * width * 2 / 1024:.1f} KiB |", flush=True)


def saved_bytes(run) -> int:
    seen: dict[int, int] = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()
    return sum(seen.values())


def cpu_times(repeats: int) -> None:
    from xpsr_core.models import XPSRModel, training_loss
    from xpsr_core.zoo import build_sd_components

    zoo = preset("tiny")
    parts = build_sd_components(zoo)
    unet = parts["unet"].requires_grad_(False)
    torch.manual_seed(0)
    model = XPSRModel.build(unet).train()
    g = torch.Generator().manual_seed(0)
    hr_size, batch = SHAPES["tiny"], 2
    latent = hr_size // 8
    width = zoo.unet["cross_attention_dim"]
    fixed = dict(noisy=torch.randn(batch, 4, latent, latent, generator=g),
                 timesteps=torch.randint(1, 1000, (batch,), generator=g),
                 condition=torch.rand(batch, 3, hr_size, hr_size, generator=g),
                 noise=torch.randn(batch, 4, latent, latent, generator=g))
    texts = {n: (torch.randn(batch, n, width, generator=g), torch.randn(batch, n, width, generator=g))
             for n in LENGTHS}

    def step(tokens: int) -> None:
        c_h, c_l = texts[tokens]
        out = model(fixed["noisy"], fixed["timesteps"], c_h, c_l, fixed["condition"],
                    hr_image=fixed["condition"] * 2 - 1, hr_latent=fixed["noisy"], return_dfc=True)
        training_loss(out.sample, fixed["noise"], out.dfc)[0].backward()
        for p in model.trainable_parameters():
            p.grad = None

    def timed(tokens: int) -> float:
        start = time.perf_counter()
        step(tokens)
        return time.perf_counter() - start

    for tokens in LENGTHS:
        timed(tokens)
    times = {n: [] for n in LENGTHS}
    for _ in range(repeats):
        for tokens in LENGTHS:
            times[tokens].append(timed(tokens))
    print(f"\nCPU, tiny zoo, batch {batch}, {hr_size} px HR, {torch.get_num_threads()} thread(s), {repeats} repeats, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.2f}, "
          f"{platform.processor() or platform.machine()}")
    print("| tokens | step ms (median) | step / 77 | saved for backward MiB | / 77 |")
    print("|---|---|---|---|---|")
    base_time = statistics.median(times[LENGTHS[0]])
    base_memory = saved_bytes(lambda: step(LENGTHS[0]))
    for tokens in LENGTHS:
        median = statistics.median(times[tokens])
        memory = saved_bytes(lambda tokens=tokens: step(tokens))
        print(f"| {tokens} | {1000 * median:.0f} | {median / base_time:.2f}x | {memory / 2**20:.1f} | "
              f"{memory / base_memory:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", action="store_true", help="Count FLOPs only.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_flops()
    if not args.flops:
        cpu_times(args.repeats)


if __name__ == "__main__":
    main()
