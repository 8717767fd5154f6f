"""Where a step of `xpsr train` spends its time: torch.profiler over the real training loop.

Runs ``Trainer.train`` (data loading, forward, backward, clipping, AdamW, logging) for a few warm-up
steps and then profiles ``--steps`` steps. It prints the wall time per step and the operators with
the most host time; on a GPU also the kernel time per step (so the share of the step the GPU is
busy), the kernel launches per step and the host-device synchronisations, which tell a host-bound
step from a GPU-bound one. ``--trace FILE`` also writes a Chrome/Perfetto trace.

    python benchmarks/profile_train_step.py --data data/shards/train --base-model models/tiny/sd15 --batch 4
    python benchmarks/profile_train_step.py --build sd15 --pairs gpu_bench/pairs --captions gpu_bench/captions \\
        --tokenizer gpu_bench/tokenizer --mixed-precision bf16 --batch 8 --workers 4   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def device_time_key(events) -> str:
    """The name of an event's own GPU time, renamed from self_cuda_time_total in recent torch releases."""
    return "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"


def main() -> None:
    from torch.profiler import ProfilerActivity, profile, schedule

    from bench_train import built_data
    from xpsr_core.train.loop import Trainer
    from xpsr_core.train.settings import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shards/train"))
    parser.add_argument("--base-model", default="models/tiny/sd15")
    parser.add_argument("--build", choices=["mid", "sd15"], help="build this base model and embed --pairs/--captions (as bench_train.py)")
    parser.add_argument("--pairs", type=Path, default=Path("data/shards/pairs"))
    parser.add_argument("--captions", type=Path, default=Path("manifests/captions"))
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--online", action="store_true", help="encode captions and HR latents in the loop (the reference)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of the profiled steps here")
    args = parser.parse_args()
    if args.build:
        args.data, args.base_model = built_data(args.build, args.pairs, args.captions, args.tokenizer)

    config = TrainConfig(
        train_dir=args.data, base_model=args.base_model, out=Path(tempfile.mkdtemp()), batch_size=args.batch,
        max_train_steps=args.warmup + args.steps, online_encoding=args.online, checkpointing_steps=10**9,
        tensorboard=False, metrics_file=None, mixed_precision=args.mixed_precision, shuffle_buffer=8, num_workers=args.workers,
    )
    trainer = Trainer(config)
    cuda = trainer.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def report(prof) -> None:  # called once, when the profiled steps are done
        events = prof.key_averages()
        steps = [e for e in prof.events() if e.name.startswith("ProfilerStep")]
        wall_ms = sum(e.cpu_time_total for e in steps) / 1000 / len(steps)
        print(f"device {trainer.accelerator.device}  batch {args.batch}  precision {args.mixed_precision}  "
              f"{'on the fly' if args.online else 'pre-encoded'}  profiled steps {len(steps)}")
        print(f"wall time per step: {wall_ms:.1f} ms ({args.batch / wall_ms * 1000:.2f} samples/s)")
        # each operator costs host time (Python, dispatcher, a kernel launch on a GPU), however small its tensors
        operators = sum(e.count for e in events if e.key.startswith("aten::")) / len(steps)
        print(f"aten operators per step (views and nested calls included): {operators:.0f}")
        if cuda:
            key = device_time_key(events)
            kernel_ms = sum(getattr(e, key) for e in events) / 1000 / len(steps)
            launches = sum(e.count for e in events if "LaunchKernel" in e.name) / len(steps)
            syncs = {e.name: e.count / len(steps) for e in events if "Synchronize" in e.name or "Memcpy" in e.name}
            print(f"GPU kernel time per step: {kernel_ms:.1f} ms ({100 * kernel_ms / wall_ms:.0f}% of the wall time)")
            print(f"kernel launches per step: {launches:.0f}")
            print("synchronising / copying calls per step: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(syncs.items())))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        if cuda:
            print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
            print(f"trace: {args.trace}")

    plan = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=plan, on_trace_ready=report) as prof:
        trainer.train(after_step=lambda _: prof.step())

if __name__ == "__main__":
    main()
