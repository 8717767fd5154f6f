"""Rank sharding for multi-process stages: torchrun, accelerate launch, SLURM tasks and SLURM array jobs.

Each rank takes the shards whose number is congruent to its rank; results merge by shard id,
so no shard is processed twice and the union equals a single-process run.

Where the rank comes from (``rank_and_world``):

1. A launcher (torchrun, accelerate launch): ``RANK`` / ``WORLD_SIZE``. When present they win; SLURM's task
   variables then only cross-check them, because ``srun torchrun ...`` runs one torchrun per SLURM task and
   ``SLURM_PROCID`` numbers those tasks (nodes), not the processes. Each torchrun must join one rendezvous
   with the others: torchrun's ``GROUP_WORLD_SIZE`` (its ``--nnodes``) must equal the step's SLURM task count,
   else every task would start its own ranks 0..N-1 and process the same shards. Without torchrun's variables
   (``RANK`` set by hand in each task), ``RANK`` / ``WORLD_SIZE`` must equal ``SLURM_PROCID`` / the task count.
2. Else an ``srun`` step: ``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``). A batch script
   itself (``ENVIRONMENT=BATCH`` without ``SLURM_STEP_ID``) is one process whatever ``--ntasks`` asked for:
   there ``SLURM_NTASKS`` describes the allocation, and only ``srun`` starts the tasks.
3. Else one process: rank 0 of 1.

A SLURM array job (``SLURM_ARRAY_TASK_ID``) multiplies that: array task ``a`` (its index ``(ID - MIN) / STEP``
among ``SLURM_ARRAY_TASK_COUNT`` tasks; an array need not start at 0) with ``w`` ranks of its own gives global
rank ``a * w + rank`` of ``COUNT * w``. Every array task must run the same number of ranks and the array must be
a range (``--array=0-7`` or ``1-15:2``; a ``%`` limit is fine), so that the tasks cover every shard once.

Conflicting or out-of-range values raise a UserError naming the variables.
"""

from __future__ import annotations

import os
from typing import Mapping

from .errors import UserError


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"The environment variable {name}={value!r} is not a whole number.") from None


