"""Output folders: create, check writability, record the config that made them and what xpsr wrote in them.

Each stage output folder holds ``config.json`` with the stage name, the hash of the settings
that shape its outputs, the code fingerprint of the stage (``xpsr_core.fingerprint``: its source
files and library versions), the resolved config and ``finished`` (false until the stage has run
to its end), and ``ledger.jsonl``: one JSON string per line, the path (relative to the folder) of
every file xpsr wrote there, or of a folder it created whole (``NAME/``). Lines are appended before
each write (``io.atomic`` does it for every atomic write; ``claim`` for writers that are not
atomic), one ``os.write`` each, so worker processes and ranks can share a ledger.

A folder owns only what its ledger names. ``--overwrite`` removes exactly those files (and the
folders that end up empty), never anything else. Stages whose readers take a folder whole (shards,
models, run folders, evaluation tables) refuse one that holds files xpsr did not write; ``sr``
writes named files beside others and refuses to write over any file it did not write. A rerun
with other settings or other code is refused, naming what changed and how many finished outputs
it protects; when the earlier run never finished and left nothing finished, its files are removed
and the rerun goes ahead. A folder recorded by older code (``config.json`` without a ledger) owns
the names the stage's own patterns give (``LEGACY_PATTERNS``); anything else in it is foreign.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from ..config import StageConfig
from ..dist import rank_and_world
from ..errors import UserError
from ..fingerprint import describe_changes, stage_fingerprint
from .atomic import TMP_MARK, atomic_write_json, remove_temporaries
from .images import readable_name
from .ledger import CONFIG_FILE, LEDGER_FILE, RECORD_FILES, append_to_ledger, owning_folder, record_write  # noqa: F401

WRITE_PROBE = ".xpsr-write-probe-"
SHOWN_FOREIGN = 5  # foreign files named in a refusal

# stages that write named files beside files of others; every other stage needs a folder holding only its own
SHARES_FOLDER = frozenset({"sr"})

_SHARDED_STAGES = ("shard", "degrade", "caption", "embed", "testset_synthetic", "testset_paired")
_SHARD_FILES = ("*.tar", "*.parquet", "*.stats.json", "sizes.json", "report.json", "report.rank*.json")
# what older code's folders (config.json, no ledger) are taken to own: top-level names, NAME/ a whole folder
LEGACY_PATTERNS: dict[str, tuple[str, ...]] = {
    **{stage: _SHARD_FILES for stage in _SHARDED_STAGES},
    "train": ("checkpoint-*/", "final/", "logs/", "validation/", "train_log.tsv", "report.json", "report.rank*.json",
              "events.out.tfevents.*"),
    "models": ("sd15/", "captioner/", "zoo.json"),
    "demo_data": ("*.png", "report.json"),
    "evaluate": ("table.md", "table.csv", "metrics.json", "metric_details.json", "per_image.parquet",
                 "per_image.csv", "report.json", "sr/", "grids/"),
}
# an owned file that is a finished output on its own, whatever became of the run (sr: see _finished_count)
FINISHED_PATTERNS: dict[str, tuple[str, ...]] = {
    **{stage: ("*.stats.json",) for stage in _SHARDED_STAGES},
    "train": ("checkpoint-*/", "final/"),
    "models": ("zoo.json",),
    "demo_data": ("*.png",),
    "evaluate": ("table.md",),
}


def ensure_writable_dir(folder: Path, what: str = "output folder") -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{WRITE_PROBE}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise UserError(
            f"Cannot write to the {what} {folder}: {reason}. Choose another folder or fix its permissions."
        ) from None
    return folder


# ---------------------------------------------------------------------------- the ledger


def claim(folder: Path, relative: str) -> None:
    """Record in ``folder``'s ledger a file, or with a trailing ``/`` a folder and all it will hold, before a
    writer that is not atomic (``save_pretrained``, ``save_state``, TensorBoard) writes it."""
    append_to_ledger(folder, relative)


def claim_contents(folder: Path) -> None:
    """Record every entry of ``folder`` as xpsr's: for a folder a stage has just written whole (its ledger is
    new; an entry that is a folder is claimed with all it holds)."""
    folder = Path(folder)
    (folder / LEDGER_FILE).touch()
    for entry in sorted(folder.iterdir()):
        if entry.name not in RECORD_FILES:
            claim(folder, entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))


def refuse_foreign(folder: Path, stage: str, record: dict | None = None) -> "Ownership":
    """Raise when ``folder`` holds files xpsr did not write (``stage`` needs a folder of its own); its ownership."""
    ownership = Ownership(folder, stage, read_record(folder) if record is None else record)
    if ownership.foreign:
        raise UserError(
            f"{folder} holds {len(ownership.foreign)} files xpsr did not write ({ownership.describe_foreign()}); "
            f"'{stage}' needs a folder of its own. Move them away or choose another output folder; "
            "nothing was changed."
        )
    return ownership


def read_ledger(folder: Path) -> set[str] | None:
    """The entries of ``folder``'s ledger; None when it has none. A line cut short by a crash is skipped."""
    try:
        raw = (Path(folder) / LEDGER_FILE).read_bytes()
    except FileNotFoundError:
        return None
    entries = set()
    for line in raw.splitlines():
        try:
            entries.add(json.loads(line))
        except ValueError:
            continue
    return entries


