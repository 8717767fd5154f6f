"""Writes that either land whole or not at all: write to a temporary name, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from .ledger import record_write

TMP_MARK = ".tmp-"
PARTIAL_FOLDER = ".partial"  # a folder being written whole (atomic_folder)
HOST = socket.gethostname().replace(".", "_").replace("-", "_")


def temporary_sibling(path: Path) -> Path:
    """``NAME.tmp-HOST-PID``: whose write it is, so only dead writers' leftovers are removed."""
    return path.with_name(f"{path.name}{TMP_MARK}{HOST}-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = temporary_sibling(path)
    record_write(path)  # before the write: a crash leaves no file of xpsr's unrecorded
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield ``NAME.partial`` beside the folder ``path`` to fill; it replaces ``path`` only if the block succeeds,
    so a crash never leaves a half-written folder under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_FOLDER)
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier write that did not finish
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only read by setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_per_umask(path: Path) -> None:
    """Give ``path`` (and everything under a folder) the modes the umask allows: 0644 / 0755 under umask 022.
    For files that libraries write 0600 whatever the umask (safetensors' save_file, mkstemp), or that copies
    keep from their source, so that a shared cluster's group can read what xpsr writes."""
    mask = current_umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def dumps_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, fixed indent) so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj).encode())


def _writer_alive(leftover: Path) -> bool:
    host, _, pid = leftover.name.rpartition(TMP_MARK)[2].rpartition("-")
    if host != HOST:
        return True  # another machine's writer (shared filesystem): not ours to judge
    if not pid.isdigit():
        return False  # not a name this code writes: a stale leftover
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries(folder: Path) -> int:
    """Delete leftovers of writes that never finished (a crash between write and rename).

    Files of writers that are still running (another rank sharing the folder) are left alone.
    """
    removed = 0
    for leftover in Path(folder).glob(f"*{TMP_MARK}*"):
        if not _writer_alive(leftover):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
