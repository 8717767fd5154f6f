"""Progress that reaches any log: plain lines at a steady interval when output is not a terminal.

On a terminal the stages show rich progress bars. Under ``dvc repro``, a batch scheduler or a pipe
those draw nothing until the end, so long commands print instead, every ``interval_seconds()``
seconds (``XPSR_PROGRESS_SECONDS``, default 30; ``xpsr --progress-seconds N``), one plain line:
done / total, rate and ETA (training adds step, loss and samples/s). Under several ranks only rank
0 prints, with the global figures.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

PROGRESS_ENV = "XPSR_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def interval_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_ENV, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(
    label: str, done: int, total: int, elapsed: float, unit: str, done_before: int = 0, extra: str = ""
) -> str:
    """'label: done/total unit (pct), rate unit/s, ETA m:ss[, extra]' (rate and ETA from this run's work)."""
    new = done - done_before
    rate = new / elapsed if elapsed > 0 and new > 0 else None
    eta = (total - done) / rate if rate else None
    share = f" ({100.0 * done / total:.0f}%)" if total else ""
    rate_text = f"{rate:.3g} {unit}/s" if rate else f"0 {unit}/s"
    return f"{label}: {done}/{total} {unit}{share}, {rate_text}, ETA {format_duration(eta if done < total else 0)}" + (
        f", {extra}" if extra else ""
    )


class PeriodicReporter:
    """A daemon thread that prints ``describe()`` every ``interval`` seconds until stopped (a context manager)."""

    def __init__(self, describe: Callable[[], str], interval: float | None = None, stream=None):
        self.describe = describe
        self.interval = interval_seconds() if interval is None else interval
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(max(self.interval, 0.05)):
            self.emit()

    def emit(self) -> None:
        try:
            print(self.describe(), file=self.stream, flush=True)
        except Exception:  # progress must never end a run
            pass

    def __enter__(self) -> "PeriodicReporter":
        self._thread = threading.Thread(target=self._run, name="xpsr-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False


class StepReporter:
    """For loops that tick (training steps): a line when ``interval`` seconds have passed, or every ``every_steps``."""

    def __init__(self, interval: float | None = None, every_steps: int = 0, stream=None):
        self.interval = interval_seconds() if interval is None else interval
        self.every_steps = every_steps
        self.stream = stream or sys.stderr
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps:
            return step % self.every_steps == 0
        return time.monotonic() - self._last >= self.interval

    def emit(self, text: str) -> None:
        self._last = time.monotonic()
        print(text, file=self.stream, flush=True)
