"""Wall time and peak memory of each `dvc repro` stage on the embedded default.

Runs every stage of dvc.yaml once more (forced, dependencies not rerun: `dvc repro -s -f STAGE`)
in pipeline order under /usr/bin/time and prints, per stage, wall seconds, the peak RSS of the
largest process it started, and its share of the total.

    python benchmarks/profile_pipeline.py            # from a checkout where `dvc repro` has run
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    rows = []
    for stage in stages:
        with tempfile.NamedTemporaryFile("r", suffix=".time") as timing:
            result = subprocess.run(
                ["/usr/bin/time", "-f", "%e %M", "-o", timing.name, "dvc", "repro", "-s", "-f", stage],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                sys.exit(f"stage {stage} failed:\n{result.stderr[-2000:]}")
            seconds, max_kib = Path(timing.name).read_text().split()[-2:]
        rows.append((stage, float(seconds), int(max_kib) / 1024))
    total = sum(seconds for _, seconds, _ in rows)
    print(f"{'stage':<12} {'wall s':>8} {'share':>7} {'peak RSS MiB':>13}")
    for stage, seconds, mib in rows:
        print(f"{stage:<12} {seconds:>8.1f} {seconds / total:>7.1%} {mib:>13.0f}")
    print(f"{'total':<12} {total:>8.1f}")


if __name__ == "__main__":
    main()
