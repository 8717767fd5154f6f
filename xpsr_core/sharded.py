"""Sharded stages: one worker call per shard, resumable, split across ranks and processes, summarized.

A stage is a ``ShardedStage``: its output folder, how many shards it has, and ``work``, a picklable
callable that builds one shard (read its inputs, process them, write tar / index and, last, the
stats file that marks it done) and returns its stats. ``run_sharded`` builds this rank's unfinished
shards, writes sizes.json once every shard of every rank is done, and returns the report:

    stage = ShardedStage(name="degrade", out=out, n_shards=n, unit="samples",
                         work=functools.partial(degrade_shard, settings, hr_dir, out))
    report = run_sharded(stage, progress=lambda update: print(update.done, "/", update.total))

Workers record what became of every input with a ``Status`` and build their stats with
``shard_stats``; a stage's own figures come from its workers' stats through ``ShardedStage.totals``.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .dist import rank_and_world, shards_for_rank
from .errors import FailureRatioExceeded
from .io import images
from .io.atomic import atomic_path, atomic_write_json
from .io.shards import is_done, read_stats, write_sizes


class Status(StrEnum):
    """What became of one input of a shard, as its index or manifest row and the stats record it."""

    OK = images.OK
    # the image decoder's verdicts on a file, and the input walk's on a path (xpsr_core.io.images)
    EMPTY_FILE = images.EMPTY_FILE
    UNREADABLE = images.UNREADABLE
    DECODE_ERROR = images.DECODE_ERROR
    TOO_LARGE = images.TOO_LARGE
    TOO_SMALL = images.TOO_SMALL
    UNSUPPORTED_MODE = images.UNSUPPORTED_MODE
    BROKEN_LINK = images.BROKEN_LINK
    LINK_LOOP = images.LINK_LOOP
    NOT_A_FILE = images.NOT_A_FILE
    BAD_SIZE = "bad_size"  # an HR sample the degradation cannot take (not square, not divisible, too small)
    EMPTY_GENERATION = "empty_generation"  # the captioner generated no text
    CAPTION_FAILED = "caption_failed"  # the caption server gave no answer, after its retries
    DROPPED = "dropped"  # left out on purpose (a key without an image or an ok caption): not a failure


NOT_FAILED = (Status.OK, Status.DROPPED)


def shard_stats(shard: int, statuses: Iterable[str], samples: int, **extra) -> dict:
    """A shard's stats (its done marker): inputs, samples written, failures, counts by status, ``extra`` fields."""
    counts = Counter(str(status) for status in statuses)
    inputs = sum(counts.values())
    return {
        "shard": shard,
        "inputs": inputs,
        "samples": samples,
        "failed": inputs - sum(counts.get(status, 0) for status in NOT_FAILED),
        "status_counts": dict(sorted(counts.items())),
        **extra,
    }


def write_index(path: Path, rows: list[dict], schema=None) -> None:
    """A Parquet file of ``rows`` (a shard's index or manifest) that appears under its name only when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


def summarize(stage: str, all_stats: Iterable[dict], processed: list[dict], seconds: float) -> dict:
    """Totals over every done shard of the stage, plus this run's timing (``processed``: shards built now)."""
    all_stats = list(all_stats)
    status_counts: Counter = Counter()
    for stats in all_stats:
        status_counts.update(stats.get("status_counts", {}))
    processed_samples = sum(s.get("samples", 0) for s in processed)
    return {
        "stage": stage,
        "shards": len(all_stats),
        "shards_processed": len(processed),
        "shards_skipped": len(all_stats) - len(processed),
        "inputs": sum(s.get("inputs", 0) for s in all_stats),
        "samples": sum(s.get("samples", 0) for s in all_stats),
        "failed": sum(s.get("failed", 0) for s in all_stats),
        "status_counts": dict(sorted(status_counts.items())),
        "seconds": round(seconds, 3),
        "samples_per_s": round(processed_samples / seconds, 3) if seconds > 0 and processed else None,
    }


def check_failure_ratio(report: dict, max_ratio: float, unit: str) -> None:
    """Raise FailureRatioExceeded when more than ``max_ratio`` of the report's inputs (``unit``) failed."""
    inputs = report["inputs"]
    if inputs and report["failed"] / inputs > max_ratio:
        counts = ", ".join(f"{k}: {v}" for k, v in report["status_counts"].items() if k not in NOT_FAILED)
        raise FailureRatioExceeded(
            f"{report['failed']} of {inputs} {unit} failed ({counts}), more than the allowed share "
            f"{max_ratio:.0%}. The shards that worked are kept; see the Parquet indexes for each failure, "
            f"or raise max_failure_ratio."
        )


