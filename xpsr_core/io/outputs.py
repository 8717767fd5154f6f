"""Output folders: create, check writability, and record the config that made them.

Each stage output folder holds ``config.json`` with the stage name, the hash of the settings
that shape its outputs, the code fingerprint of the stage (``xpsr_core.fingerprint``: its source
files and library versions) and the resolved config. A rerun with other settings or other code is
refused, naming what changed, unless the caller asks to overwrite, in which case the stage's old
outputs are removed first.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
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
        raise UserError(
            f"Cannot write to the {what} {folder}: {reason}. Choose another folder or fix its permissions."
        ) from None
    return folder


def _changed_fields(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def produced_by(record: dict) -> dict:
    """What a done marker must match to be reused: the config hash and the code fingerprint of its folder."""
    return {"config_hash": record.get("config_hash"), "code": (record.get("fingerprint") or {}).get("code")}


def read_record(folder: Path) -> dict:
    """The folder's ``config.json`` (empty when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}


def prepare_output_dir(
    folder: Path, stage: str, config: StageConfig, overwrite: bool = False, wait_seconds: float = 600
) -> Path:
    """Make ``folder`` ready for ``stage`` under ``config``; refuse to mix outputs of different configs or code.

    Under a multi-process launcher only rank 0 checks, clears and records the folder; the other
    ranks wait until the record shows this config, so no rank deletes another's fresh work.
    """
    from ..dist import rank_and_world
    from ..fingerprint import stage_fingerprint

    folder = ensure_writable_dir(folder)
    fingerprint = stage_fingerprint(stage)
    rank, world = rank_and_world()
    if rank > 0 and world > 1:
        return _wait_for_rank_zero(folder, config, fingerprint, rank, wait_seconds)
    settings = config.output_settings()
    if (folder / CONFIG_FILE).exists():
        _clear_other_outputs(folder, stage, config, settings, fingerprint, overwrite)
    remove_temporaries(folder)
    atomic_write_json(folder / CONFIG_FILE, {"stage": stage, "config_hash": config.output_hash(),
                                             "fingerprint": fingerprint, "settings": settings,
                                             "config": config.resolved()})
    return folder


def _wait_for_rank_zero(folder: Path, config: StageConfig, fingerprint: dict, rank: int, wait_seconds: float) -> Path:
    """Return ``folder`` once rank 0 has recorded this config and code in it; raise after ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            found = json.loads((folder / CONFIG_FILE).read_text())
            if (
                found.get("config_hash") == config.output_hash()
                and (found.get("fingerprint") or {}).get("code") == fingerprint["code"]
            ):
                return folder
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise UserError(
        f"Rank {rank} waited {wait_seconds:.0f} s for rank 0 to prepare {folder} with this configuration; "
        "check rank 0's error, or that every rank got the same config."
    )


def _how_outputs_differ(previous: dict, stage: str, config: StageConfig, settings: dict, fingerprint: dict) -> str:
    """What made the recorded outputs, when not this stage, config and code ("" when they match)."""
    from ..fingerprint import describe_changes

    same_config = previous.get("stage") == stage and previous.get("config_hash") == config.output_hash()
    same_code = (previous.get("fingerprint") or {}).get("code") == fingerprint["code"]
    if not same_config:
        changed = _changed_fields(previous.get("settings", {}), settings)
        return "a different configuration" + (f" (changed: {', '.join(changed)})" if changed else "")
    if not same_code:
        return f"other code (changed: {describe_changes(previous.get('fingerprint'), fingerprint)})"
    return ""


def _clear_other_outputs(folder: Path, stage: str, config: StageConfig, settings: dict, fingerprint: dict,
                         overwrite: bool) -> None:
    """Empty a folder recorded as made by another stage, config or code; without ``overwrite``, refuse."""
    previous = read_record(folder)
    what = _how_outputs_differ(previous, stage, config, settings, fingerprint)
    if not what:
        return
    if not overwrite:
        raise UserError(
            f"{folder} holds outputs of '{previous.get('stage', '?')}' made with {what}. "
            "Rerun with --overwrite to rebuild them, or choose another output folder."
        )
    print(
        f"{folder} held outputs of '{previous.get('stage', '?')}' made with {what}; "
        "--overwrite: rebuilding them.",
        file=sys.stderr,
        flush=True,
    )
    clear_folder(folder)


def clear_folder(folder: Path) -> None:
    for child in Path(folder).iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
