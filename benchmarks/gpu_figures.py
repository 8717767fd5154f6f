"""Every GPU figure of the project in one command, against the same work eager / on the CPU, as one table.

Two steps. ``prepare`` (on a CPU machine with the full environment) writes a small bundle that travels: the tiny
zoo (its tokenizer and captioner), 512 px training pairs with their captions, and LR inputs for ``sr``.
``run`` (on the GPU machine, no network) builds SD-1.5-shaped models with random weights on the GPU, embeds the
pairs, and measures, each case in a fresh process under its own timeout:

* training (SD-1.5 shapes, bf16, batch 4 and 8; eager, regional and full compile): samples/s, MFU (FLOPs of a
  step counted by ``torch.utils.flop_counter.FlopCounterMode`` over the measured step time and the card's dense
  bf16 peak), the host share of the step (wall minus the kernel time torch.profiler records, over wall) and
  the peak memory;
* ``sr`` 128 -> 512 and 512 -> 2048 at 20 guided steps, fp16: seconds per image, eager against compiled against
  CUDA graphs (``compile=reduce-overhead``), after one image that pays the compile;
* degradation: images/s on the GPU against the CPU (the library's batched pipeline);
* captioning: tokens/s of a LLaVA-1.5-7B-shaped captioner (random weights) in bf16 at batch 1 and 16, and the
  slot of the vLLM-server figure (:func:`vllm_captioning_figure`).

It prints one table and writes it as JSON (``--out``/figures.json). ``--smoke`` runs every case at tiny shapes
(the tiny zoo, 96 px crops, 2 steps, batch 2) on any machine, CPU included (CUDA graphs are skipped there).

    python benchmarks/gpu_figures.py prepare --bundle gpu_bundle            # CPU machine
    python benchmarks/gpu_figures.py run --bundle gpu_bundle --out /tmp/gpu-out   # GPU machine
    python benchmarks/gpu_figures.py prepare --bundle /tmp/smoke --smoke && \\
        python benchmarks/gpu_figures.py run --bundle /tmp/smoke --out /tmp/smoke-out --smoke

Targets (printed beside the figures, not asserted): training >= 40 % MFU at batch 8 on an H100 with the host
under 10 % of the step; ``sr`` 128 -> 512 at 20 steps <= 0.25 s per image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peaks (SXM parts), TFLOPS
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
TARGETS = {"train_mfu_batch8": 0.40, "train_host_share_max": 0.10, "sr_128_to_512_s_per_image": 0.25}
TRAIN_MODES = ("none", "regional", "full")
SR_MODES = ("none", "default", "reduce-overhead")


# ------------------------------------------------------------------------------------------------ prepare


def prepare(bundle: Path, smoke: bool) -> None:
    from PIL import Image

    from stages import caption, degrade, demo_data, shard
    from xpsr_core.zoo import write_zoo

    bundle.mkdir(parents=True, exist_ok=True)
    crop = 96 if smoke else 512
    zoo = write_zoo(bundle / "zoo", "tiny", seed=0, overwrite=True)
    photos = bundle / "photos"
    demo_data.run(demo_data.DemoDataConfig(out=photos, val_out=bundle / "photos-val", overwrite=True))
    shard.run(shard.ShardConfig(inputs=[{"path": str(photos), "dataset": "demo"}], out=bundle / "hr", crop_size=crop,
                                images_per_shard=4, overwrite=True))
    degrade.run(degrade.DegradeConfig(input_dir=bundle / "hr", out=bundle / "pairs", batch_size=4, overwrite=True))
    caption.run(caption.CaptionConfig(input_dir=bundle / "pairs", out=bundle / "captions", captioner=str(zoo.captioner),
                                      base_model=str(zoo.sd), max_new_tokens=8, batch_size=4, overwrite=True))
    lr = bundle / "lr"
    lr.mkdir(exist_ok=True)
    first = sorted(photos.glob("*.png"))[0]
    for size in ((32, 128) if smoke else (128, 512)):
        Image.open(first).convert("RGB").resize((size, size), Image.BICUBIC).save(lr / f"lr{size}.png")
    (bundle / "bundle.json").write_text(json.dumps({"smoke": smoke, "crop": crop}))
    print(f"bundle written to {bundle} ({sum(f.stat().st_size for f in bundle.rglob('*') if f.is_file()) / 2**20:.1f}"
          " MiB)", flush=True)


# ------------------------------------------------------------------------------------------------ cases


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _kernel_seconds(profile) -> float:
    """Device time of the kernels a profile recorded (0 without a GPU)."""
    total = 0.0
    for event in profile.events():
        if getattr(event, "device_type", None) is not None and str(event.device_type).endswith("CUDA"):
            total += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    return total / 1e6


def built_models(work: Path, bundle: Path, smoke: bool) -> dict:
    """The base model (tiny for --smoke, else SD-1.5 shapes with random weights on the GPU), the pairs embedded with
    it, and random XPSR parts for sr; made once per run folder."""
    record = work / "models.json"
    if record.is_file():
        return json.loads(record.read_text())
    import torch

    from stages import embed
    from xpsr_core.models import XPSRModel, load_base_sd
    from xpsr_core.zoo import SD15_SHAPED, write_sd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd = bundle / "zoo" / "sd15"
    if not smoke:
        sd = write_sd(work / "sd15", SD15_SHAPED, device=device, tokenizer_from=bundle / "zoo" / "sd15" / "tokenizer")
    embed.run(embed.EmbedConfig(input_dir=bundle / "pairs", captions_dir=bundle / "captions", out=work / "train",
                                base_model=str(sd), batch_size=8, device=device))
    torch.manual_seed(0)
    XPSRModel.build(load_base_sd(sd, components=("unet",)).unet).save_trainable(work / "xpsr")
    models = {"sd": str(sd), "train": str(work / "train"), "xpsr": str(work / "xpsr")}
    record.write_text(json.dumps(models))
    return models


def case_train(models: dict, mode: str, batch: int, steps: int, smoke: bool, cache: Path) -> dict:
    """One training configuration: samples/s over ``steps`` steps after two warm-up steps (which compile), MFU,
    host share and peak memory."""
    import torch
    import torch._inductor.config
    from torch.utils.flop_counter import FlopCounterMode

    from xpsr_core.compiling import eager
    from xpsr_core.train.loop import Trainer
    from xpsr_core.train.settings import TrainConfig

    cuda = torch.cuda.is_available()
    torch._inductor.config.cpp.enable_kernel_profile = True  # CPU kernels show in the profile by name
    config = TrainConfig(input_dir=models["train"], base_model=models["sd"], out=Path(tempfile.mkdtemp()),
                         batch_size=batch, max_train_steps=10**6, checkpointing_steps=10**9, tensorboard=False,
                         metrics_file=None, mixed_precision="bf16" if (cuda or not smoke) else "no", shuffle_buffer=8,
                         num_workers=0 if smoke else 4, compile=mode, compile_cache=cache, log_every=10**6)
    trainer = Trainer(config)
    trainer.model.train()
    loader = trainer._data_loader(trainer._load_checkpoint(None))
    keys_log = config.out / "keys.tsv"

    def step(index: int) -> None:
        trainer._optimizer_step(loader, index, keys_log)

    started = time.perf_counter()
    for index in range(2):
        step(index)
    _sync()
    warmup = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for index in range(2, 2 + steps):
        step(index)
    _sync()
    seconds = (time.perf_counter() - started) / steps
    # dynamo refuses to run compiled code under a dispatch mode: the FLOPs are counted on the same step run eagerly
    with eager(), FlopCounterMode(display=False) as counter:
        step(2 + steps)
    flops = counter.get_total_flops()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        started = time.perf_counter()
        step(3 + steps)
        _sync()
        profiled = time.perf_counter() - started
    kernel = _kernel_seconds(profile)
    peak = _peak_tflops()
    names = [event.name for event in profile.events()]
    compiled = trainer.compile_clock.report() if trainer.compile_clock is not None else {}
    return {"figure": "train", "mode": mode, "batch": batch, "step_ms": round(seconds * 1e3, 2),
            "aten_ops": sum(name.startswith("aten::") for name in names),
            # inductor's CPU kernels record as graph_<id>_cpp_fused_..., its GPU kernels as triton_...
            "compiled_kernels": sum(name.startswith("triton_") or "cpp_fused" in name for name in names),
            "compile_s": compiled.get("compile_seconds"),
            "samples_per_s": round(batch / seconds, 3), "tflop_per_step": round(flops / 1e12, 4),
            "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else None,
            "host_share": round(1 - kernel / profiled, 4) if cuda else None,
            "peak_gib": round(_peak_gib(), 3) if cuda else None, "warmup_s": round(warmup, 2)}


def case_sr(models: dict, mode: str, lr_name: str, steps: int, repeats: int, cache: Path) -> dict:
    """Seconds per image of one LR input, after one image that pays the compile."""
    import torch
    from PIL import Image

    from xpsr_core.infer.config import SRModelConfig, load_pipeline

    cuda = torch.cuda.is_available()
    config = SRModelConfig(base_model=models["sd"], xpsr=models["xpsr"], captions="given", steps=steps,
                           dtype="float16" if cuda else "float32", device="auto", compile=mode, compile_cache=cache)
    pipe = load_pipeline(config)
    image = Image.open(lr_name).convert("RGB")
    started = time.perf_counter()
    result = pipe.upscale(image, "a photograph", "sharp")
    _sync()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pipe.upscale(image, "a photograph", "sharp")
        _sync()
        times.append(time.perf_counter() - started)
    return {"figure": "sr", "mode": mode, "size": f"{image.width} -> {result.image.shape[1]}", "steps": steps,
            "s_per_image": round(statistics.median(times), 3), "first_image_s": round(first, 2),
            "latent_tiles": result.latent_tiles,
            "compile_s": pipe.compile_clock.report()["compile_seconds"] if pipe.compile_clock is not None else None}


def case_degrade(bundle: Path, device: str, images: int) -> dict:
    """Images/s of the batched degradation pipeline (``degrade_batch``, batches of 16) on ``device``, over
    ``images`` HR crops of the bundle's size (parameters sampled beforehand, untimed)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_degrade import sample_params

    from xpsr_core.degrade import degrade_batch
    from xpsr_core.io.images import decode_png
    from xpsr_core.io.shards import read_shard

    size = json.loads((bundle / "bundle.json").read_text())["crop"]
    crops = [decode_png(sample["png"]) for shard in sorted((bundle / "hr").glob("*.tar"))
             for sample in read_shard(shard)]
    hr = torch.from_numpy(np.stack([crops[i % len(crops)] for i in range(images)])).permute(0, 3, 1, 2)
    hr = hr.float().div(255).to(device)
    settings, params = sample_params(images, size, 0)
    degrade_batch(hr[:2], params[:2], settings)
    _sync()
    started = time.perf_counter()
    for index in range(0, images, 16):
        degrade_batch(hr[index:index + 16], params[index:index + 16], settings)
    _sync()
    seconds = time.perf_counter() - started
    return {"figure": "degrade", "device": device, "images": images, "size": size,
            "images_per_s": round(images / seconds, 2)}


