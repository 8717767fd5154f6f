#!/usr/bin/env python
"""sha256 digests of the embedded default's outputs, to check that a change of the code leaves them as they were.

It runs nothing itself: it hashes the outputs that ``dvc repro`` left in a repository root. Record them:

    dvc repro
    python tools/output_digests.py . --out tests/fixtures/default_digests.json

Check a change: run ``dvc repro`` in a fresh clone of the changed tree, then

    python tools/output_digests.py . --compare tests/fixtures/default_digests.json [--skip evaluate]

which exits non-zero and lists every file that differs, is missing or is new. ``dvc repro --force`` in a used
tree makes less anew: shards whose done markers name the same config and code are kept, and training resumes
from its last checkpoint. The digests are grouped by the stage that writes them; ``--skip GROUP`` leaves a
group out of the check (``evaluate`` where its outputs are meant to change).

Digests hold for the machine and library versions they were recorded with: other versions of torch, Pillow or
pyarrow may change bytes without any change of the code. The fixture was recorded from a clean clone on a
2-core x86_64 CPU with Python 3.11.7, torch 2.14.1, diffusers 0.42.1, transformers 5.24.0, numpy 2.4.6,
Pillow 13.0.0 and pyarrow 26.0.1; two fresh clones of the same code and a ``dvc repro --force`` rerun (training
from step 0) gave the same digests.

What is hashed. Tars, NumPy and safetensors files: their bytes (shard tars have fixed member order and times).
JSON files: a canonical form (sorted keys, no whitespace) without the keys of ``VOLATILE_KEYS``. Parquet files:
the schema and the rows as canonical JSON, without the columns of ``VOLATILE_KEYS``. CSV files: the rows without
those columns.

Left out, and why:

- ``config.json`` and ``ledger.jsonl`` directly in an output folder: the records of how it was made (the stage
  config with its config hash and code fingerprint, which change with any edit of the code while the outputs need
  not; the files xpsr wrote there). The model configs inside ``models/xpsr/final`` are outputs and are hashed.
- the keys of ``VOLATILE_KEYS`` (timings, rates, fingerprints, reuse counts) wherever they occur in JSON,
  Parquet or CSV.
- everything of ``models/xpsr`` but ``final``: checkpoints (optimizer and RNG states to resume from; the final
  weights are what the later stages use), TensorBoard event files (named after the wall-clock time and the
  process id), ``logs/`` and ``train_log.tsv`` (timings per step), ``report.json`` (timings; a rerun that
  resumes from the last checkpoint counts other steps), validation grids (images made by the checkpoints).
- ``metrics/train.json`` and ``metrics/train_log.tsv``: copies of the training report and log, with timings and
  rates; a rerun that resumes at the last checkpoint records no losses of its own.
- ``metrics/eval`` but its figures: the SR images and ``grid.png`` (the figures are computed from them) and
  ``metric_details.json`` (which metrics had local weights to run with).
- ``data/raw`` and ``models/tiny``: inputs the pipeline generates, covered by the outputs made from them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

from xpsr_core.errors import UserError

# group (the stage that writes the files) -> files or folders under the repository root
DIGEST_GROUPS: dict[str, tuple[str, ...]] = {
    "shard": ("data/shards/hr", "data/shards/val_hr"),
    "degrade": ("data/shards/pairs", "data/shards/val_pairs"),
    "caption": ("manifests/captions",),
    "embed": ("data/shards/train",),
    "train": ("models/xpsr/final",),
    "evaluate": ("metrics/eval/metrics.json", "metrics/eval/per_image.parquet", "metrics/eval/per_image.csv"),
}

# keys and columns that differ between two runs of the same code, or between codes that make the same outputs
VOLATILE_KEYS: dict[str, str] = {
    "seconds": "wall-clock time of the run",
    "samples_per_s": "throughput of the run",
    "captions_per_s": "throughput of the run",
    "produced_by": "config hash and code fingerprint of a done marker (*.stats.json)",
    "shards_processed": "a rerun reuses the shards an earlier run left done",
    "shards_skipped": "a rerun reuses the shards an earlier run left done",
}

# files directly in a listed folder that are records of how it was made, not outputs
EXCLUDED_NAMES: dict[str, str] = {
    "config.json": "stage config with its config hash and code fingerprint",
    "ledger.jsonl": "the files xpsr wrote in the folder, in the order it began writing them",
}

HASH_CHUNK_BYTES = 1 << 20


def _without_volatile(value: object) -> object:
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items() if key not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_without_volatile(item) for item in value]
    return value


def _canonical_json(value: object) -> bytes:
    # bytes (Parquet binary columns) as hex, anything else JSON lacks (dates, decimals) as its str
    def encode_other(item: object) -> str:
        return item.hex() if isinstance(item, bytes) else str(item)

    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=encode_other).encode()


def canonical_bytes(path: Path) -> bytes | None:
    """The canonical form that stands for ``path`` in its digest, or None where its bytes are hashed as they are."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return _canonical_json(_without_volatile(json.loads(path.read_text(encoding="utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path} is not valid JSON ({error}); rerun the stage that wrote it.") from error
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        table = table.drop_columns([name for name in table.column_names if name in VOLATILE_KEYS])
        schema = [[field.name, str(field.type)] for field in table.schema]
        return _canonical_json({"schema": schema, "rows": table.to_pylist()})
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = rows[0] if rows else []
        kept = [index for index, name in enumerate(header) if name not in VOLATILE_KEYS]
        return _canonical_json([[row[index] for index in kept if index < len(row)] for row in rows])
    return None


