"""What every shard-based stage shares: a worker pool over shards, progress, and the summary."""

from __future__ import annotations

import json
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


class LoggedProgress(Progress):
    """Rich bars on a terminal; elsewhere (dvc repro, pipes, batch logs) no bars but a plain line per task
    every ``XPSR_PROGRESS_SECONDS`` seconds: done / total, rate, ETA. Under several ranks only rank 0 prints;
    ``describe`` (a callable returning the line) replaces the per-task lines, e.g. with all ranks' figures."""

    def __init__(self, *columns, describe: Callable[[], str] | None = None, defer_report: bool = False, **kwargs):
        """``defer_report``: the plain lines start at ``start_report()`` (after forking workers, not before)."""
        from xpsr_core.dist import rank_and_world

        self.plain = not console.is_terminal
        super().__init__(*columns, disable=self.plain, **kwargs)
        self._describe = describe
        self._reporter = None
        self._report = self.plain and rank_and_world()[0] == 0
        self._defer = defer_report

    def plain_lines(self) -> str:
        from xpsr_core.progress import progress_text

        if self._describe is not None:
            return self._describe()
        lines = []
        for task in self.tasks:
            if task.total is None or task.finished and len(self.tasks) > 1:
                continue
            extra = task.fields.get("rate") or ""
            lines.append(progress_text(task.description, int(task.completed), int(task.total), task.elapsed or 0.0,
                                       "items", extra=extra))
        return "\n".join(lines)

    def __enter__(self) -> "LoggedProgress":
        super().__enter__()
        if not self._defer:
            self.start_report()
        return self

    def start_report(self) -> None:
        if self._report and self._reporter is None:
            from xpsr_core.progress import PeriodicReporter

            self._reporter = PeriodicReporter(self.plain_lines).__enter__()

    def __exit__(self, *exc) -> None:
        if self._reporter is not None:
            self._reporter.__exit__(*exc)
        return super().__exit__(*exc)


def progress_bar(describe: Callable[[], str] | None = None, defer_report: bool = False) -> Progress:
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        describe=describe,
        defer_report=defer_report,
    )


def shard_progress(label: str, out: Path, n_shards: int) -> Callable[[], str]:
    """A progress line with every rank's figures: the done markers in ``out`` (all ranks write there)."""
    from xpsr_core.progress import progress_text

    started = time.perf_counter()
    seen: dict[str, int] = {}

    def scan() -> None:
        for path in Path(out).glob("*.stats.json"):
            if path.name not in seen:
                try:
                    seen[path.name] = int(json.loads(path.read_text()).get("samples", 0))
                except (OSError, ValueError):
                    continue

    scan()
    before, samples_before = len(seen), sum(seen.values())

    def describe() -> str:
        scan()
        elapsed = time.perf_counter() - started
        done = min(len(seen), n_shards)
        samples = sum(seen.values()) - samples_before
        return progress_text(label, done, n_shards, elapsed, "shards", done_before=before,
                             extra=f"{samples / elapsed if elapsed > 0 else 0:.3g} samples/s")

    return describe


def run_over_shards(
    label: str,
    shards: list[int],
    work: Callable[[int], dict],
    workers: int,
    start_method: str = "spawn",
    describe: Callable[[], str] | None = None,
) -> list[dict]:
    """Apply ``work`` (a picklable callable returning a shard's stats) to every shard.

    One worker runs in this process; more run in a process pool. Results come back in shard
    order whatever the completion order, so summaries are deterministic.
    """
    results: dict[int, dict] = {}
    started = time.perf_counter()
    # the progress thread starts once the pool has forked its workers (no thread is forked with them)
    with progress_bar(describe, defer_report=True) as progress:
        task = progress.add_task(label, total=len(shards), rate="")

        def record(shard: int, stats: dict) -> None:
            results[shard] = stats
            samples = sum(r.get("samples", 0) for r in results.values())
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, rate=f"{samples / elapsed:.1f} samples/s")

        if workers <= 1 or len(shards) <= 1:
            progress.start_report()
            for shard in shards:
                record(shard, work(shard))
        else:
            context = multiprocessing.get_context(start_method)
            with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context) as pool:
                futures = {pool.submit(work, shard): shard for shard in shards}
                progress.start_report()
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
    console.print(f"[bold green]{report['stage']}[/] done: " + ", ".join(parts), soft_wrap=True)
    if report.get("captions_per_s"):
        console.print(f"  {report['captions_per_s']:.2f} captions/s", soft_wrap=True)
    if "truncated_share" in report:
        console.print(f"  share of captions over the CLIP token limit: {report['truncated_share']}", soft_wrap=True)
    failures = {k: v for k, v in report["status_counts"].items() if k != "ok"}
    if failures:
        console.print("  failures by status: " + ", ".join(f"{k}={v}" for k, v in failures.items()), soft_wrap=True)
    if report.get("skipped_paths"):
        console.print("  paths skipped (not inputs): " + ", ".join(f"{k}={v}" for k, v in report["skipped_paths"].items()), soft_wrap=True)


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
    from xpsr_core.io.outputs import produced_by, read_record
    from xpsr_core.io.shards import is_done, read_stats, write_sizes

    started = time.perf_counter()
    rank, world = rank_and_world()
    mine = shards_for_rank(list(range(n_shards)), rank, world)
    # a done marker counts only when it records this folder's config hash and code fingerprint
    current = produced_by(read_record(out)) if read_record(out) else None
    todo = [s for s in mine if not is_done(out, s, current)]
    label = f"{stage} (rank {rank}/{world})" if world > 1 else stage
    processed = run_over_shards(label, todo, work, workers, start_method=start_method,
                                describe=shard_progress(stage, out, n_shards))
    all_stats = [read_stats(out, s) for s in mine]
    report = summarize(stage, all_stats, processed, time.perf_counter() - started)
    if enrich is not None:
        enrich(report, all_stats)
    if all(is_done(out, s, current) for s in range(n_shards)):
        write_sizes(out, {s: read_stats(out, s)["samples"] for s in range(n_shards)})
    atomic_write_json(out / (f"report.rank{rank}.json" if world > 1 else "report.json"), report)
    print_summary(report)
    check_failure_ratio(report, max_failure_ratio, what)
    return report
