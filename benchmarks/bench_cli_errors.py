#!/usr/bin/env python
"""Seconds from starting ``xpsr`` to its error for a bad ``--set``, for every command, and of ``xpsr --help``.

    python benchmarks/bench_cli_errors.py [--rounds 3]

Each command runs in a fresh process as a user runs it (``python -m stages.cli ...``), outside any project
folder, with ``--set no_such_setting=1``; the line printed per command is the median wall time, whether the
error named the key, and the share of a torch import (``python -c 'import torch'``, measured the same way)
that it took. Settings import no torch, so the error comes before any model library loads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(argv: list[str], cwd: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started, done.stdout + done.stderr


def main() -> None:
    from stages.cli import COMMANDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cwd = tempfile.mkdtemp()
    torch_s = statistics.median(timed([sys.executable, "-c", "import torch"], cwd)[0] for _ in range(args.rounds))
    help_s = statistics.median(timed([sys.executable, "-m", "stages.cli", "--help"], cwd)[0]
                               for _ in range(args.rounds))
    print(f"{'command':<20} {'s to error':>10} {'named':>6} {'/ import torch':>15}")
    print(f"{'--help':<20} {help_s:>10.2f} {'-':>6} {help_s / torch_s:>15.2f}")
    for words in COMMANDS:
        runs = [timed([sys.executable, "-m", "stages.cli", *words, "--set", "no_such_setting=1"], cwd)
                for _ in range(args.rounds)]
        seconds = statistics.median(s for s, _ in runs)
        named = all("no_such_setting" in out and "Error:" in out for _, out in runs)
        print(f"{' '.join(words):<20} {seconds:>10.2f} {str(named):>6} {seconds / torch_s:>15.2f}")
    print(f"{'import torch':<20} {torch_s:>10.2f}")


if __name__ == "__main__":
    main()
