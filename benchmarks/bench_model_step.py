"""One XPSR training step (forward + backward) against diffusers' plain ControlNet + UNet of the same shape.

Run by hand (not in CI):

    PYTHONPATH=. .venv/bin/python benchmarks/bench_model_step.py                 # tiny and mid, CPU
    PYTHONPATH=. .venv/bin/python benchmarks/bench_model_step.py --device cuda --configs sd15 --dtype bfloat16

Every variant runs in this one process on the same frozen UNet, the same batch and the same loss
(MSE on the noise prediction, plus the DFC terms where DFC is on):

* ``diffusers``: ``ControlNetModel.from_unet`` + ``UNet2DConditionModel`` (the reference),
* ``xpsr-plain``: XPSR wiring with SFA in ``high`` mode, no Conditional Attention, no DFC
  (what XPSR's own forward costs with nothing added),
* ``+sfa``, ``+condattn``, ``+dfc``: one XPSR component switched on at a time,
* ``xpsr-full``: parallel SFA + Conditional Attention + DFC (the paper's model).

Time: median of ``--repeats`` steps after one warm-up step, variants interleaved round-robin. Memory: on CUDA, peak
allocated bytes of the step; on CPU (where torch keeps no allocator statistics) the bytes of the tensors
autograd saves for backward (deduplicated by storage), which is what grows with the model's
activations. Ratios are against ``diffusers``; the per-component overhead is also given against
``xpsr-plain``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

CONFIGS = {
    "tiny": dict(latent=16, batch=2, text_len=77),
    "mid": dict(latent=32, batch=2, text_len=77),
    "sd15": dict(latent=64, batch=4, text_len=77),
}


def unet_config(name: str) -> dict:
    from xpsr_core.zoo import SD15_SHAPED, TINY

    if name == "tiny":
        return dict(TINY.unet)
    if name == "mid":
        return dict(SD15_SHAPED.unet, block_out_channels=(128, 256, 512, 512), cross_attention_dim=256, sample_size=32)
    return dict(SD15_SHAPED.unet)


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward during a forward pass."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
            self.seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def build_variants(unet, device, dtype):
    from diffusers import ControlNetModel

    from xpsr_core.models import XPSRModel, XPSRSettings
    from xpsr_core.models.loading import channels_last_on_cpu

    variants = {}
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet).to(device, dtype)  # from_unet builds on the CPU in float32
    channels_last_on_cpu(controlnet)  # the weight layout XPSRModel gives its parts (and the shared UNet)
    variants["diffusers"] = ("diffusers", controlnet, False)
    settings = {
        "xpsr-plain": XPSRSettings(sfa_mode="high", conditional_attention=False, dfc_pixel=False, dfc_latent=False),
        "+sfa": XPSRSettings(sfa_mode="parallel", conditional_attention=False, dfc_pixel=False, dfc_latent=False),
        "+condattn": XPSRSettings(sfa_mode="high", conditional_attention=True, dfc_pixel=False, dfc_latent=False),
        "+dfc": XPSRSettings(sfa_mode="high", conditional_attention=False),
        "xpsr-full": XPSRSettings(),
    }
    for name, s in settings.items():
        torch.manual_seed(0)
        model = XPSRModel.build(unet, s)
        variants[name] = ("xpsr", model, s.dfc_pixel or s.dfc_latent)
    return variants


def make_batch(spec: dict, unet, device, dtype):
    g = torch.Generator().manual_seed(0)
    b, h = spec["batch"], spec["latent"]
    c = unet.config.cross_attention_dim
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return dict(
        noisy_latents=t(b, 4, h, h),
        timesteps=torch.randint(1, 1000, (b,), generator=g).to(device),
        c_h=t(b, spec["text_len"], c),
        c_l=t(b, spec["text_len"], c),
        condition=torch.rand(b, 3, h * 8, h * 8, generator=g).to(device, dtype),
        hr_image=(torch.rand(b, 3, h * 8, h * 8, generator=g) * 2 - 1).to(device, dtype),
        hr_latent=t(b, 4, h, h),
        noise=t(b, 4, h, h),
    )


def step(kind, module, with_dfc, unet, batch):
    from xpsr_core.models import training_loss

    if kind == "diffusers":
        res = module(
            batch["noisy_latents"],
            batch["timesteps"],
            encoder_hidden_states=batch["c_h"],
            controlnet_cond=batch["condition"],
            return_dict=False,
        )
        pred = unet(batch["noisy_latents"], batch["timesteps"], encoder_hidden_states=batch["c_h"],
                    down_block_additional_residuals=res[0], mid_block_additional_residual=res[1]).sample
        loss, _ = training_loss(pred, batch["noise"], None)
    else:
        out = module(batch["noisy_latents"], batch["timesteps"], batch["c_h"], batch["c_l"], batch["condition"],
                     hr_image=batch["hr_image"], hr_latent=batch["hr_latent"], return_dfc=with_dfc)
        loss, _ = training_loss(out.sample, batch["noise"], out.dfc)
    loss.backward()
    return loss


def _params(kind, module):
    return list(module.parameters()) if kind == "diffusers" else list(module.trainable_parameters())


def timed_step(kind, module, with_dfc, unet, batch, device) -> float:
    for p in _params(kind, module):
        p.grad = None
    module.train()
    unet.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(kind, module, with_dfc, unet, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for p in _params(kind, module):
        p.grad = None
    return elapsed


def step_memory(kind, module, with_dfc, unet, batch, device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(kind, module, with_dfc, unet, batch)
        memory = torch.cuda.max_memory_allocated() - base
    else:
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x):
            step(kind, module, with_dfc, unet, batch)
        memory = saved.total
    for p in _params(kind, module):
        p.grad = None
    return memory


def run_config(name: str, device, dtype, repeats: int) -> list[dict]:
    from diffusers import UNet2DConditionModel

    spec = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(name))
    if device.type != "cpu" or dtype != torch.float32:
        unet = unet.to(device, dtype)
    unet.requires_grad_(False)
    batch = make_batch(spec, unet, device, dtype)
    variants = build_variants(unet, device, dtype)
    times = {v: [] for v in variants}
    for variant, (kind, module, with_dfc) in variants.items():  # warm-up
        timed_step(kind, module, with_dfc, unet, batch, device)
    for _ in range(repeats):  # round-robin, so load changes on a shared machine hit every variant alike
        for variant, (kind, module, with_dfc) in variants.items():
            times[variant].append(timed_step(kind, module, with_dfc, unet, batch, device))
    rows = []
    for variant, (kind, module, with_dfc) in variants.items():
        memory = step_memory(kind, module, with_dfc, unet, batch, device)
        seconds = statistics.median(times[variant])
        trainable = sum(p.numel() for p in _params(kind, module))
        rows.append(
            dict(
                config=name,
                variant=variant,
                seconds=seconds,
                fastest=min(times[variant]),
                memory=memory,
                trainable=trainable,
            )
        )
        print(f"  {name:5s} {variant:11s} median {seconds * 1000:9.1f} ms  min {min(times[variant]) * 1000:9.1f} ms  "
              f"{memory / 2**20:9.1f} MiB  {trainable / 1e6:7.2f} M trainable", flush=True)
    ref = next(r for r in rows if r["variant"] == "diffusers")
    plain = next(r for r in rows if r["variant"] == "xpsr-plain")
    for r in rows:
        r["time_vs_diffusers"] = r["seconds"] / ref["seconds"]
        r["memory_vs_diffusers"] = r["memory"] / ref["memory"]
        r["time_vs_plain"] = r["seconds"] / plain["seconds"]
        r["memory_vs_plain"] = r["memory"] / plain["memory"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    memory_kind = "peak CUDA allocated per step" if device.type == "cuda" else "autograd-saved activations"
    print(
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {device}, {args.dtype}; "
        f"memory = {memory_kind}"
    )
    table = []
    for name in args.configs:
        table.extend(run_config(name, device, dtype, args.repeats))
    print(
        "\n| config | variant | step ms (median) | time / diffusers | time / xpsr-plain | memory MiB "
        "| memory / diffusers | memory / xpsr-plain | trainable M |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['config']} | {r['variant']} | {r['seconds'] * 1000:.1f} | {r['time_vs_diffusers']:.2f} | "
            f"{r['time_vs_plain']:.2f} | "
            f"{r['memory'] / 2**20:.1f} | {r['memory_vs_diffusers']:.2f} | {r['memory_vs_plain']:.2f} | "
            f"{r['trainable'] / 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()