def case_caption(bundle: Path, batch: int, tokens: int, smoke: bool) -> dict:
    """Tokens/s of greedy generation with a LLaVA-1.5-7B-shaped captioner (random bf16 weights built on the
    device; --smoke: the tiny zoo's captioner)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = bundle / "zoo" / "captioner"
    processor = AutoProcessor.from_pretrained(folder)
    if smoke:
        model = LlavaForConditionalGeneration.from_pretrained(folder).to(device)
    else:  # the 7B shapes with random weights, drawn on the device in bf16 (no 14 GB folder to carry)
        from xpsr_core.zoo import CAPTION_MODEL_VOCAB, SD15_SHAPED, captioner_configs

        tokenizer = processor.tokenizer
        config, _ = captioner_configs(SD15_SHAPED, max(CAPTION_MODEL_VOCAB, len(tokenizer)),
                                      tokenizer.convert_tokens_to_ids("<image>"), tokenizer.bos_token_id,
                                      tokenizer.eos_token_id, tokenizer.pad_token_id)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    model.eval()
    image = Image.open(sorted((bundle / "lr").glob("*.png"))[0]).convert("RGB")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True)
    inputs = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        _sync()
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        _sync()
    seconds = time.perf_counter() - started
    return {"figure": "caption", "engine": "transformers", "batch": batch, "new_tokens": tokens,
            "tokens_per_s": round(batch * tokens / seconds, 1)}


def vllm_captioning_figure(bundle: Path, smoke: bool) -> dict | None:
    """The vLLM-server captioning figure (tokens/s at batch 1 and 16 through the server the project talks to).
    None where no vLLM server is set up on the machine."""
    return None


# ------------------------------------------------------------------------------------------------ run


def child(kind: str, params: dict) -> dict:
    bundle, work, smoke = Path(params["bundle"]), Path(params["work"]), params["smoke"]
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or work / "inductor")  # a warm cache where one is named
    if kind == "models":
        return built_models(work, bundle, smoke)
    models = json.loads((work / "models.json").read_text())
    if kind == "train":
        return case_train(models, params["mode"], params["batch"], params["steps"], smoke, cache)
    if kind == "sr":
        return case_sr(models, params["mode"], params["lr"], params["steps"], params["repeats"], cache)
    if kind == "degrade":
        return case_degrade(bundle, params["device"], params["images"])
    if kind == "caption":
        return case_caption(bundle, params["batch"], params["tokens"], smoke)
    raise ValueError(kind)


def run_child(kind: str, params: dict, timeout: float) -> dict:
    """One case in a fresh process (its own CUDA context, dynamo state and peak memory)."""
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, __file__, "child", kind, json.dumps(params)], cwd=ROOT,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"figure": kind, **{k: v for k, v in params.items() if k in ("mode", "batch", "device", "lr")},
                "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {"figure": kind, **{k: v for k, v in params.items() if k in ("mode", "batch", "device", "lr")},
                "error": " | ".join(tail)[-400:]}
    figures = json.loads(lines[-1])
    figures["case_s"] = round(time.perf_counter() - started, 1)
    return figures


# seconds per case on the GPU (each a fresh process: start, model load, compile, timed work); they add up to the
# budget of 8 minutes with the model build
GPU_TIMEOUTS = {"models": 45, ("train", "none"): 20, ("train", "regional"): 50, ("train", "full"): 65,
                ("sr", "none"): 18, ("sr", "default"): 28, ("sr", "reduce-overhead"): 28, "degrade": 8, "caption": 20}
GPU_BUDGET_S = 480


def plan(bundle: Path, smoke: bool, cuda: bool) -> list[tuple[str, dict, float]]:
    """(kind, parameters, timeout in seconds) of every case, in order."""
    lr = sorted((bundle / "lr").glob("*.png"), key=lambda p: int(p.stem[2:]))
    timeout = (lambda *key: 900) if smoke else (lambda *key: GPU_TIMEOUTS[key if len(key) > 1 else key[0]])
    cases: list[tuple[str, dict, float]] = [("models", {}, timeout("models"))]
    for mode in TRAIN_MODES:
        for index, batch in enumerate((2,) if smoke else (4, 8)):
            # the second batch size of a mode finds the first one's kernels in the cache where shapes agree
            cases.append(("train", {"mode": mode, "batch": batch, "steps": 2 if smoke else 8},
                          timeout("train", mode) * (1 if index == 0 else 0.7)))
    for index, path in enumerate(lr):
        for mode in SR_MODES:
            if mode == "reduce-overhead" and not cuda:
                continue  # CUDA graphs: GPUs only (refused on the CPU)
            cases.append(("sr", {"mode": mode, "lr": str(path), "steps": 2 if smoke else 20,
                                 "repeats": 2 if index == 0 else 1}, timeout("sr", mode)))
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        cases.append(("degrade", {"device": device, "images": 4 if smoke else 16}, timeout("degrade")))
    for batch in (1, 16):
        cases.append(("caption", {"batch": batch, "tokens": 4 if smoke else 32}, timeout("caption")))
    return cases


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        shown = {k: v for k, v in row.items() if v is not None}
        lines.append("  ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


def run(bundle: Path, out: Path, smoke: bool) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-figures-"))
    rows = []
    started = time.perf_counter()
    deadline = started + (GPU_BUDGET_S if cuda and not smoke else 10**6)
    for kind, params, timeout in plan(bundle, smoke, cuda):
        params = {**params, "bundle": str(bundle), "work": str(work), "smoke": smoke}
        left = deadline - time.perf_counter()
        if left < 5:
            rows.append({"figure": kind, **{k: v for k, v in params.items() if k in ("mode", "batch", "device")},
                         "error": "not run: the budget was spent"})
            continue
        figures = run_child(kind, params, min(timeout, left))
        if kind == "models":
            if "error" in figures:
                rows.append(figures)
                break
            continue
        rows.append(figures)
        print(table([figures]), flush=True)
    vllm = vllm_captioning_figure(bundle, smoke)
    rows.append(vllm or {"figure": "caption", "engine": "vllm", "note": "no vLLM server on this machine"})
    device = torch.cuda.get_device_name() if cuda else "CPU"
    result = {"device": device, "smoke": smoke, "seconds": round(time.perf_counter() - started, 1),
              "targets": TARGETS, "peak_bf16_tflops": _peak_tflops(), "rows": rows}
    (out / "figures.json").write_text(json.dumps(result, indent=2))
    print(f"\n{device}: every figure ({result['seconds']} s)\n{table(rows)}\ntargets: {TARGETS}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2], json.loads(sys.argv[3]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--bundle", type=Path, default=Path("gpu_bundle"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any machine")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.bundle.absolute(), args.smoke)
    else:
        run(args.bundle.absolute(), args.out.absolute(), args.smoke)


if __name__ == "__main__":
    main()
