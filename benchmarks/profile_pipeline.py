"""Wall time and peak memory of each `dvc repro` stage on the embedded default.

Runs the stages of dvc.yaml one at a time in pipeline order (`dvc repro -s STAGE`) under
/usr/bin/time and prints, per stage, wall seconds, the peak RSS of the largest process it
started, and its share of the total. Run it in a fresh clone, instead of `dvc repro`: stages
that resume (shard, degrade, caption, embed, train) would find finished outputs otherwise.

    python benchmarks/profile_pipeline.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    if Path("dvc.lock").exists():
        sys.exit("dvc.lock exists: the pipeline has run here already. Profile a fresh clone.")
    rows = []
    for stage in stages:
        with tempfile.NamedTemporaryFile("r", suffix=".time") as timing:
            result = subprocess.run(
                ["/usr/bin/time", "-f", "%e %M", "-o", timing.name, "dvc", "repro", "-s", stage],
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
