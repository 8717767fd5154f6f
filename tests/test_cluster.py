"""On a cluster: ranks from torchrun or SLURM (tasks and arrays), every rank stopping when one cannot go on,
files the group can read (the umask), and metrics that say which run made them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_xpsr, train_config
from stages import train as train_stage
from xpsr_core.dist import rank_and_world
from xpsr_core.errors import UserError
from xpsr_core.io.shards import TarShardWriter, read_shard

STEP = {"SLURM_STEP_ID": "0"}  # what srun sets in each task of a step

RANKS = [
    ({}, (0, 1)),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4)),
    # srun without a launcher
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, (2, 4)),
    ({**STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}, (1, 2)),
    # the batch script itself is one process, whatever --ntasks asked srun for
    ({"ENVIRONMENT": "BATCH", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, (0, 1)),
    # srun torchrun on 2 nodes x 4 GPUs: torchrun's global rank wins over the node task
    ({**STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "5", "WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2"},
     (5, 8)),
    # torchrun run by a batch script (not srun) in an allocation of 4 tasks
    ({"ENVIRONMENT": "BATCH", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "RANK": "3", "WORLD_SIZE": "4",
      "GROUP_WORLD_SIZE": "1"}, (3, 4)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
    # array tasks: the index counts from SLURM_ARRAY_TASK_MIN, in steps
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),
    # an array of 3 tasks of 2 srun tasks each: 6 ranks
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3",
      "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (5, 6)),
    # errors, naming the variables
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 / WORLD_SIZE=2"),
    ({"RANK": "0"}, "RANK and WORLD_SIZE must be set together"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID=4"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "0", "WORLD_SIZE": "2"}, "contradict SLURM_PROCID=1"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "RANK": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 contradict"),
    # srun -n 2 torchrun --nnodes 1: each task would start ranks 0..3 of its own
    ({**STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "0", "WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "1"},
     "GROUP_WORLD_SIZE=1"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "2"}, "SLURM_ARRAY_TASK_ID=4"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "not a list"),  # --array=1,3,7
]


@pytest.mark.parametrize("env, expected", RANKS)
def test_rank_and_world_from_the_launcher_and_slurm(env, expected):
    if isinstance(expected, tuple):
        assert rank_and_world(env) == expected
    else:
        with pytest.raises(UserError, match=None) as error:
            rank_and_world(env)
        assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("env, visible, expected", [
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}, 4, "cuda:3"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}, 1, "cuda:0"),  # --gpus-per-task=1
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "LOCAL_RANK": "1", "RANK": "3",
      "WORLD_SIZE": "4"}, 4, "cuda:1"),
    ({}, 4, "cuda"),
])
def test_rank_device_is_the_tasks_gpu(monkeypatch, env, visible, expected):
    import torch

    from xpsr_core.dist import rank_device

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "ENVIRONMENT",
                 "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert rank_device("cuda") == expected


def shard_outputs(folder: Path) -> dict[str, bytes]:
    """The shards, their indexes and done markers and sizes.json: what the stage makes (not its reports)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(("report", "config", "ledger"))}


