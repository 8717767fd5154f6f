"""An output folder's ledger (``ledger.jsonl``): every file xpsr writes there, noted before it is written.

Below :mod:`.atomic` (whose writes note themselves here) and :mod:`.outputs` (which reads the ledger to tell
xpsr's files from a user's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_FILE = "config.json"
LEDGER_FILE = "ledger.jsonl"
RECORD_FILES = (CONFIG_FILE, LEDGER_FILE)


def append_to_ledger(folder: Path, relative: str) -> None:
    # ensure_ascii: names that are not UTF-8 (surrogate escapes) and newlines stay one readable line
    line = (json.dumps(relative, ensure_ascii=True) + "\n").encode("ascii")
    handle = os.open(Path(folder) / LEDGER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(handle, line)
    finally:
        os.close(handle)


def owning_folder(path: Path) -> Path | None:
    """The nearest folder above ``path`` that keeps a ledger (an output folder), or None."""
    for parent in Path(os.path.abspath(path)).parents:
        if (parent / LEDGER_FILE).is_file():
            return parent
    return None


def record_write(path: Path) -> None:
    """Note in its output folder's ledger that xpsr is about to write the file ``path`` (no ledger: nothing)."""
    folder = owning_folder(path)
    if folder is not None:
        relative = Path(os.path.abspath(path)).relative_to(folder).as_posix()
        if relative not in RECORD_FILES:
            append_to_ledger(folder, relative)
