"""The training step leaves its losses on the device: host reads only at read-backs, the log still complete and
unchanged, and a NaN between two read-backs still stops the run with the last good state checkpointed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_config
from stages import train as train_stage
from xpsr_core.train.loop import STATE_FILE, Trainer, TrainingDiverged, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 6


def host_read_counter():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_train_step.py"
    spec = importlib.util.spec_from_file_location("profile_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HostReadCounter()


def make_config(tiny_models, train_shards, out, **changes) -> train_stage.TrainConfig:
    # a warm-up, so that the learning rate differs from step to step
    return train_config(tiny_models, train_shards, out, **{"checkpointing_steps": 1000, "warmup_steps": 3, **changes})


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{file.parent.name}/{name}": value for file in sorted((run_dir / "final").rglob("*.safetensors"))
            for name, value in load_file(file).items()}


def log_rows(run_dir: Path) -> dict[int, list[str]]:
    """step -> the row's fields without samples_per_s (a timing)."""
    header, *rows = [line.split("\t") for line in (run_dir / "train_log.tsv").read_text().splitlines()]
    keep = [i for i, name in enumerate(header) if name != "samples_per_s"]
    return {int(fields[0]): [fields[i] for i in keep] for fields in rows}


@pytest.fixture(scope="module")
def logged_every_step(tiny_models, train_shards, tmp_path_factory) -> tuple[Path, dict]:
    from accelerate.state import AcceleratorState

    run_dir = tmp_path_factory.mktemp("every-step") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    report = train_stage.run(make_config(tiny_models, train_shards, run_dir))
    return run_dir, report


def test_no_host_reads_between_read_backs_and_the_log_unchanged(tiny_models, train_shards, tmp_path, logged_every_step):
    reference_dir, reference = logged_every_step
    run_dir = tmp_path / "run"
    trainer = Trainer(make_config(tiny_models, train_shards, run_dir, log_every=3))
    reads = []
    with host_read_counter() as counter:
        report = trainer.train(after_step=lambda _: reads.append(sum(counter.take().values())))
    # one read-back after steps 3 and 6 (the log steps; 6 also ends the run) and nothing else, but for step 1's
    # count: the data loader, as it starts, draws its base seed in a host tensor and reads it (once a run)
    assert reads == [1, 0, 1, 0, 0, 1]
    rows, reference_rows = log_rows(run_dir), log_rows(reference_dir)
    assert sorted(rows) == [3, 6] and all(rows[step] == reference_rows[step] for step in rows)
    # the steps that were not logged still reach the report, with the same values
    assert report["steps_this_run"] == STEPS
    assert (report["first_loss"], report["final_loss"]) == (reference["first_loss"], reference["final_loss"])
    assert report["parameter_digest"] == reference["parameter_digest"]


def test_a_nan_between_read_backs_stops_with_the_state_of_the_last_good_step(tiny_models, train_shards, tmp_path,
                                                                              monkeypatch, logged_every_step):
    import xpsr_core.models.xpsr as models

    reference_dir, _ = logged_every_step
    real = models.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, logs = real(*args, **kwargs)
        if calls["n"] == 2:
            return loss * float("nan"), {**logs, "loss": logs["loss"] * float("nan")}
        return loss, logs

    run_dir = tmp_path / "run"
    monkeypatch.setattr(models, "training_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="became nan at step 2 .* saved in .*checkpoint-1"):
        train_stage.run(make_config(tiny_models, train_shards, run_dir, log_every=4))
    assert calls["n"] == 4, "found at the read-back after step 4, not before"
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-1"]
    assert json.loads((run_dir / "checkpoint-1" / STATE_FILE).read_text())["global_step"] == 1
    assert not (run_dir / "train_log.tsv").read_text(), "no step was logged"
    monkeypatch.setattr(models, "training_loss", real)
    # the weights, the optimizer, the LR schedule and the data stream are those after step 1: resuming from
    # there ends exactly where a run that never diverged ends
    resumed = train_stage.run(make_config(tiny_models, train_shards, run_dir, log_every=4, resume="latest"))
    assert resumed["resumed_from"] == 1
    a, b = exported(run_dir), exported(reference_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TWO_RANK_RUN = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import torch

    import xpsr_core.models.xpsr as models
    from xpsr_core.train.loop import Trainer, TrainingDiverged, parameter_digest
    from xpsr_core.train.settings import TrainConfig

    torch.set_num_threads(1)
    rank, real, calls = int(os.environ["RANK"]), models.training_loss, []

    def poisoned(*args, **kwargs):  # rank 1's second loss is NaN
        calls.append(1)
        loss, logs = real(*args, **kwargs)
        if rank == 1 and len(calls) == 2:
            return loss * float("nan"), {**logs, "loss": logs["loss"] * float("nan")}
        return loss, logs

    models.training_loss = poisoned
    config = TrainConfig(**json.loads(sys.argv[1]))
    trainer = Trainer(config)
    try:
        trainer.train()
        outcome = "finished"
    except TrainingDiverged as error:
        outcome = str(error)
    digest = parameter_digest(trainer.accelerator.unwrap_model(trainer.model))
    outcome = {"outcome": outcome, "losses": len(calls), "digest": digest}
    Path(config.out, f"outcome.rank{rank}.json").write_text(json.dumps(outcome))
""")


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_read_back(tiny_models, train_shards, tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "run_two_ranks.py"
    script.write_text(TWO_RANK_RUN)
    config = dict(input_dir=str(train_shards), out=str(run_dir), base_model=str(tiny_models.sd), batch_size=1,
                  max_train_steps=STEPS, checkpointing_steps=1000, log_every=4, shuffle_buffer=2, tensorboard=False,
                  metrics_file=None, device="cpu")
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(script), json.dumps(config)]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    outcomes = [json.loads((run_dir / f"outcome.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert "became non-finite on another rank at step 2" in outcomes[0]["outcome"]
    assert "became nan at step 2" in outcomes[1]["outcome"]
    assert all("checkpoint-1" in o["outcome"] and o["losses"] == 4 for o in outcomes), outcomes
    assert outcomes[0]["digest"] == outcomes[1]["digest"], "both ranks skipped the same updates"
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-1"]
    for file in (run_dir / "checkpoint-1").rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(file).values())
