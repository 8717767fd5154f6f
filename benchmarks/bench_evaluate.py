"""Evaluation throughput (pairs/s): our PSNR/SSIM on Y alone, against the authors' pyiqa metrics as well.

Pairs are real photographs (scikit-image's) cut to 512 x 512 HR with a bicubic 128 x 128 LR; the
method is bicubic, so the figures are the cost of scoring. The pyiqa metrics that need weights run
from files fabricated in the real layouts and shapes (random values: the same arithmetic as the
released weights). Each case runs in a fresh process, cases alternate for ``--rounds`` rounds, and
the medians are reported.

    python benchmarks/bench_evaluate.py [--pairs 4] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = ["psnr_y", "ssim_y"]
WITH_PYIQA = OURS + ["psnr", "ssim", "lpips", "dists", "niqe"]
CASES = {"ours": OURS, "with_pyiqa": WITH_PYIQA}
LPIPS_CHANNELS = (64, 192, 384, 256, 256)  # AlexNet's relu1..relu5
DISTS_CHANNELS = 3 + 64 + 128 + 256 + 512 + 512  # the image and VGG-16's five stages


def write_pairs(folder: Path, count: int) -> None:
    from PIL import Image

    from stages.demo_data import DEMO_IMAGES, load_sample

    for sub in ("lr", "hr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = list(DEMO_IMAGES)
    for index in range(count):
        hr = Image.fromarray(load_sample(names[index % len(names)])).convert("RGB").resize((512, 512), Image.BICUBIC)
        hr.save(folder / "hr" / f"{index:03d}.png")
        hr.resize((128, 128), Image.BICUBIC).save(folder / "lr" / f"{index:03d}.png")


def write_weights(folder: Path) -> None:
    """Random weight files under the names and in the layouts the metrics load (see xpsr_core/metrics/engine.py)."""
    import numpy as np
    import scipy.io
    import torch
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for model, file in ((torchvision.models.alexnet(), "alexnet-owt-7be5be79.pth"),
                        (torchvision.models.vgg16(), "vgg16-397923af.pth")):
        torch.save(
            {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in model.state_dict().items()}, folder / file
        )
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(LPIPS_CHANNELS)},
        folder / "LPIPS_v0.1_alex-df73285e.pth",
    )
    torch.save(
        {
            "alpha": torch.rand(1, DISTS_CHANNELS, 1, 1, generator=generator),
            "beta": torch.rand(1, DISTS_CHANNELS, 1, 1, generator=generator),
        },
        folder / "DISTS_weights-f5e65c96.pth",
    )
    rng = np.random.default_rng(0)
    factor = rng.normal(size=(36, 36))
    scipy.io.savemat(folder / "niqe_modelparameters.mat",
                     {"mu_prisparam": rng.normal(size=(1, 36)), "cov_prisparam": factor @ factor.T / 36 + np.eye(36)})


def run_case(metrics: list[str], data: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from xpsr_core.evaluation.compare import evaluate_methods
    from xpsr_core.evaluation.methods import MethodSpec
    from xpsr_core.evaluation.pairs import pairs_from_folders
    from xpsr_core.metrics import prepare_metrics

    pairs = pairs_from_folders(data / "lr", data / "hr")
    runs = prepare_metrics(metrics, data / "weights", "cpu", crop_border=4)
    missing = {run.name: run.reason for run in runs if not run.computed}
    if missing:
        raise SystemExit(f"metrics not computed: {missing}")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        evaluation = evaluate_methods(pairs, [MethodSpec(name="bicubic", kind="bicubic")], runs, scale=4, out=Path(out),
                                      grid_images=0)
        seconds = time.perf_counter() - started
    assert all(row["status"] == "ok" for row in evaluation.rows)
    return {"pairs": len(pairs), "seconds": seconds, "pairs_per_s": len(pairs) / seconds}


def per_metric_seconds(data: Path, threads: int, pairs: int = 2) -> dict:
    """Seconds per pair of each metric alone (scoring only, after creation), on the first ``pairs`` pairs."""
    import torch

    torch.set_num_threads(threads)
    from xpsr_core.evaluation.baselines import bicubic_upscale
    from xpsr_core.evaluation.pairs import pairs_from_folders
    from xpsr_core.metrics import prepare_metrics

    chosen = pairs_from_folders(data / "lr", data / "hr")[:pairs]
    seconds = {}
    for run in prepare_metrics(WITH_PYIQA, data / "weights", "cpu", crop_border=4):
        started = time.perf_counter()
        for pair in chosen:
            run.score(bicubic_upscale(pair.lr, 4), pair.hr)
        seconds[run.name] = (time.perf_counter() - started) / len(chosen)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case == "per_metric":
        print(json.dumps(per_metric_seconds(Path(args.data), args.threads)))
        return
    if args.case:
        print(json.dumps(run_case(CASES[args.case], Path(args.data), args.threads)))
        return
    data = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    write_pairs(data, args.pairs)
    write_weights(data / "weights")
    results: dict[str, list[float]] = {name: [] for name in CASES}
    for round_index in range(args.rounds):
        for name in CASES:
            command = [sys.executable, __file__, "--case", name, "--data", str(data), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(output.strip().splitlines()[-1])["pairs_per_s"])
            print(f"round {round_index + 1} {name}: {results[name][-1]:.3f} pairs/s", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in results.items()}
    command = [sys.executable, __file__, "--case", "per_metric", "--data", str(data), "--threads", str(args.threads)]
    per_metric = json.loads(
        subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )
    print(json.dumps({"pairs": args.pairs, "size": "128 -> 512", "threads": args.threads, "rounds": args.rounds,
                      "load_average": os.getloadavg()[0], "metrics": CASES, "pairs_per_s_median": medians,
                      "pairs_per_s_all": results, "ratio_with_pyiqa_to_ours": medians["with_pyiqa"] / medians["ours"],
                      "seconds_per_pair_by_metric": per_metric},
                     indent=2))


if __name__ == "__main__":
    main()
