"""Webdataset shards: naming, deterministic tar writing, reading, done markers and sizes.json.

A shard folder holds ``{shard:05d}.tar`` plus, per shard, an optional Parquet index and a
``{shard:05d}.stats.json`` written last. The stats file's presence means the shard is done;
a tar without stats is an interrupted shard and is rebuilt. Tars are written with fixed
headers (mtime 0, uid/gid 0, sorted members per sample) so that equal content gives equal
bytes whatever the run's timing, workers or interruptions.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import UserError
from .atomic import atomic_path, atomic_write_json

KEY_DIGITS = 5
MAX_SAMPLES_PER_SHARD = 10**KEY_DIGITS
SIZES_FILE = "sizes.json"


def shard_stem(shard: int) -> str:
    return f"{shard:05d}"


def sample_key(shard: int, index: int) -> str:
    """Sortable, dot-free key: shard number then index within the shard."""
    if not 0 <= index < MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"sample index {index} does not fit in {KEY_DIGITS} digits")
    return f"{shard:05d}{index:05d}"


def tar_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"{shard_stem(shard)}.tar"


def index_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"{shard_stem(shard)}.parquet"


def stats_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"{shard_stem(shard)}.stats.json"


def is_done(folder: Path, shard: int, produced_by: Mapping | None = None) -> bool:
    """The stats file is written after everything else of the shard, so it alone marks it done.

    With ``produced_by`` (the folder record's config hash and code fingerprint, see
    ``outputs.produced_by``) a shard counts as done only when its marker records the same: shards
    made by other code or another config are stale and get rebuilt.
    """
    path = stats_path(folder, shard)
    if produced_by is None:
        return path.exists()
    try:
        return json.loads(path.read_text()).get("produced_by") == dict(produced_by)
    except (OSError, ValueError):
        return False


def read_stats(folder: Path, shard: int) -> dict:
    return json.loads(stats_path(folder, shard).read_text())


def write_stats(folder: Path, shard: int, stats: Mapping) -> None:
    """Mark a shard done. Call only after its tar and index have been renamed into place.

    The marker records what produced it (the folder record's config hash and code fingerprint)."""
    from .outputs import produced_by, read_record

    record = read_record(folder)
    stamp = {"produced_by": produced_by(record)} if record else {}
    atomic_write_json(stats_path(folder, shard), {**dict(stats), **stamp})


class TarShardWriter:
    """Write one shard to a temporary file; it appears under its real name only on success."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.count = 0
        self._context = atomic_path(self.path)
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> "TarShardWriter":
        tmp = self._context.__enter__()
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        return self

    def write(self, key: str, fields: Mapping[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain a dot")
        assert self._tar is not None
        for ext in sorted(fields):
            data = fields[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._tar is not None
        self._tar.close()
        return bool(self._context.__exit__(exc_type, exc, tb))


def read_shard(path: Path) -> Iterator[dict]:
    """Yield samples as {"__key__": key, ext: bytes, ...} in the order they were written."""
    current: dict | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            handle = tar.extractfile(member)
            assert handle is not None
            current[ext] = handle.read()
    if current is not None:
        yield current


def write_sizes(folder: Path, counts: Mapping[int, int]) -> None:
    """sizes.json: shard file name -> number of samples, as webdataset tooling expects; written once every shard is
    done, so the folder's record says from then on that its stage finished."""
    from .outputs import mark_finished

    atomic_write_json(Path(folder) / SIZES_FILE, {f"{shard_stem(s)}.tar": n for s, n in sorted(counts.items())})
    mark_finished(folder)


def read_sizes(folder: Path) -> dict[int, int]:
    raw = json.loads((Path(folder) / SIZES_FILE).read_text())
    return {int(name.split(".")[0]): int(count) for name, count in raw.items()}


def require_finished(folder: Path, what: str, hint: str) -> dict[int, int]:
    """The sizes of a finished shard folder (its sizes.json, written once every shard is done).

    ``what`` names the folder's kind in the error ("HR shard"), ``hint`` says how to make one.
    """
    if not (Path(folder) / SIZES_FILE).is_file():
        raise UserError(f"{folder} is not a finished {what} folder (no {SIZES_FILE}). {hint}")
    return read_sizes(folder)