def _files_below(folder: Path) -> list[str]:
    """Every file (and link) below ``folder``, as sorted relative posix paths."""
    found = []
    for parent, dirs, files in os.walk(folder):
        base = Path(parent).relative_to(folder)
        found += [(base / name).as_posix() for name in files]
        found += [(base / name).as_posix() for name in dirs if os.path.islink(os.path.join(parent, name))]
    return sorted(found)


def _matches(relative: str, patterns: tuple[str, ...]) -> bool:
    top, _, rest = relative.partition("/")
    return any(fnmatch.fnmatchcase(top, p.rstrip("/")) and (bool(rest) == p.endswith("/")) for p in patterns)


def _is_owned(relative: str, entries: set[str]) -> bool:
    if relative in entries:
        return True
    parts = relative.split("/")
    return any("/".join(parts[:n]) + "/" in entries for n in range(1, len(parts)))


def _legacy_sr_files(folder: Path, files: list[str]) -> set[str]:
    """An older sr folder's own files: each sidecar that names its PNG, and that PNG."""
    owned = set()
    present = set(files)
    for relative in files:
        if not relative.endswith(".json") or relative in RECORD_FILES:
            continue
        try:
            output = json.loads((folder / relative).read_text()).get("output")
        except (OSError, ValueError, AttributeError):
            continue
        png = relative[: -len(".json")] + ".png"
        if output == readable_name(png) and png in present:
            owned |= {relative, png}
    return owned


class Ownership:
    """What of a folder xpsr wrote (``owned``: files, records and temporaries excluded) and what it did not."""

    def __init__(self, folder: Path, stage: str, record: dict):
        self.folder = Path(folder)
        files = [f for f in _files_below(self.folder) if f not in RECORD_FILES and not _is_scratch(f)]
        self.entries = read_ledger(self.folder)
        self.legacy = self.entries is None and bool(record)
        if self.legacy:
            stage_own = _legacy_sr_files(self.folder, files) if stage == "sr" else set()
            patterns = LEGACY_PATTERNS.get(stage, ())
            self.owned = [f for f in files if f in stage_own or _matches(f, patterns)]
        else:
            self.owned = [f for f in files if _is_owned(f, self.entries or set())]
        self.owned_set = set(self.owned)
        self.foreign = [f for f in files if f not in self.owned_set]

    def describe_foreign(self) -> str:
        shown = ", ".join(readable_name(f) for f in self.foreign[:SHOWN_FOREIGN])
        more = len(self.foreign) - SHOWN_FOREIGN
        return shown + (f" and {more} more" if more > 0 else "")


def _is_scratch(relative: str) -> bool:
    name = relative.rpartition("/")[2]
    return TMP_MARK in name or name.startswith(WRITE_PROBE)


