"""Time and peak memory of ``xpsr import-official`` at SD-1.5 shapes, against the I/O floor.

Builds (once, under ``--work``) an SD-1.5-shaped base folder with random weights and a checkpoint of
the authors' architecture in their layout (``export_official`` of a random ``XPSRSettings.official()``
model: 736 ControlNet and 998 UNet tensors, fp32). Then, each in a fresh process, alternating:

* ``import``: :func:`xpsr_core.models.official.import_official` (read, validate, map, compare the SD
  tensors with the base, write the pipeline folder);
* ``copy floor``: read both checkpoint files with safetensors and write the same tensors back
  (the least any importer that rewrites the weights has to do).

Prints the median seconds and peak resident memory of each and their ratio.

    python benchmarks/bench_import_official.py [--work /tmp/import-bench] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, shutil
from pathlib import Path
import torch
torch.set_num_threads(2)
kind, work = sys.argv[1], Path(sys.argv[2])
out = work / "out"
shutil.rmtree(out, ignore_errors=True)
started = time.perf_counter()
if kind == "import":
    from xpsr_core.models.official import import_official
    import_official(work / "checkpoint", work / "sd15", out)
else:
    from safetensors.torch import load_file, save_file
    for part in ("controlnet", "unet"):
        tensors = load_file(str(work / "checkpoint" / part / "diffusion_pytorch_model.safetensors"))
        (out / part).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / part / "diffusion_pytorch_model.safetensors"))
        del tensors
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
print(json.dumps({"seconds": seconds, "peak_gib": peak}))
"""


def prepare(work: Path) -> None:
    import torch

    from xpsr_core.models import XPSRModel, XPSRSettings, load_base_sd
    from xpsr_core.models.official import export_official
    from xpsr_core.zoo import SD15_SHAPED, write_sd

    if not (work / "sd15" / "model_index.json").is_file():
        print("writing an SD-1.5-shaped base folder ...", flush=True)
        write_sd(work / "sd15", SD15_SHAPED, seed=0)
    if not (work / "checkpoint" / "unet" / "config.json").is_file():
        print("building the authors' architecture at SD-1.5 shapes and writing it in their layout ...", flush=True)
        unet = load_base_sd(work / "sd15", components=("unet",)).unet
        torch.manual_seed(0)
        model = XPSRModel.build(unet, XPSRSettings.official())
        export_official(model, work / "checkpoint")
        del model, unet


def run_child(kind: str, work: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(work)], check=True, capture_output=True, text=True, cwd=root
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/import-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    results: dict[str, list[dict]] = {"import": [], "copy floor": []}
    for round_index in range(args.rounds):
        for kind in results:
            figures = run_child("import" if kind == "import" else "copy", args.work)
            results[kind].append(figures)
            print(
                f"round {round_index + 1} {kind}: {figures['seconds']:.1f} s, peak {figures['peak_gib']:.2f} GiB",
                flush=True,
            )
    medians = {
        kind: {k: statistics.median(r[k] for r in rows) for k in ("seconds", "peak_gib")}
        for kind, rows in results.items()
    }
    for kind, figures in medians.items():
        print(f"{kind:>10}: {figures['seconds']:.1f} s, peak {figures['peak_gib']:.2f} GiB (median of {args.rounds})")
    print(f"import / copy floor: {medians['import']['seconds'] / medians['copy floor']['seconds']:.2f}x time, "
          f"{medians['import']['peak_gib'] / medians['copy floor']['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
