"""Stage train: XPSR (ControlNet + SFA + Conditional Attention + DFC) on the training shards.

Runs as ``xpsr train`` in one process or under ``accelerate launch`` / ``torchrun`` on many.
The run folder holds ``checkpoint-N/`` (resumable), ``train_log.tsv``, TensorBoard logs under
``logs/``, and ``final/`` (the trained parts in from_pretrained layout).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from xpsr_core.errors import UserError
from xpsr_core.train.settings import TrainConfig

STAGE = "train"

__all__ = ["TrainConfig", "run"]


def prepare_run_dir(config: TrainConfig) -> None:
    """Refuse to mix runs of different configs; refuse to silently restart over checkpoints."""
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.train.loop import LOG_FILE, list_checkpoints

    # what the trainer writes there other than by atomic writes (checkpoints: Trainer.save_checkpoint)
    run_dir = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite,
                                 claims=("logs/", "validation/", "final/", LOG_FILE))
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
    from stages.common import console
    from xpsr_core.dist import rank_and_world
    from xpsr_core.io.atomic import atomic_write_json
    from xpsr_core.io.outputs import mark_finished
    from xpsr_core.io.shards import require_finished
    from xpsr_core.train.loop import LOG_FILE, train

    require_finished(Path(config.train_dir), "training-shard", "Run `xpsr embed` first.")
    report = train(config, prepare_run_dir)
    rank, world = rank_and_world()
    run_dir = Path(config.out)
    atomic_write_json(run_dir / (f"report.rank{rank}.json" if world > 1 else "report.json"), report)
    if rank == 0:
        mark_finished(run_dir)
        if config.metrics_file is not None:
            Path(config.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            metrics = {
                k: report[k] for k in ("steps", "final_loss", "first_loss", "samples_per_s", "seconds", "processes")
            }
            atomic_write_json(Path(config.metrics_file), metrics)
            # the loss curves beside the metrics, for `dvc plots` (the run folder is a DVC output)
            shutil.copyfile(run_dir / LOG_FILE, Path(config.metrics_file).with_name(LOG_FILE))
        console.print(train_summary(report))
    return report