def remove_owned(folder: Path, owned: list[str]) -> int:
    """Delete the files xpsr wrote (``owned``), then the folders below ``folder`` that they leave empty."""
    folder = Path(folder)
    parents = set()
    for relative in owned:
        path = folder / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        parents.update(p for p in path.parents if p != folder and folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            parent.rmdir()
        except OSError:
            pass  # holds other files
    return len(owned)


# ---------------------------------------------------------------------------- the record


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


def mark_finished(folder: Path) -> None:
    """Record that the stage ran to its end in ``folder`` (its outputs are complete)."""
    record = read_record(folder)
    if record and not record.get("finished"):
        atomic_write_json(Path(folder) / CONFIG_FILE, {**record, "finished": True})


def prepare_output_dir(
    folder: Path, stage: str, config: StageConfig, overwrite: bool = False, wait_seconds: float = 600,
    claims: Sequence[str] = (), ranks: tuple[int, int] | None = None,
) -> Path:
    """Make ``folder`` ready for ``stage`` under ``config``; refuse to mix outputs of different configs or code,
    or to take a folder holding files xpsr did not write (except for stages of ``SHARES_FOLDER``).

    ``claims``: the names (``NAME/``: folders) the stage will write there without ``io.atomic`` (see ``claim``).
    ``ranks``: (rank, world) of the processes that fill this folder together; by default the shard split's
    (``dist.rank_and_world``, SLURM array tasks included). Training passes its own job's ranks: each task of an
    array of training runs prepares its own folder.

    Under a multi-process launcher only rank 0 checks, clears and records the folder; the other
    ranks wait until the record shows this config, so no rank deletes another's fresh work.
    """
    folder = ensure_writable_dir(folder)
    fingerprint = stage_fingerprint(stage)
    rank, world = ranks or rank_and_world()
    if rank > 0 and world > 1:
        return _wait_for_rank_zero(folder, config, fingerprint, rank, wait_seconds)
    record = read_record(folder)
    ownership = Ownership(folder, stage, record) if stage in SHARES_FOLDER else refuse_foreign(folder, stage, record)
    what = _how_outputs_differ(record, stage, config, fingerprint) if record else ""
    if what:
        _clear_other_outputs(folder, record, ownership, what, overwrite)
    elif ownership.legacy:
        for relative in ownership.owned:  # older code's outputs of this same config: adopted
            append_to_ledger(folder, relative)
    remove_temporaries(folder)
    (folder / LEDGER_FILE).touch()
    for relative in claims:
        claim(folder, relative)
    atomic_write_json(folder / CONFIG_FILE, {"stage": stage, "config_hash": config.output_hash(),
                                             "fingerprint": fingerprint, "settings": config.output_settings(),
                                             "config": config.resolved(), "finished": False})
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
                and (folder / LEDGER_FILE).is_file()
            ):
                return folder
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise UserError(
        f"Rank {rank} waited {wait_seconds:.0f} s for rank 0 to prepare {folder} with this configuration; "
        "check rank 0's error, or that every rank got the same config."
    )


def _how_outputs_differ(previous: dict, stage: str, config: StageConfig, fingerprint: dict) -> str:
    """What made the recorded outputs, when not this stage, config and code ("" when they match)."""
    same_config = previous.get("stage") == stage and previous.get("config_hash") == config.output_hash()
    same_code = (previous.get("fingerprint") or {}).get("code") == fingerprint["code"]
    if not same_config:
        changed = _changed_fields(previous.get("settings", {}), config.output_settings())
        return "a different configuration" + (f" (changed: {', '.join(changed)})" if changed else "")
    if not same_code:
        return f"other code (changed: {describe_changes(previous.get('fingerprint'), fingerprint)})"
    return ""


def finished_count(ownership: Ownership, record: dict) -> int:
    """How many finished outputs the folder holds: its stage's done markers, finished SR images, checkpoints...;
    when the record says the stage ran to its end (older records say nothing: taken as finished), at least one."""
    stage = record.get("stage", "")
    owned = ownership.owned_set
    if stage == "sr":
        count = sum(1 for f in owned if f.endswith(".json") and f[: -len(".json")] + ".png" in owned)
    else:
        patterns = FINISHED_PATTERNS.get(stage, ())
        count = len({f.partition("/")[0] if "/" in f else f for f in owned if _matches(f, patterns)})
    if record.get("finished", True) and owned:
        return count or len(owned)
    return count


def _clear_other_outputs(folder: Path, previous: dict, ownership: Ownership, what: str, overwrite: bool) -> None:
    """Remove the files xpsr wrote for another stage, config or code: under ``overwrite``, or when the earlier
    run never finished and left nothing finished; otherwise refuse, saying what is protected."""
    made = f"{folder} holds outputs of '{previous.get('stage', '?')}' made with {what}"
    kept = len(ownership.foreign)
    others = f"; the {kept} other files there are kept" if kept else "; no other files are there"
    protected = finished_count(ownership, previous)
    if not overwrite and protected:
        raise UserError(
            f"{made}: {protected} finished outputs. Rerun with --overwrite to remove the {len(ownership.owned)} "
            f"files xpsr wrote there (other files are kept), or choose another output folder."
        )
    if overwrite:
        note = f"--overwrite: removing the {len(ownership.owned)} files xpsr wrote there{others}."
    else:
        note = (f"that run did not finish and left no finished output: removing the {len(ownership.owned)} files "
                f"it wrote{others}.")
    print(f"{made}; {note}", file=sys.stderr, flush=True)
    remove_owned(folder, ownership.owned)
    (folder / LEDGER_FILE).unlink(missing_ok=True)
