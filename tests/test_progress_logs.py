"""Progress reaches any log: with output to a pipe, long commands print plain periodic lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from xpsr_core.progress import progress_text

XPSR = str(Path(sys.executable).parent / "xpsr")


def run_piped(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    # stdout and stderr are pipes, as under dvc repro: no terminal, so no rich bars
    return subprocess.run([XPSR, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_train_prints_step_loss_and_rate_lines_to_a_pipe(tiny_models, train_shards, tmp_path):
    result = run_piped(
        [
            "train",
            "--input-dir",
            str(train_shards),
            "--out",
            str(tmp_path / "run"),
            "--base-model",
            str(tiny_models.sd),
            "--max-train-steps",
            "4",
            "--batch-size",
            "2",
            "--set",
            "progress_steps=1",
            "--set",
            "tensorboard=false",
            "--set",
            "metrics_file=null",
            "--set",
            "device=cpu",
            "--set",
            "shuffle_buffer=4",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: step")]
    assert [re.match(r"train: step (\d+)/4", line).group(1) for line in lines] == ["1", "2", "3"], result.stderr[-3000:]
    for line in lines:
        assert re.search(r"loss [0-9.e-]+, [0-9.e+]+ samples/s, [0-9.e+]+ steps/s, ETA \d+:\d\d", line), line


def test_shard_stages_print_done_total_rate_and_eta_at_an_interval(tmp_path):
    from stages import shard

    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    from conftest import photo

    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(photo(name, (96, 96))).save(photos / f"{name}.png")
    hr = tmp_path / "hr"
    shard.run(
        shard.ShardConfig(inputs=[{"path": str(photos), "dataset": "p"}], out=hr, crop_size=96, images_per_shard=1)
    )
    result = run_piped(["--progress-seconds", "0.05", "degrade", "--input-dir", str(hr), "--out",
                        str(tmp_path / "pairs"), "--batch-size", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if re.match(r"degrade: \d", line)]  # not the start line
    assert len(lines) >= 2, result.stderr[-3000:]
    for line in lines:
        assert re.fullmatch(
            r"degrade: [0-4]/4 shards \(\d+%\), [0-9.e+]+ shards/s, ETA (\d+:\d\d|unknown), [0-9.e+]+ samples/s", line
        ), line
    assert "━" not in result.stderr  # no rich bars in a log


def test_progress_text_figures():
    assert (
        progress_text("caption", 3, 10, 6.0, "shards", done_before=1)
        == "caption: 3/10 shards (30%), 0.333 shards/s, ETA 0:21"
    )
    assert progress_text("x", 0, 5, 1.0, "shards").endswith("ETA unknown")