def file_digest(path: Path) -> str:
    """sha256 of the file's canonical form (JSON, Parquet, CSV) or of its bytes."""
    canonical = canonical_bytes(path)
    if canonical is not None:
        return hashlib.sha256(canonical).hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files_of(root: Path, listed: str) -> list[Path]:
    target = root / listed
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise UserError(
            f"{listed} is missing under {root}: run `dvc repro` there first, or leave its group out with --skip."
        )
    files = (path for path in target.rglob("*") if path.is_file())
    return sorted(path for path in files if path.relative_to(target).as_posix() not in EXCLUDED_NAMES)


def collect_digests(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, dict[str, str]]:
    """{group: {path relative to root: sha256}} for every group of DIGEST_GROUPS not in ``skip``."""
    unknown = sorted(skip - DIGEST_GROUPS.keys())
    if unknown:
        raise UserError(
            f"unknown group(s) {', '.join(unknown)} for --skip; the groups are {', '.join(DIGEST_GROUPS)}."
        )
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the repository root where `dvc repro` has run.")
    digests = {}
    for group, listed_paths in DIGEST_GROUPS.items():
        if group not in skip:
            files = [path for listed in listed_paths for path in _files_of(root, listed)]
            digests[group] = {path.relative_to(root).as_posix(): file_digest(path) for path in files}
    return digests


def compare_digests(
    reference: dict[str, dict[str, str]], current: dict[str, dict[str, str]], skip: frozenset[str] = frozenset()
) -> list[str]:
    """One line per file that differs, is missing or is new, in the groups of ``reference`` not in ``skip``."""
    lines = []
    for group in sorted(reference.keys() - skip):
        expected, found = reference[group], current.get(group, {})
        for path in sorted(expected.keys() | found.keys()):
            if path not in found:
                lines.append(f"{group}: {path} missing")
            elif path not in expected:
                lines.append(f"{group}: {path} new")
            elif expected[path] != found[path]:
                lines.append(f"{group}: {path} differs")
    return lines


def _read_reference(path: Path) -> dict[str, dict[str, str]]:
    try:
        reference = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(f"--compare {path}: no such file; record one with --out first.") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--compare {path} is not a digest file written by --out ({error}).") from error
    if not isinstance(reference, dict) or not all(isinstance(files, dict) for files in reference.values()):
        raise UserError(
            f"--compare {path} is not a digest file written by --out: expected {{group: {{path: sha256}}}}."
        )
    return reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="repository root where `dvc repro` of the embedded default has run")
    parser.add_argument("--out", type=Path, help="write the digests here as JSON (default: print them)")
    parser.add_argument("--compare", type=Path, help="digest file to check against; exits 1 if any file differs")
    parser.add_argument(
        "--skip", action="append", default=[], choices=sorted(DIGEST_GROUPS), help="leave this group out (repeatable)"
    )
    args = parser.parse_args(argv)
    skip = frozenset(args.skip)
    try:
        current = collect_digests(args.root, skip)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        elif not args.compare:
            print(json.dumps(current, indent=2, sort_keys=True))
        if args.compare:
            differences = compare_digests(_read_reference(args.compare), current, skip)
            for line in differences:
                print(line)
            checked = sum(len(files) for files in current.values())
            print(f"{len(differences)} difference(s) from {args.compare}" if differences
                  else f"all {checked} files match {args.compare}")
            return 1 if differences else 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
