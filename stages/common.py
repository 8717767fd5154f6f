"""What every shard-based stage shares: a worker pool over shards, progress, and the summary."""

from __future__ import annotations

import multiprocessing
from collections import Counter
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xpsr_core.errors import FailureRatioExceeded

console = Console(stderr=True)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run_over_shards(
    label: str,
    shards: list[int],
    work: Callable[[int], dict],
    workers: int,
    start_method: str = "spawn",
) -> list[dict]:
    """Apply ``work`` (a picklable callable returning a shard's stats) to every shard.

    One worker runs in this process; more run in a process pool. Results come back in shard
    order whatever the completion order, so summaries are deterministic.
    """
    results: dict[int, dict] = {}
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(shards), rate="")

        def record(shard: int, stats: dict) -> None:
            results[shard] = stats
            samples = sum(r.get("samples", 0) for r in results.values())
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, rate=f"{samples / elapsed:.1f} samples/s")

        if workers <= 1 or len(shards) <= 1:
            for shard in shards:
                record(shard, work(shard))
        else:
            context = multiprocessing.get_context(start_method)
            with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context) as pool:
                futures = {pool.submit(work, shard): shard for shard in shards}
                for future in as_completed(futures):
                    record(futures[future], future.result())
    return [results[s] for s in sorted(results)]


def shard_stats(shard: int, statuses: Iterable[str], samples: int, **extra) -> dict:
    """A shard's stats file (its done marker): inputs, samples written, failures, counts by status."""
    counts = Counter(statuses)
    inputs = sum(counts.values())
    return {
        "shard": shard,
        "inputs": inputs,
        "samples": samples,
        "failed": inputs - counts.get("ok", 0),
        "status_counts": dict(sorted(counts.items())),
        **extra,
    }


def summarize(stage: str, all_stats: Iterable[dict], processed: list[dict], seconds: float) -> dict:
    """Totals over every done shard of the stage, plus this run's timing (``processed``: shards built now)."""
    all_stats = list(all_stats)
    status_counts: dict[str, int] = {}
    for stats in all_stats:
        for status, count in stats.get("status_counts", {}).items():
            status_counts[status] = status_counts.get(status, 0) + count
    inputs = sum(s.get("inputs", 0) for s in all_stats)
    failed = sum(s.get("failed", 0) for s in all_stats)
    samples = sum(s.get("samples", 0) for s in all_stats)
    processed_samples = sum(s.get("samples", 0) for s in processed)
    return {
        "stage": stage,
        "shards": len(all_stats),
        "shards_processed": len(processed),
        "shards_skipped": len(all_stats) - len(processed),
        "inputs": inputs,
        "samples": samples,
        "failed": failed,
        "status_counts": dict(sorted(status_counts.items())),
        "seconds": round(seconds, 3),
        "samples_per_s": round(processed_samples / seconds, 3) if seconds > 0 and processed else None,
    }


def check_failure_ratio(report: dict, max_ratio: float, what: str) -> None:
    inputs = report["inputs"]
    if inputs and report["failed"] / inputs > max_ratio:
        counts = ", ".join(f"{k}: {v}" for k, v in report["status_counts"].items() if k != "ok")
        raise FailureRatioExceeded(
            f"{report['failed']} of {inputs} {what} failed ({counts}), more than the allowed share "
            f"{max_ratio:.0%}. The shards that worked are kept; see the Parquet indexes for each failure, "
            f"or raise max_failure_ratio."
        )


def print_summary(report: dict) -> None:
    parts = [
        f"{report['shards']} shards ({report['shards_processed']} built, {report['shards_skipped']} already done)",
        f"{report['samples']} samples",
        f"{report['failed']} failed of {report['inputs']} inputs",
        f"{report['seconds']:.1f} s",
    ]
    if report.get("samples_per_s"):
        parts.append(f"{report['samples_per_s']:.1f} samples/s")
    console.print(f"[bold green]{report['stage']}[/] done: " + ", ".join(parts))
    if report.get("captions_per_s"):
        console.print(f"  {report['captions_per_s']:.2f} captions/s")
    if "truncated_share" in report:
        console.print(f"  share of captions over the CLIP token limit: {report['truncated_share']}")
    failures = {k: v for k, v in report["status_counts"].items() if k != "ok"}
    if failures:
        console.print("  failures by status: " + ", ".join(f"{k}={v}" for k, v in failures.items()))


def run_sharded_stage(stage: str, out: Path, n_shards: int, work: Callable[[int], dict], workers: int,
                      start_method: str, max_failure_ratio: float, what: str,
                      enrich: Callable[[dict, list[dict]], None] | None = None) -> dict:
    """The loop every shard stage shares: this rank's unfinished shards, summary, sizes.json, report.

    ``work(shard)`` builds one shard and writes its stats file last. sizes.json appears once every
    shard of every rank is done (whichever rank finishes last writes it; the content is the same).
    ``enrich(report, stats)`` may add stage-specific totals before the report is written.
    """
    from xpsr_core.dist import rank_and_world, shards_for_rank
    from xpsr_core.io.atomic import atomic_write_json
    from xpsr_core.io.shards import is_done, read_stats, write_sizes

    started = time.perf_counter()
    rank, world = rank_and_world()
    mine = shards_for_rank(list(range(n_shards)), rank, world)
    todo = [s for s in mine if not is_done(out, s)]
    label = f"{stage} (rank {rank}/{world})" if world > 1 else stage
    processed = run_over_shards(label, todo, work, workers, start_method=start_method)
    all_stats = [read_stats(out, s) for s in mine]
    report = summarize(stage, all_stats, processed, time.perf_counter() - started)
    if enrich is not None:
        enrich(report, all_stats)
    if all(is_done(out, s) for s in range(n_shards)):
        write_sizes(out, {s: read_stats(out, s)["samples"] for s in range(n_shards)})
    atomic_write_json(out / (f"report.rank{rank}.json" if world > 1 else "report.json"), report)
    print_summary(report)
    check_failure_ratio(report, max_failure_ratio, what)
    return report