def slurm_step_tasks(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(SLURM_PROCID, the step's task count) inside an ``srun`` step; None outside one."""
    if "SLURM_PROCID" not in env:
        return None
    if env.get("ENVIRONMENT") == "BATCH" and "SLURM_STEP_ID" not in env:
        return None  # the batch script itself: SLURM_NTASKS counts the tasks srun would start, not this process
    count_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if count_name not in env:
        return None
    task, tasks = _int_var(env, "SLURM_PROCID"), _int_var(env, count_name)
    if tasks < 1 or not 0 <= task < tasks:
        raise UserError(f"Inconsistent SLURM task variables: SLURM_PROCID={task} is not in 0..{count_name}-1 "
                        f"({count_name}={tasks}).")
    return task, tasks


def _launcher_rank(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) of torchrun or accelerate launch, cross-checked against an enclosing srun step."""
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise UserError("RANK and WORLD_SIZE must be set together (a launcher sets both); only "
                        f"{'RANK' if 'RANK' in env else 'WORLD_SIZE'} is set.")
    rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"Inconsistent RANK={rank} / WORLD_SIZE={world} in the environment: RANK must be in "
                        "0..WORLD_SIZE-1.")
    step = slurm_step_tasks(env)
    if step is not None and step[1] > 1:
        task, tasks = step
        if "GROUP_WORLD_SIZE" in env:  # torchrun: one launcher per SLURM task, all in one rendezvous
            groups = _int_var(env, "GROUP_WORLD_SIZE")
            if groups != tasks:
                raise UserError(
                    f"torchrun's GROUP_WORLD_SIZE={groups} (--nnodes) differs from the srun step's {tasks} tasks "
                    f"(SLURM_PROCID={task}): each task would start its own ranks and process the same shards. "
                    f"Give torchrun --nnodes {tasks} and a shared --rdzv_endpoint, or run srun with one task."
                )
        elif (rank, world) != (task, tasks):
            raise UserError(
                f"RANK={rank} / WORLD_SIZE={world} contradict SLURM_PROCID={task} / {tasks} SLURM tasks: set both "
                "from SLURM (RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS) or leave RANK and WORLD_SIZE unset."
            )
    return rank, world


def _array_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index from 0, count) of this SLURM array task; None outside an array job."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task_id = _int_var(env, "SLURM_ARRAY_TASK_ID")
    lowest = _int_var(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _int_var(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = _int_var(env, "SLURM_ARRAY_TASK_COUNT")
    elif "SLURM_ARRAY_TASK_MAX" in env:
        count = (_int_var(env, "SLURM_ARRAY_TASK_MAX") - lowest) // max(step, 1) + 1
    else:
        raise UserError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX: "
                        "the number of array tasks, which the shards are split over, is unknown.")
    index, off_step = divmod(task_id - lowest, max(step, 1))
    regular = "SLURM_ARRAY_TASK_MAX" not in env or lowest + (count - 1) * step == _int_var(env, "SLURM_ARRAY_TASK_MAX")
    if step < 1 or count < 1 or off_step or not 0 <= index < count or not regular:
        raise UserError(
            f"SLURM_ARRAY_TASK_ID={task_id} is not one of {count} array tasks from SLURM_ARRAY_TASK_MIN={lowest} "
            f"in steps of {step} (SLURM_ARRAY_TASK_COUNT, _MAX, _STEP): split shards over an array that is a range "
            "(--array=0-N or A-B:S), not a list."
        )
    return index, count


def rank_and_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's shard rank and the number of ranks (see the module docstring for the rule)."""
    env = os.environ if env is None else env
    rank, world = _launcher_rank(env) or slurm_step_tasks(env) or (0, 1)
    array = _array_task(env)
    if array is not None:
        index, count = array
        rank, world = index * world + rank, count * world
    return rank, world


def process_rank_and_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The rank among the processes of this one job (a launcher's or an srun step's), without the array split:
    the processes that talk to each other, as training's do."""
    env = os.environ if env is None else env
    return _launcher_rank(env) or slurm_step_tasks(env) or (0, 1)


def shards_for_rank(shards: list[int], rank: int, world: int) -> list[int]:
    return [s for s in shards if s % world == rank]


def _local_gpu_index(env: Mapping[str, str], visible: int) -> int | None:
    """This process's GPU among the ``visible`` ones: LOCAL_RANK under a launcher, else SLURM_LOCALID in an
    srun step (0 where SLURM gave each task a GPU of its own, so that it sees only that one)."""
    if "LOCAL_RANK" in env:
        return _int_var(env, "LOCAL_RANK")
    if slurm_step_tasks(env) is None or "SLURM_LOCALID" not in env:
        return None
    local = _int_var(env, "SLURM_LOCALID")
    if visible == 1:
        return 0
    if not 0 <= local < visible:
        raise UserError(f"SLURM_LOCALID={local}, but this task sees {visible} GPUs: ask SLURM for a GPU per task "
                        "(--gpus-per-task=1) or at most as many tasks per node as GPUs.")
    return local


def rank_device(device: str) -> str:
    """The device this process should use: under a launcher or srun, plain ``cuda`` means this rank's GPU
    (LOCAL_RANK, else SLURM_LOCALID); ``auto`` means that GPU when PyTorch sees one, else the CPU.

    Raises UserError when a GPU is asked for and PyTorch sees none.
    """
    if device != "auto" and not device.startswith("cuda"):
        return device
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            return device
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {device} was asked for, but PyTorch sees no CUDA GPU on this machine. Use --device cpu."
        )
    if device == "cuda":
        local = _local_gpu_index(os.environ, torch.cuda.device_count())
        if local is not None:
            return f"cuda:{local}"
    return device
