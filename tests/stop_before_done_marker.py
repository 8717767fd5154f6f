"""Run the ``xpsr`` command, but stop for good just before the done marker of shard number ``stop_at``.

Usage: ``python stop_before_done_marker.py STOP_AT SIGNAL_FILE xpsr-arguments...``

When the stage is about to write its ``stop_at``-th ``*.stats.json`` (counting from 1), that shard's tar and
index are already in place; the process writes SIGNAL_FILE and sleeps until it is killed. A drill waits for
SIGNAL_FILE, then sends SIGKILL: the kill lands at a known point (``stop_at - 1`` shards done, one shard's
data without its marker) whatever the machine's speed, with no timing race.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    stop_at, signal_file, args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]

    from xpsr_core.io import shards

    real_write = shards.atomic_write_json
    markers = {"n": 0}

    def write_json(path, value, *rest, **options):
        if str(path).endswith(".stats.json"):
            markers["n"] += 1
            if markers["n"] == stop_at:
                written = signal_file.with_name(signal_file.name + ".partial")
                written.write_text(f"{path}\n")
                os.replace(written, signal_file)  # whole when it appears
                while True:
                    time.sleep(60)
        return real_write(path, value, *rest, **options)

    shards.atomic_write_json = write_json
    sys.argv = ["xpsr", *args]
    from stages.cli import app

    sys.exit(app())


if __name__ == "__main__":
    main()