@dataclass(frozen=True, kw_only=True)
class ShardedStage:
    """What ``run_sharded`` needs to know of a stage."""

    name: str  # the stage's name, in the report and the progress label
    out: Path  # the output folder, prepared by ``io.outputs.prepare_output_dir``
    n_shards: int
    work: Callable[[int], dict]  # builds one shard, writes its stats file last, returns its stats; picklable
    workers: int = 1  # more than one: a process pool
    start_method: str = "spawn"  # of the pool's processes: "fork" starts far faster where workers need no torch
    max_failure_ratio: float = 1.0  # the share of failed inputs over which the run fails
    unit: str = "inputs"  # what the inputs are, in the failure message ("input files", "samples")
    totals: Callable[[dict, list[dict]], dict] | None = None  # (report, every done shard's stats) -> stage figures
    redo: Callable[[dict], bool] | None = None  # (a done shard's stats) -> build it again (its work keeps what held)


@dataclass(frozen=True)
class ShardProgress:
    """What the progress callback hears: once when the workers are up, after every shard, then with the report."""

    label: str  # the stage's name, with the rank under several ranks
    done: int  # shards built in this run so far
    total: int  # shards this run builds
    samples: int  # samples they wrote
    seconds: float
    report: dict | None = None  # on the last call only, before the failure check


def run_sharded(stage: ShardedStage, progress: Callable[[ShardProgress], None] | None = None) -> dict:
    """Build this rank's unfinished shards; returns the report, also written to the output folder.

    A shard counts as done only when its marker records this folder's config hash and code
    fingerprint. sizes.json appears once every shard of every rank is done (whichever rank finishes
    last writes it; the content is the same). Raises FailureRatioExceeded after writing the report
    when more than ``stage.max_failure_ratio`` of the inputs failed.
    """
    from .io.outputs import produced_by, read_record

    started = time.perf_counter()
    tell = progress or (lambda update: None)
    rank, world = rank_and_world()
    mine = shards_for_rank(list(range(stage.n_shards)), rank, world)
    record = read_record(stage.out)
    current = produced_by(record) if record else None
    todo = [s for s in mine if not is_done(stage.out, s, current)
            or (stage.redo is not None and stage.redo(read_stats(stage.out, s)))]
    label = f"{stage.name} (rank {rank}/{world})" if world > 1 else stage.name
    processed = _build_shards(stage, todo, label, tell)
    all_stats = [read_stats(stage.out, s) for s in mine]
    report = summarize(stage.name, all_stats, processed, time.perf_counter() - started)
    if stage.totals is not None:
        report.update(stage.totals(report, all_stats))
    if all(is_done(stage.out, s, current) for s in range(stage.n_shards)):
        write_sizes(stage.out, {s: read_stats(stage.out, s)["samples"] for s in range(stage.n_shards)})
    atomic_write_json(stage.out / (f"report.rank{rank}.json" if world > 1 else "report.json"), report)
    samples = sum(s.get("samples", 0) for s in processed)
    tell(ShardProgress(label, len(processed), len(todo), samples, report["seconds"], report))
    check_failure_ratio(report, stage.max_failure_ratio, stage.unit)
    return report


def _build_shards(stage: ShardedStage, shards: Sequence[int], label: str,
                  tell: Callable[[ShardProgress], None]) -> list[dict]:
    """Apply ``stage.work`` to every shard, in this process or a pool; stats come back in shard order."""
    results: dict[int, dict] = {}
    started = time.perf_counter()

    def record(shard: int, stats: dict) -> None:
        results[shard] = stats
        samples = sum(r.get("samples", 0) for r in results.values())
        tell(ShardProgress(label, len(results), len(shards), samples, time.perf_counter() - started))

    if stage.workers <= 1 or len(shards) <= 1:
        tell(ShardProgress(label, 0, len(shards), 0, 0.0))
        for shard in shards:
            record(shard, stage.work(shard))
    else:
        context = multiprocessing.get_context(stage.start_method)
        with ProcessPoolExecutor(max_workers=min(stage.workers, len(shards)), mp_context=context) as pool:
            futures = {pool.submit(stage.work, shard): shard for shard in shards}
            # told only now that the pool has forked its workers: a progress thread started here is not forked with them
            tell(ShardProgress(label, 0, len(shards), 0, 0.0))
            for future in as_completed(futures):
                record(futures[future], future.result())
    return [results[s] for s in sorted(results)]
