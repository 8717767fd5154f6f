"""Output folders: create, check writability, and record the config that made them.

Each stage output folder holds ``config.json`` with the stage name, the hash of the settings
that shape its outputs and the resolved config. A rerun with other settings is refused unless
the caller asks to overwrite, in which case the stage's old outputs are removed first.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from ..config import StageConfig
from ..errors import UserError
from .atomic import atomic_write_json, remove_temporaries

CONFIG_FILE = "config.json"


def ensure_writable_dir(folder: Path, what: str = "output folder") -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".xpsr-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise UserError(f"Cannot write to the {what} {folder}: {reason}. Choose another folder or fix its permissions.") from None
    return folder


def _changed_fields(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def prepare_output_dir(folder: Path, stage: str, config: StageConfig, overwrite: bool = False, wait_seconds: float = 600) -> Path:
    """Make ``folder`` ready for ``stage`` under ``config``; refuse to mix outputs of different configs.

    Under a multi-process launcher only rank 0 checks, clears and records the folder; the other
    ranks wait until the record shows this config, so no rank deletes another's fresh work.
    """
    from ..dist import rank_and_world

    folder = ensure_writable_dir(folder)
    record = folder / CONFIG_FILE
    rank, world = rank_and_world()
    if rank > 0 and world > 1:
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            try:
                if json.loads(record.read_text()).get("config_hash") == config.output_hash():
                    return folder
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise UserError(f"Rank {rank} waited {wait_seconds:.0f} s for rank 0 to prepare {folder} with this configuration; "
                        "check rank 0's error, or that every rank got the same config.")
    settings = config.output_settings()
    if record.exists():
        try:
            previous = json.loads(record.read_text())
        except (OSError, ValueError):
            previous = {}
        same = previous.get("stage") == stage and previous.get("config_hash") == config.output_hash()
        if not same and not overwrite:
            changed = _changed_fields(previous.get("settings", {}), settings)
            raise UserError(
                f"{folder} holds outputs of '{previous.get('stage', '?')}' made with a different configuration"
                + (f" (changed: {', '.join(changed)})" if changed else "")
                + ". Rerun with --overwrite to replace them, or choose another output folder."
            )
        if not same:
            clear_folder(folder)
    remove_temporaries(folder)
    atomic_write_json(record, {"stage": stage, "config_hash": config.output_hash(), "settings": settings, "config": config.resolved()})
    return folder


def clear_folder(folder: Path) -> None:
    for child in Path(folder).iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