def test_an_array_of_srun_steps_shards_like_one_process(photo_dir, hr_shards, tmp_path):
    """`xpsr shard` as a SLURM array of 2 tasks of 2 srun tasks each (4 ranks, array ids from 3) builds every
    shard once, and exactly the shards of one process (the hr_shards fixture: the same config, in-process)."""
    out = tmp_path / "hr"
    args = ("shard", f"photos={photo_dir}", "--out", out, "--crop-size", "96", "--images-per-shard", "2")
    for array_id in ("3", "4"):  # task 0 of array task 0 first: it records the folder the others wait for
        for task in ("0", "1"):
            env = {"SLURM_ARRAY_TASK_ID": array_id, "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2",
                   "SLURM_PROCID": task, "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
            result = run_xpsr(*args, cwd=tmp_path, env=env)
            assert result.code == 0, result.output
    reports = [json.loads((out / f"report.rank{rank}.json").read_text()) for rank in range(4)]
    assert sum(r["shards_processed"] for r in reports) == 3, "3 shards, each built by one rank"
    assert shard_outputs(out) == shard_outputs(hr_shards)


# ------------------------------------------------------------------ every rank stops when one cannot go on


@pytest.fixture(scope="module")
def rank_one_shard_broken(train_shards, tmp_path_factory) -> Path:
    """A copy of the training shards where every LR image of shard 00001 (the only one rank 1 of 2 reads) is
    undecodable."""
    out = tmp_path_factory.mktemp("rank-one-broken")
    for file in train_shards.iterdir():
        if file.is_file():
            shutil.copy(file, out / file.name)
    samples = list(read_shard(train_shards / "00001.tar"))
    with TarShardWriter(out / "00001.tar") as writer:
        for sample in samples:
            fields = {k: v for k, v in sample.items() if k != "__key__"}
            writer.write(sample["__key__"], {**fields, "lr.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10})
    return out


@pytest.mark.parametrize("case", ["bad samples on rank 1", "rank 0 cannot prepare the run folder"])
def test_when_one_rank_stops_every_rank_stops_with_the_reason(tiny_models, rank_one_shard_broken, tmp_path, case):
    settings = ["max_bad_samples=0", "tensorboard=false", "device=cpu", "shuffle_buffer=2", "collective_timeout=120"]
    if case == "bad samples on rank 1":
        settings.append("metrics_file=null")
        expected = ["on rank 1, worker 0, more than max_bad_samples=0", "at step 1: rank 1 could not go on"]
    else:  # the metrics file of another run, which rank 0 refuses to write over
        (tmp_path / "other").mkdir()
        (tmp_path / "train.json").write_text(json.dumps({"run": {"out": str(tmp_path / "other")}}))
        settings.append(f"metrics_file={tmp_path / 'train.json'}")
        expected = [f"the training run in {tmp_path / 'other'}", "before training: rank 0 could not prepare"]
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "--no-python", sys.executable, "-m", "stages.cli", "train",
               "--input-dir", str(rank_one_shard_broken), "--out", str(tmp_path / "run"), "--base-model",
               str(tiny_models.sd), "--batch-size", "1", "--max-train-steps", "50"]
    for setting in settings:
        command += ["--set", setting]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, output  # one per rank, each with its reason
    for fragment in expected:
        assert any(fragment in line for line in errors), (fragment, output)
    assert "stages/cli.py" not in output, output  # no traceback of xpsr's (torchrun prints one of its own)
    assert seconds < 90, f"{seconds:.0f} s: a rank waited for the other"


# ------------------------------------------------------------------ files the group can read


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_follow_the_umask(tiny_models, train_shards, photo_dir, tmp_path, umask, file_mode):
    from stages import shard

    previous = os.umask(umask)
    try:
        run_dir = tmp_path / "run"
        train_stage.run(train_config(tiny_models, train_shards, run_dir, max_train_steps=2, checkpointing_steps=1,
                                    metrics_file=tmp_path / "metrics" / "train.json"))
        hr = tmp_path / "hr"
        shard.run(shard.ShardConfig(inputs=[{"path": str(photo_dir), "dataset": "photos"}], out=hr, crop_size=96,
                                    images_per_shard=2))
    finally:
        os.umask(previous)
    files = [p for root in (run_dir, hr, tmp_path / "metrics") for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"diffusion_pytorch_model.safetensors", "00000.tar", "00000.parquet", "train.json"} <= names, names
    assert any("checkpoint-2" in p.parts for p in files) and any("final" in p.parts for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != file_mode}
    assert not wrong, wrong


# ------------------------------------------------------------------ metrics that say which run made them


def test_metrics_record_their_run_and_refuse_another_runs(tiny_models, train_shards, tmp_path):
    metrics = tmp_path / "metrics" / "train.json"
    first = train_config(tiny_models, train_shards, tmp_path / "a", max_train_steps=2, metrics_file=metrics)
    train_stage.run(first)
    record = json.loads(metrics.read_text())
    assert record["steps"] == 2
    assert record["run"]["out"] == str(tmp_path / "a") and record["run"]["config_hash"] == first.output_hash()
    assert record["run"]["code"] and record["run"]["started"].endswith("Z")
    header, *rows = [line.split("\t") for line in metrics.with_name("train_log.tsv").read_text().splitlines()]
    assert header[-1] == "config_hash" and {row[-1] for row in rows} == {first.output_hash()}
    # the same run, extended and resumed: its own record, updated
    train_stage.run(train_config(tiny_models, train_shards, tmp_path / "a", max_train_steps=3, metrics_file=metrics,
                                resume="latest"))
    assert json.loads(metrics.read_text())["steps"] == 3
    before = metrics.read_bytes()
    # another run folder: refused before training, in one line, and the record is left as it was
    result = run_xpsr("train", "--input-dir", train_shards, "--out", tmp_path / "b", "--base-model", tiny_models.sd,
                      "--max-train-steps", "1", "--set", f"metrics_file={metrics}", "--set", "tensorboard=false",
                      "--set", "device=cpu", cwd=tmp_path)
    assert_one_line_error(result, str(metrics), f"training run in {tmp_path / 'a'}", "metrics_file=")
    assert metrics.read_bytes() == before
    assert not list((tmp_path / "b").glob("checkpoint-*"))


def test_training_refuses_an_srun_step_without_a_launcher(tmp_path):
    result = run_xpsr("train", "--max-train-steps", "1", cwd=tmp_path,
                      env={"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})
    assert_one_line_error(result, "srun step of 2 tasks without torchrun", "--nnodes")


def test_each_task_of_an_array_of_training_runs_prepares_its_own_folder(tiny_models, train_shards, tmp_path,
                                                                        monkeypatch):
    """An array task after the first is its own training run: it must not wait for array task 0 to prepare it."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert rank_and_world() == (1, 2)
    config = train_config(tiny_models, train_shards, tmp_path / "run-1", max_train_steps=1)
    started = time.monotonic()
    train_stage.prepare_run_dir(config)
    assert time.monotonic() - started < 30
    assert json.loads((tmp_path / "run-1" / "config.json").read_text())["config_hash"] == config.output_hash()
