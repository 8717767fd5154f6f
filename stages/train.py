"""Stage train: XPSR (ControlNet + SFA + Conditional Attention + DFC) on the training shards.

Runs as ``xpsr train`` in one process or under ``accelerate launch`` / ``torchrun`` on many (under SLURM:
one torchrun per node, started by srun; a SLURM array does not split training, each array task is a run).
The run folder holds ``checkpoint-N/`` (resumable), ``train_log.tsv``, TensorBoard logs under
``logs/``, and ``final/`` (the trained parts in from_pretrained layout). ``metrics_file`` records which run
made it (run folder, config hash, code, start time): another run folder's metrics are never written over.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from stages.common import console
from xpsr_core.dist import process_rank_and_world, slurm_step_tasks
from xpsr_core.errors import UserError
from xpsr_core.fingerprint import stage_fingerprint
from xpsr_core.io.atomic import PARTIAL_FOLDER, atomic_write_json
from xpsr_core.io.shards import require_finished
from xpsr_core.train.settings import TrainConfig

STAGE = "train"

__all__ = ["TrainConfig", "run"]


def prepare_run_dir(config: TrainConfig) -> None:
    """Refuse to mix runs of different configs; refuse to silently restart over checkpoints."""
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.train.loop import LOG_FILE, list_checkpoints

    check_metrics_owner(config)
    # what the trainer writes there other than by atomic writes (checkpoints: Trainer.save_checkpoint)
    claims = ("logs/", "validation/", "final/", f"final{PARTIAL_FOLDER}/", LOG_FILE)
    run_dir = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite, claims=claims,
                                 ranks=process_rank_and_world())
    if config.resume is None and list_checkpoints(run_dir):
        if not config.overwrite:
            raise UserError(
                f"{run_dir} already holds checkpoints of this configuration. Pass --resume latest to continue, "
                "or --overwrite to start over (the checkpoints are deleted)."
            )
        for old in list_checkpoints(run_dir):
            shutil.rmtree(old)
        for stale in (run_dir / LOG_FILE, run_dir / "final"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()


def run_record(config: TrainConfig, started: float) -> dict:
    """Which run the metrics are of: its folder, config hash, code fingerprint and start time (UTC)."""
    return {"out": str(config.out), "config_hash": config.output_hash(), "code": stage_fingerprint(STAGE)["code"],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}


def check_metrics_owner(config: TrainConfig) -> None:
    """Refuse to write over the metrics of another run folder (one that still exists). The same folder's record
    is this run's own (resumed, extended, or --overwrite started over), so it is updated."""
    if config.metrics_file is None or not Path(config.metrics_file).is_file():
        return
    try:
        recorded = (json.loads(Path(config.metrics_file).read_text()).get("run") or {}).get("out")
    except (OSError, ValueError, AttributeError):
        recorded = None  # not a record of ours: nothing to protect
    if recorded is None or Path(recorded).resolve() == Path(config.out).resolve() or not Path(recorded).exists():
        return
    raise UserError(
        f"{config.metrics_file} holds the metrics of the training run in {recorded}, not of {config.out}. Give this "
        "run a metrics file of its own (--set metrics_file=PATH, or metrics_file=null for none), or delete "
        f"{config.metrics_file} first."
    )


def refuse_srun_without_launcher() -> None:
    """Training needs one process group: srun's tasks alone would each train by themselves into one folder."""
    step = slurm_step_tasks(os.environ)
    if step is not None and step[1] > 1 and "RANK" not in os.environ:
        raise UserError(
            f"xpsr train runs in an srun step of {step[1]} tasks without torchrun or accelerate launch, so every "
            "task would train alone into the same run folder. Start one launcher per node: srun --ntasks-per-node 1 "
            "torchrun --nnodes $SLURM_NNODES --nproc_per_node GPUS --rdzv_backend c10d --rdzv_endpoint HOST:29500 "
            "--no-python xpsr train ... (or accelerate launch with --num_machines and --machine_rank $SLURM_PROCID)."
        )


def train_summary(report: dict) -> str:
    """The final line, in words when this run had nothing to do (no None figures)."""
    if not report.get("steps_this_run"):
        return (f"[bold green]train[/] done: nothing to do, the run is already at step {report['steps']} "
                f"(max_train_steps; resumed from its checkpoint); export in {report['final_export']}")
    return (
        f"[bold green]train[/] done: step {report['steps']} ({report['steps_this_run']} this run, "
        f"from {report['resumed_from']}), "
        f"loss {report['first_loss']} -> {report['final_loss']}, {report['samples_per_s']} samples/s, "
        f"export in {report['final_export']}"
    )


def run(config: TrainConfig) -> dict:
    from xpsr_core.io.outputs import mark_finished
    from xpsr_core.train.loop import LOG_FILE, train

    refuse_srun_without_launcher()
    require_finished(Path(config.input_dir), "training-shard", "Run `xpsr embed` first.")
    started = time.time()
    report = train(config, prepare_run_dir)
    rank, world = process_rank_and_world()
    run_dir = Path(config.out)
    atomic_write_json(run_dir / (f"report.rank{rank}.json" if world > 1 else "report.json"), report)
    if rank == 0:
        mark_finished(run_dir)
        if config.metrics_file is not None:
            Path(config.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            metrics = {
                k: report[k] for k in ("steps", "final_loss", "first_loss", "samples_per_s", "seconds", "processes")
            }
            check_metrics_owner(config)  # again: another run may have written it since this one started
            metrics["run"] = run_record(config, started)
            atomic_write_json(Path(config.metrics_file), metrics)
            # the loss curves beside the metrics, for `dvc plots` (the run folder is a DVC output)
            shutil.copyfile(run_dir / LOG_FILE, Path(config.metrics_file).with_name(LOG_FILE))
        console.print(train_summary(report))
    return report
