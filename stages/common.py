"""What the stages show: the console, progress bars (plain lines in logs), a sharded stage's progress and summary.

The work itself, and the loop over shards, is the library's (``xpsr_core.sharded``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xpsr_core.dist import process_rank_and_world
from xpsr_core.progress import PeriodicReporter, progress_text

if TYPE_CHECKING:
    from xpsr_core.sharded import ShardedStage, ShardProgress

console = Console(stderr=True)
# in a log (not a terminal) no line is wrapped at rich's default 80 columns: a long path or URL stays whole
console.soft_wrap = not console.is_terminal


class LoggedProgress(Progress):
    """Rich bars on a terminal; elsewhere (dvc repro, pipes, batch logs) no bars but a plain line per task
    every ``XPSR_PROGRESS_SECONDS`` seconds: done / total, rate, ETA. Under several ranks only rank 0 prints;
    ``describe`` (a callable returning the line) replaces the per-task lines, e.g. with all ranks' figures."""

    def __init__(self, *columns, describe: Callable[[], str] | None = None, defer_report: bool = False, **kwargs):
        """``defer_report``: the plain lines start at ``start_report()`` (after forking workers, not before)."""
        self.plain = not console.is_terminal
        super().__init__(*columns, disable=self.plain, **kwargs)
        self._describe = describe
        self._reporter = None
        self._report = self.plain and process_rank_and_world()[0] == 0  # each array task logs its own
        self._defer = defer_report

    def plain_lines(self) -> str:
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


def print_summary(report: dict, notes: Mapping[str, str] | None = None) -> None:
    """The report in a few lines; ``notes`` maps a stage figure of the report to its line ("{} captions/s")."""
    from xpsr_core.sharded import NOT_FAILED

    parts = [
        f"{report['shards']} shards ({report['shards_processed']} built, {report['shards_skipped']} already done)",
        f"{report['samples']} samples",
        f"{report['failed']} failed of {report['inputs']} inputs",
        f"{report['seconds']:.1f} s",
    ]
    if report.get("samples_per_s"):
        parts.append(f"{report['samples_per_s']:.1f} samples/s")
    console.print(f"[bold green]{report['stage']}[/] done: " + ", ".join(parts), soft_wrap=True)
    for name, line in (notes or {}).items():
        value = report.get(name)
        if value:
            shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, Mapping) else value
            console.print("  " + line.format(shown), soft_wrap=True)
    failures = {k: v for k, v in report["status_counts"].items() if k not in NOT_FAILED}
    if failures:
        console.print("  failures by status: " + ", ".join(f"{k}={v}" for k, v in failures.items()), soft_wrap=True)


class ShardBar:
    """``run_sharded``'s progress as a bar, or plain lines with every rank's figures in a log; keeps the report."""

    def __init__(self, stage: str, out: Path, n_shards: int):
        # plain lines start once the workers are up (a progress thread must not be forked with them)
        self.progress = progress_bar(shard_progress(stage, out, n_shards), defer_report=True)
        self.task = None
        self.report: dict | None = None

    def __enter__(self) -> "ShardBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        return self.progress.__exit__(*exc)

    def __call__(self, update: ShardProgress) -> None:
        if update.report is not None:
            self.report = update.report
            return
        if self.task is None:
            self.task = self.progress.add_task(update.label, total=update.total, rate="")
            self.progress.start_report()
        rate = f"{update.samples / max(update.seconds, 1e-9):.1f} samples/s" if update.done else ""
        self.progress.update(self.task, completed=update.done, rate=rate)


def run_stage(stage: ShardedStage, notes: Mapping[str, str] | None = None) -> dict:
    """Run a ``ShardedStage`` with a progress bar and print its summary, also when too many inputs failed."""
    from xpsr_core.sharded import run_sharded

    bar = ShardBar(stage.name, stage.out, stage.n_shards)
    try:
        with bar:
            return run_sharded(stage, progress=bar)
    finally:  # the report exists once every shard ran: the summary then precedes a failure-ratio error
        if bar.report is not None:
            print_summary(bar.report, notes)


def progress_task(progress, label: str):
    """A rich task and two callbacks: ``advance(done, total)`` and ``reset(description)`` (e.g. per image)."""
    task = progress.add_task(label, total=1, rate="")

    def callback(done: int, total: int) -> None:
        progress.update(task, total=total, completed=done)

    def reset(description: str) -> None:
        progress.update(task, description=description, completed=0)

    return callback, reset
