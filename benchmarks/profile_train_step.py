"""Where a step of `xpsr train` spends its time: torch.profiler over the real training loop.

Runs ``Trainer.train`` (data loading, forward, backward, clipping, AdamW, logging) for a few warm-up
steps and then profiles ``--steps`` steps. It prints the wall time per step and the operators with
the most host time; on a GPU also the kernel time per step (so the share of the step the GPU is
busy), the kernel launches per step and the host-device synchronisations, which tell a host-bound
step from a GPU-bound one. ``--trace FILE`` also writes a Chrome/Perfetto trace.

    python benchmarks/profile_train_step.py --data data/shards/train --base-model models/tiny/sd15 --batch 4
    python benchmarks/profile_train_step.py --build sd15 --pairs gpu_bench/pairs --captions gpu_bench/captions \\
        --tokenizer gpu_bench/tokenizer --mixed-precision bf16 --batch 8 --workers 4   # on a GPU

``--count-reads`` instead counts, on any machine, the calls per step that copy tensor values to the host
(``item``, ``tolist``, ``numpy``, ``cpu``, and ``bool``/``float``/``int``/index of a tensor): on a GPU each
waits for all the queued work, so they are what keeps a step host-bound. Every such call counts, also on
tensors that stay on the host (in the default recipe only the data loader's, drawing its base seed once as the
loop starts, in the first warm-up step). Run from two checkouts of the code (this one file copied into the
other) it compares them:

    python benchmarks/profile_train_step.py --count-reads --log-every 5 --warmup 2 --steps 10
    cd ../other-checkout && PYTHONPATH=. python benchmarks/profile_train_step.py --count-reads --log-every 5 \\
        --warmup 2 --steps 10 --data ../xpsr/data/shards/train --base-model ../xpsr/models/tiny/sd15
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
from pathlib import Path
from typing import Self

import torch

sys.path.insert(0, str(Path(__file__).parent))

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class HostReadCounter:
    """Counts the calls of ``HOST_READS`` on any tensor while inside ``with``, by name (a read that another
    read makes, as ``numpy()`` does for ``np.asarray``, counts once); ``take()`` returns and resets them."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._depth = 0
        self._replaced: dict[str, object] = {}

    def _counting(self, name: str, method):
        @functools.wraps(method)
        def counted(tensor, *args, **kwargs):
            if self._depth == 0:
                self.counts[name] += 1
            self._depth += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self) -> Self:
        for name in HOST_READS:
            # None: inherited from the C base class, so deleting the wrapper restores it
            self._replaced[name] = vars(torch.Tensor).get(name)
            setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc) -> None:
        for name, method in self._replaced.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
        self._replaced.clear()

    def take(self) -> collections.Counter:
        counts, self.counts = self.counts, collections.Counter()
        return counts


def reads_per_step(trainer) -> list[collections.Counter]:
    """The host reads of each step of ``trainer.train()`` (a step's are those since the previous step ended)."""
    per_step = []
    with HostReadCounter() as counter:
        trainer.train(after_step=lambda _: per_step.append(counter.take()))
    return per_step


def report_reads(trainer, warmup: int, log_every: int) -> None:
    per_step = reads_per_step(trainer)[warmup:]
    last = trainer.config.max_train_steps
    steps = range(warmup + 1, last + 1)
    quiet = [counts for step, counts in zip(steps, per_step) if step % log_every and step != last]
    total = sum(per_step, collections.Counter())
    print(f"device {trainer.accelerator.device}  log_every {log_every}  steps {warmup + 1}-{last}")
    print("host reads per step: " + " ".join(f"{step}:{sum(c.values())}" for step, c in zip(steps, per_step)))
    print(f"mean host reads per step: {sum(total.values()) / len(per_step):.2f}; on the steps that do not log: "
          + (f"{sum(sum(c.values()) for c in quiet) / len(quiet):.2f}" if quiet else "none measured"))
    print("by kind: " + ", ".join(f"{name} {count / len(per_step):.2f}" for name, count in total.most_common()))


def device_time_key(events) -> str:
    """The name of an event's own GPU time, renamed from self_cuda_time_total in recent torch releases."""
    return "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"


def main() -> None:
    from bench_train import built_data
    from torch.profiler import ProfilerActivity, profile, schedule

    from xpsr_core.train.loop import Trainer
    from xpsr_core.train.settings import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shards/train"))
    parser.add_argument("--base-model", default="models/tiny/sd15")
    parser.add_argument(
        "--build",
        choices=["mid", "sd15"],
        help="build this base model and embed --pairs/--captions (as bench_train.py)",
    )
    parser.add_argument("--pairs", type=Path, default=Path("data/shards/pairs"))
    parser.add_argument("--captions", type=Path, default=Path("manifests/captions"))
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--online", action="store_true", help="encode captions and HR latents in the loop (the reference)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of the profiled steps here")
    parser.add_argument("--count-reads", action="store_true", help="count the host reads per step instead of profiling")
    parser.add_argument("--log-every", type=int, default=1, help="log (and so read the losses back) every N steps")
    args = parser.parse_args()
    if args.build:
        args.data, args.base_model = built_data(args.build, args.pairs, args.captions, args.tokenizer)

    config = TrainConfig(
        input_dir=args.data,
        base_model=args.base_model,
        out=Path(tempfile.mkdtemp()),
        batch_size=args.batch,
        max_train_steps=args.warmup + args.steps,
        online_encoding=args.online,
        checkpointing_steps=10**9,
        tensorboard=False,
        metrics_file=None,
        mixed_precision=args.mixed_precision,
        shuffle_buffer=8,
        num_workers=args.workers,
        log_every=args.log_every,
    )
    trainer = Trainer(config)
    if args.count_reads:
        report_reads(trainer, args.warmup, args.log_every)
        return
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
            print(
                "synchronising / copying calls per step: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(syncs.items()))
            )
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
