"""torch.compile against eager on the CPU, each case in a fresh process, the cases taking turns round by round:

* the tiny-zoo training step (fp32, batch 2, 96 px crops): wall ms, samples/s, operators dispatched per step
  (aten operators; compiled: the inductor kernels launched and the aten operators left, e.g. convolutions and
  matmuls, by torch.profiler) and the compile time, eager (``compile=none``) against ``regional`` and ``full``;
* ``sr`` 128 -> 512 at 20 steps (tiny zoo): seconds per image and compile time, eager against ``compile=default``.

The first round of each compiled case starts with an empty inductor cache (cold), the later rounds reuse it (warm).
Prints the medians and the load (``uptime``) before and after.

    python benchmarks/bench_compile.py [--rounds 3] [--work /tmp/compile-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_figures import prepare, run_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/compile-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work, bundle = args.work.absolute(), args.work.absolute() / "bundle"
    if not (bundle / "bundle.json").is_file():
        prepare(bundle, smoke=True)
    shutil.rmtree(work / "inductor", ignore_errors=True)  # the first round compiles cold
    common = {"bundle": str(bundle), "work": str(work), "smoke": True}
    run_child("models", common, 900)
    lr = str(bundle / "lr" / "lr128.png")
    cases = {f"train {mode}": ("train", {"mode": mode, "batch": 2, "steps": 5})
             for mode in ("none", "regional", "full")}
    cases |= {f"sr {mode}": ("sr", {"mode": mode, "lr": lr, "steps": 20, "repeats": 2}) for mode in ("none", "default")}
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for round_index in range(args.rounds):
        for name, (kind, params) in cases.items():
            figures = run_child(kind, {**common, **params}, 1800)
            results[name].append(figures)
            print(f"round {round_index + 1} {name}: {json.dumps(figures)}", flush=True)
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    keys = {"train": ("step_ms", "samples_per_s", "aten_ops", "compiled_kernels"), "sr": ("s_per_image",)}
    for name, rows in results.items():
        rows = [row for row in rows if "error" not in row]
        if not rows:
            print(f"{name}: failed")
            continue
        medians = {key: statistics.median(row[key] for row in rows) for key in keys[name.split()[0]]}
        cold = rows[0].get("compile_s")
        warm = statistics.median(row["compile_s"] for row in rows[1:]) if len(rows) > 1 and cold else None
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in medians.items())
              + (f", compile cold {cold:.1f} s, warm {warm:.1f} s" if cold else ""))


if __name__ == "__main__":
    main()
