"""The paper's test sets as pair shards: synthetic crops of HR images, and real LR/HR pairs.

Both builders write the folder format of the degrade stage: per shard ``{shard:05d}.tar`` with
``<key>.lr.png``, ``<key>.hr.png`` and ``<key>.json``, a Parquet index with a row per sample, and
the stats file written last (the done marker); ``sizes.json`` once every shard is done. So
``xpsr evaluate --input-dir`` reads a test set as it reads validation pairs. The shards are built on the
shard framework (:mod:`.sharded`: worker processes, ranks, a report with counts); finished shards
made by the same config and code are kept on a rerun; every file is written to a temporary name first.

Synthetic (Table 1, DIV2K-val): ``count`` random ``hr_size`` crops of the HR images (sorted by
relative path, folder by folder), crop ``i`` from usable image ``i mod n``, its position and flip
drawn from a generator seeded by (seed, "testset_synthetic/crop", key) and its Real-ESRGAN
degradation from one seeded by (seed, "testset_synthetic", key). Keys are the crop numbers,
zero-padded to 7 digits, so a crop's content does not depend on ``count`` or the shard size. The
authors' ``utils_data/make_valid.py`` sets the defaults the stage config uses: the training
degradation settings; a random horizontal flip (``use_hflip``); images under the crop size
reflect-padded (basicsr's RealESRGANDataset pads them; here the padding is centred, as the shard
stage does it); and the USM-sharpened HR saved as the ground truth, with the degradation started
from the sharpened HR. Where this differs from that script: the LR is stored at ``hr_size / scale``
(the script saves it bicubic-upsampled to the HR size; ``xpsr sr`` and ``xpsr evaluate`` upsample
the LR themselves), and every crop is kept under its own key (the script names its files after the
source image, so each epoch's crops overwrite the previous ones).

Paired (RealSR, DRealSR): LR and HR files matched by relative path without extension, after
removing an optional suffix from each side's stems (``_LR4`` / ``_HR``); the LR is centre-cropped
to ``lr_size`` and the HR to ``lr_size * scale`` at the same place (HR box = LR box x scale). Keys
are the LR files' relative stems, so SR images made elsewhere and named after the LR files match
them; ``%`` and ``.`` (webdataset cuts keys at the first dot) and bytes of non-UTF-8 names are
written as ``%XX`` (``stem_key``), which keeps distinct stems distinct.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np

from .crops import cut, plan_crops, reflect_pad_to
from .degrade.settings import DegradationSettings
from .errors import UserError
from .io import images
from .io.atomic import atomic_path
from .io.outputs import ensure_writable_dir
from .io.shards import TarShardWriter, index_path, tar_path, write_stats
from .seeding import numpy_rng
from .sharded import ShardedStage, ShardProgress, run_sharded

SYNTHETIC_STAGE = "testset_synthetic"
PAIRED_STAGE = "testset_paired"
CROP_SEED_STAGE = f"{SYNTHETIC_STAGE}/crop"
SYNTHETIC_KEY_DIGITS = 7
MAX_SYNTHETIC_COUNT = 10**SYNTHETIC_KEY_DIGITS - 1
LISTED_PER_PROBLEM = 10
OK = images.OK

# progress(phase, done, total): called as images are read and as samples are written
Progress = Callable[[str, int, int], None]
PrepareOut = Callable[[Path], Path]

# reasons a paired-set file or pair is refused (or, when allowed, skipped)
UNMATCHED_LR, UNMATCHED_HR = "unmatched_lr", "unmatched_hr"
AMBIGUOUS, UNREADABLE, SIZE_MISMATCH, TOO_SMALL, NAME_TOO_LONG = (
    "ambiguous", "unreadable", "size_mismatch", "too_small", "name_too_long")
UNMATCHED = (UNMATCHED_LR, UNMATCHED_HR)


def stem_key(stem: str) -> str:
    """A sample key for a relative file stem: ``%``, ``.`` and undecodable name bytes as ``%XX``, the rest kept."""
    parts = []
    for char in stem:
        if char in "%.":
            parts.append(f"%{ord(char):02X}")
        elif "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, as os.fsdecode escapes it
            parts.append(f"%{ord(char) - 0xDC00:02X}")
        else:
            parts.append(char)
    return "".join(parts)


def synthetic_key(index: int) -> str:
    return f"{index:0{SYNTHETIC_KEY_DIGITS}d}"


def _fits_tar_header(key: str) -> bool:
    try:
        tarfile.TarInfo(f"{key}.lr.png").tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    except ValueError:
        return False
    return True


def _listing(items: Iterable[str], limit: int = LISTED_PER_PROBLEM) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _load(root: Path, entry: images.WalkEntry, max_pixels: int) -> images.DecodedImage:
    if entry.status is not None:  # the walk found it unusable (broken link, loop, not a file, unreadable folder)
        raise images.ImageRejected(entry.status, entry.error)
    return images.load_image(Path(root) / entry.relative, max_pixels)


def _reload(root: Path, relative: str, expected: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Decode a file checked earlier in the run; it must still decode, to the same (width, height)."""
    path = Path(root) / relative
    try:
        pixels = images.load_image(path, max_pixels).pixels
    except images.ImageRejected as rejected:
        problem = f"{rejected.status}: {rejected.message}"
    else:
        if (pixels.shape[1], pixels.shape[0]) == tuple(expected):
            return pixels
        problem = f"it was {expected[0]}x{expected[1]}, now {pixels.shape[1]}x{pixels.shape[0]}"
    raise UserError(f"{images.readable_name(str(path))} changed while the test set was being built ({problem}). "
                    "Leave the input folders alone during the run, then rerun.")


def _write_index(out: Path, shard: int, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["key", "status", "error"] + sorted({c for row in rows for c in row} - {"key", "status", "error"})
    with atomic_path(index_path(out, shard)) as tmp:
        pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), tmp)


def _sample_fields(lr: np.ndarray, hr: np.ndarray, meta: dict) -> dict[str, bytes]:
    """A pair sample's tar members: both images as PNG, the metadata as JSON with sorted keys."""
    return {"lr.png": images.encode_png(lr), "hr.png": images.encode_png(hr),
            "json": json.dumps(meta, sort_keys=True).encode()}


def _shard_stats(shard: int, samples: int) -> dict:
    # every sample of a test-set shard is written: failures happen per input file, before the shards
    return {"shard": shard, "inputs": samples, "samples": samples, "failed": 0,
            "status_counts": {OK: samples} if samples else {}}


def _run_shards(out: Path, name: str, n_items: int, per_shard: int, build: Callable[[int], dict], *, workers: int,
                start_method: str, totals: Callable[[dict, list[dict]], dict], progress: Progress | None,
                phase: str) -> dict:
    """Build every shard of this rank not done yet on the shard framework (workers, ranks, done markers); sizes.json
    once every shard is done; the report (also ``report.json``) with the set's own figures from ``totals``."""
    def told(update: ShardProgress) -> None:
        if progress is not None:
            progress(f"{phase} (shards)", update.done, update.total)

    stage = ShardedStage(name=name, out=out, n_shards=-(-n_items // per_shard), work=build, workers=workers,
                         start_method=start_method, unit="samples", totals=totals)
    return run_sharded(stage, progress=told)


def _items(shard: int, n_items: int, per_shard: int) -> range:
    return range(shard * per_shard, min(n_items, (shard + 1) * per_shard))


def _prepared(out: Path, prepare_out: PrepareOut | None) -> Path:
    return Path(prepare_out(Path(out)) if prepare_out is not None else ensure_writable_dir(out))


# ---------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SourceImage:
    root: Path
    relative: str
    width: int
    height: int
    mode: str
    exif_transposed: bool

    @property
    def shown(self) -> str:
        return images.readable_name(self.relative)


def check_synthetic_sizes(hr_size: int, settings: DegradationSettings) -> None:
    """Raise UserError unless ``hr_size`` crops can be degraded with ``settings``."""
    scale, minimum = settings.scale, settings.min_hr_size()
    if hr_size % scale or hr_size < minimum:
        raise UserError(f"hr_size {hr_size} must be divisible by the scale {scale} and at least {minimum} px for these "
                        "degradation settings. Choose another hr_size (512 in the paper) or smaller kernel sizes.")


def read_source_images(
    hr_dirs: list[Path], *, hr_size: int, small_images: Literal["pad", "skip"], min_size: int, max_pixels: int,
    progress: Progress | None = None,
) -> tuple[list[SourceImage], list[dict], Counter]:
    """Decode every image below ``hr_dirs`` once: (usable images in order, failed files, skipped paths by reason).

    A failed file is ``{"source", "folder", "status", "error"}``: unreadable or undecodable files with the
    status ``xpsr_core.io.images`` gives them, and ``too_small`` images (under ``min_size``, or under
    ``hr_size`` when ``small_images`` is "skip").
    """
    listed = []
    skipped: Counter = Counter()
    for root in hr_dirs:
        entries, other = images.walk_folder(root, "HR image folder")
        listed.extend((Path(root), entry) for entry in entries)
        skipped.update(other)
    usable, failed = [], []
    for number, (root, entry) in enumerate(listed, 1):
        try:
            decoded = _load(root, entry, max_pixels)
            height, width = decoded.pixels.shape[:2]
            short = min(height, width)
            if short < min_size or (short < hr_size and small_images == "skip"):
                limit = f"minimum {min_size}" if short < min_size else f"crop {hr_size}"
                raise images.ImageRejected(images.TOO_SMALL, f"{width}x{height} is under the {limit} px")
            usable.append(
                SourceImage(root, entry.relative, width, height, decoded.source_mode, decoded.exif_transposed))
        except images.ImageRejected as rejected:
            failed.append({"source": images.readable_name(entry.relative), "folder": images.readable_name(str(root)),
                           "status": rejected.status, "error": rejected.message})
        if progress is not None:
            progress("reading HR images", number, len(listed))
    return usable, failed, skipped


def _cut_synthetic_crops(sources: list[SourceImage], keys: list[tuple[int, str]], *, hr_size: int, hflip: bool,
                         seed: int, max_pixels: int) -> list[tuple[str, np.ndarray, dict]]:
    """(key, HR crop, metadata) for crop numbers with their keys, in key order; each source decoded once."""
    by_source: dict[int, list[str]] = {}
    for index, key in keys:
        by_source.setdefault(index % len(sources), []).append(key)
    crops = []
    for source_index, source_keys in by_source.items():
        source = sources[source_index]
        pixels = _reload(source.root, source.relative, (source.width, source.height), max_pixels)
        padded, (pad_top, pad_left) = reflect_pad_to(pixels, hr_size)
        for key in source_keys:
            crop = plan_crops(*padded.shape[:2], hr_size, "random", 1, hflip, numpy_rng(seed, CROP_SEED_STAGE, key))[0]
            left, top, right, bottom = crop.box
            meta = {
                "key": key,
                "source": source.shown,
                "source_folder": images.readable_name(source.root.name),
                "source_size": [source.width, source.height],
                "source_mode": source.mode,
                "exif_transposed": source.exif_transposed,
                # box in source pixel coordinates; it extends outside the image where padded
                "crop_box": [left - pad_left, top - pad_top, right - pad_left, bottom - pad_top],
                "padded": padded.shape[:2] != pixels.shape[:2],
                "hflip": crop.hflip,
            }
            crops.append((key, cut(padded, crop), meta))
    crops.sort(key=lambda item: item[0])
    return crops


def _check_synthetic_request(hr_dirs: list[Path], *, count: int, hr_size: int, settings: DegradationSettings,
                             samples_per_shard: int) -> None:
    """Raise UserError for a request no set can be made for, before any image is read."""
    check_synthetic_sizes(hr_size, settings)
    if not 1 <= count <= MAX_SYNTHETIC_COUNT:
        raise UserError(f"count must be between 1 and {MAX_SYNTHETIC_COUNT}, got {count}.")
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be at least 1, got {samples_per_shard}.")
    if not hr_dirs:
        raise UserError("Give at least one folder of HR images (--hr-dir).")


def _no_usable_images(hr_dirs: list[Path], failed: list[dict], failures: Counter, min_size: int) -> UserError:
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(failures.items()))
    examples = _listing(f"{f['source']} ({f['error']})" for f in failed)
    folders = ", ".join(map(str, hr_dirs))
    return UserError(f"None of the {len(failed)} images below {folders} can be used ({counts}): {examples}. "
                     "Point hr_dirs (--hr-dir) at folders of readable images, or let small images in "
                     f"(small_images=pad, a min_size under {min_size}).")


@dataclass(frozen=True)
class _SyntheticShardBuilder:
    """Builds one shard of a synthetic set: its crops cut, degraded in batches and written with their metadata."""

    out: Path
    sources: list[SourceImage]
    settings: DegradationSettings
    degrade_crops: Callable  # .degrade.batches.degrade_crops, imported in the builder function: it loads torch
    count: int
    samples_per_shard: int
    hr_size: int
    hflip: bool
    seed: int
    usm_hr: bool
    max_pixels: int
    batch_size: int
    device: str

    def __call__(self, shard: int) -> dict:
        items = _items(shard, self.count, self.samples_per_shard)
        crops = _cut_synthetic_crops(self.sources, [(i, synthetic_key(i)) for i in items], hr_size=self.hr_size,
                                     hflip=self.hflip, seed=self.seed, max_pixels=self.max_pixels)
        meta_by_key = {key: meta for key, _, meta in crops}
        # a source name's exact bytes (the readable one, \\xNN for non-UTF-8 bytes, is "source")
        exact_by_key = {synthetic_key(i): os.fsencode(self.sources[i % len(self.sources)].relative) for i in items}
        rows = []
        with TarShardWriter(tar_path(self.out, shard)) as writer:
            results = self.degrade_crops([(key, hr) for key, hr, _ in crops], settings=self.settings, seed=self.seed,
                                         stage=SYNTHETIC_STAGE, usm_hr=self.usm_hr, device=self.device,
                                         batch_size=self.batch_size)
            for result in results:
                meta = {**meta_by_key[result.key], "scale": self.settings.scale, "usm_hr": self.usm_hr,
                        "degradation": result.params}
                writer.write(result.key, _sample_fields(result.lr, result.hr, meta))
                rows.append({"key": result.key, "status": OK, "error": "", "source": meta["source"],
                             "source_bytes": exact_by_key[result.key],
                             **{f"deg.{name}": value for name, value in result.params.items()}})
        _write_index(self.out, shard, sorted(rows, key=lambda row: row["key"]))
        stats = _shard_stats(shard, writer.count)
        write_stats(self.out, shard, stats)
        return stats


def _synthetic_report(sources: list[SourceImage], failed: list[dict], failures: Counter, skipped: Counter, *,
                      hr_size: int, scale: int, started: float) -> dict:
    """The synthetic set's figures, beside the shard framework's counts (``samples``: those of this rank's shards)."""
    return {
        "testset": "synthetic",
        "images": len(sources) + len(failed),
        "images_used": len(sources),
        "images_padded": sum(min(s.width, s.height) < hr_size for s in sources),
        "failures": dict(sorted(failures.items())),
        "failed_files": failed,
        "skipped_paths": dict(sorted(skipped.items())),
        "hr_size": hr_size,
        "lr_size": hr_size // scale,
        "seconds": round(time.perf_counter() - started, 3),
    }


def build_synthetic_testset(
    *,
    hr_dirs: list[Path],
    out: Path,
    count: int = 3000,
    hr_size: int = 512,
    settings: DegradationSettings | None = None,
    seed: int = 0,
    usm_hr: bool = True,
    hflip: bool = True,
    small_images: Literal["pad", "skip"] = "pad",
    min_size: int = 32,
    samples_per_shard: int = 250,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    batch_size: int = 16,
    device: str = "cpu",
    workers: int = 1,
    prepare_out: PrepareOut | None = None,
    progress: Progress | None = None,
) -> dict:
    """Cut ``count`` random crops of the images below ``hr_dirs``, degrade them, and write pair shards to ``out``.

    ``prepare_out(out)`` readies the output folder once the inputs have been checked, before anything is
    written (the stage records its config there); by default the folder is only created. ``workers`` processes
    (CPU) take whole shards; under several ranks each builds its share of the shards. Returns the report (also
    ``report.json``): images read, used and padded, failures by status (and every failed file), samples, shards
    built and kept, seconds.
    """
    from .degrade.batches import degrade_crops

    started = time.perf_counter()
    settings = settings or DegradationSettings()
    _check_synthetic_request(hr_dirs, count=count, hr_size=hr_size, settings=settings,
                             samples_per_shard=samples_per_shard)
    sources, failed, skipped = read_source_images(list(hr_dirs), hr_size=hr_size, small_images=small_images,
                                                  min_size=min_size, max_pixels=max_pixels, progress=progress)
    failures = Counter(f["status"] for f in failed)
    if not sources:
        raise _no_usable_images(hr_dirs, failed, failures, min_size)
    out = _prepared(out, prepare_out)
    build = _SyntheticShardBuilder(out, sources, settings, degrade_crops, count, samples_per_shard, hr_size=hr_size,
                                   hflip=hflip, seed=seed, usm_hr=usm_hr, max_pixels=max_pixels,
                                   batch_size=batch_size, device=device)
    return _run_shards(out, SYNTHETIC_STAGE, count, samples_per_shard, build,
                       workers=1 if device.startswith("cuda") else workers, start_method="spawn",
                       totals=lambda report, stats: _synthetic_report(sources, failed, failures, skipped,
                                                                      hr_size=hr_size, scale=settings.scale,
                                                                      started=started),
                       progress=progress, phase="degrading crops")


# ---------------------------------------------------------------------------- paired


@dataclass(frozen=True)
class ImagePair:
    key: str
    name: str  # the matched name: relative stem without the side's suffix
    lr_relative: str
    hr_relative: str
    lr_size: tuple[int, int]  # (width, height)
    hr_size: tuple[int, int]


def _stem(relative: str) -> str:
    return os.path.splitext(relative)[0]


def _match_name(relative: str, suffix: str) -> str:
    stem = _stem(relative)
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def _decoded_size(root: Path, entry: images.WalkEntry, max_pixels: int) -> tuple[int, int]:
    height, width = _load(root, entry, max_pixels).pixels.shape[:2]
    return width, height


def _note_problem(problems: dict[str, list[str]], reason: str, text: str) -> None:
    problems.setdefault(reason, []).append(text)


def _group_by_name(lr_entries: list[images.WalkEntry], hr_entries: list[images.WalkEntry], lr_suffix: str,
                   hr_suffix: str) -> dict[str, tuple[list, list]]:
    """Matched name -> (LR entries, HR entries) of that name."""
    by_name: dict[str, tuple[list, list]] = {}
    for side, entries, suffix in ((0, lr_entries, lr_suffix), (1, hr_entries, hr_suffix)):
        for entry in entries:
            by_name.setdefault(_match_name(entry.relative, suffix), ([], []))[side].append(entry)
    return by_name


def _one_to_one(by_name: dict[str, tuple[list, list]],
                problems: dict[str, list[str]]) -> list[tuple[images.WalkEntry, images.WalkEntry, str]]:
    """(LR entry, HR entry, name) for names with one file on each side, in name order; the others are problems."""
    candidates = []
    for name in sorted(by_name):
        lrs, hrs = by_name[name]
        if not hrs or not lrs:
            for entry in lrs or hrs:
                _note_problem(problems, UNMATCHED_LR if lrs else UNMATCHED_HR, images.readable_name(entry.relative))
        elif len(lrs) > 1 or len(hrs) > 1:
            files = [f"{side} {images.readable_name(e.relative)}" for side, group in (("LR", lrs), ("HR", hrs))
                     for e in group]
            _note_problem(problems, AMBIGUOUS, f"{images.readable_name(name)} ({', '.join(files)})")
        else:
            candidates.append((lrs[0], hrs[0], name))
    return candidates


def _decoded_sizes(lr_dir: Path, hr_dir: Path, lr_entry: images.WalkEntry, hr_entry: images.WalkEntry,
                   max_pixels: int, problems: dict[str, list[str]]) -> list[tuple[int, int]]:
    """The (width, height) of each side that decodes, LR first; a side that does not is an unreadable problem."""
    sizes = []
    for side, root, entry in (("LR", lr_dir, lr_entry), ("HR", hr_dir, hr_entry)):
        try:
            sizes.append(_decoded_size(root, entry, max_pixels))
        except images.ImageRejected as rejected:
            shown_file = images.readable_name(entry.relative)
            _note_problem(problems, UNREADABLE, f"{side} {shown_file} ({rejected.status}: {rejected.message})")
    return sizes


def _checked_pair(lr_entry: images.WalkEntry, hr_entry: images.WalkEntry, name: str,
                  sizes: list[tuple[int, int]], *, lr_size: int, scale: int,
                  problems: dict[str, list[str]]) -> ImagePair | None:
    """The pair of two decoded files, or None with its problem noted."""
    shown = images.readable_name(lr_entry.relative)
    key = stem_key(_stem(lr_entry.relative))
    (lr_w, lr_h), (hr_w, hr_h) = sizes
    if (hr_w, hr_h) != (lr_w * scale, lr_h * scale):
        expected = f"{lr_w * scale}x{lr_h * scale}"
        _note_problem(problems, SIZE_MISMATCH, f"{shown} (LR {lr_w}x{lr_h}, HR {hr_w}x{hr_h}; expected HR {expected})")
    elif min(lr_w, lr_h) < lr_size:
        _note_problem(problems, TOO_SMALL, f"{shown} (LR {lr_w}x{lr_h})")
    elif not _fits_tar_header(key):
        _note_problem(problems, NAME_TOO_LONG, shown)
    else:
        return ImagePair(key, images.readable_name(name), lr_entry.relative, hr_entry.relative, (lr_w, lr_h),
                         (hr_w, hr_h))
    return None


def match_pairs(*, lr_dir: Path, hr_dir: Path, lr_size: int, scale: int, lr_suffix: str = "", hr_suffix: str = "",
                max_pixels: int = images.DEFAULT_MAX_PIXELS,
                progress: Progress | None = None) -> tuple[list[ImagePair], dict[str, list[str]]]:
    """Match LR and HR files by name and check every pair: (usable pairs in key order, problems by reason).

    A problem is a readable description: files without a partner (``unmatched_lr``/``unmatched_hr``), names
    given by several files on one side (``ambiguous``), files that cannot be decoded (``unreadable``), pairs
    whose HR is not ``scale`` x the LR (``size_mismatch``), LR images under ``lr_size`` (``too_small``), and LR
    names too long for a tar header (``name_too_long``).
    """
    lr_entries, _ = images.walk_folder(lr_dir, "LR image folder")
    hr_entries, _ = images.walk_folder(hr_dir, "HR image folder")
    problems: dict[str, list[str]] = {}
    candidates = _one_to_one(_group_by_name(lr_entries, hr_entries, lr_suffix, hr_suffix), problems)
    pairs = []
    for number, (lr_entry, hr_entry, name) in enumerate(candidates, 1):
        if progress is not None:
            progress("checking pairs", number, len(candidates))
        sizes = _decoded_sizes(lr_dir, hr_dir, lr_entry, hr_entry, max_pixels, problems)
        if len(sizes) < 2:
            continue
        pair = _checked_pair(lr_entry, hr_entry, name, sizes, lr_size=lr_size, scale=scale, problems=problems)
        if pair is not None:
            pairs.append(pair)
    pairs.sort(key=lambda pair: pair.key)
    return pairs, problems


_PROBLEM_TEXT = {
    UNMATCHED_LR: "LR files without an HR file of the same name",
    UNMATCHED_HR: "HR files without an LR file of the same name",
    AMBIGUOUS: "names that several files on one side share",
    UNREADABLE: "files that cannot be read as images",
    SIZE_MISMATCH: "pairs whose HR is not {scale}x the LR in size",
    TOO_SMALL: "pairs whose LR is smaller than the {lr_size} px crop",
    NAME_TOO_LONG: "LR paths too long for a tar member name (shorten the file or folder names)",
}


def describe_problems(problems: dict[str, list[str]], *, scale: int, lr_size: int, reasons: Iterable[str]) -> str:
    """Each of ``reasons`` that occurred, with its count and up to ten examples, joined by semicolons."""
    wanted = set(reasons)
    return "; ".join(f"{text.format(scale=scale, lr_size=lr_size)} ({len(found)}): {_listing(found)}"
                     for reason, text in _PROBLEM_TEXT.items() if reason in wanted and (found := problems.get(reason)))


def _remedies(reasons: Iterable[str]) -> str:
    reasons = set(reasons)
    remedies = []
    if reasons & set(UNMATCHED):
        remedies.append("set lr_suffix / hr_suffix (--lr-suffix / --hr-suffix) when LR and HR names differ by a "
                        "suffix (RealSR: _LR4 / _HR), or set allow_unmatched (--allow-unmatched) to skip files "
                        "without a partner")
    if reasons - set(UNMATCHED):
        remedies.append("fix or remove these files, check scale and lr_size (LR files stored at the HR size must be "
                        "downscaled first), or set skip_bad_pairs (--skip-bad-pairs) to skip these pairs")
    return "; ".join(remedies)


def _refuse_problems(problems: dict[str, list[str]], pairs: list[ImagePair], *, lr_dir: Path, hr_dir: Path,
                     lr_size: int, scale: int, allow_unmatched: bool, skip_bad_pairs: bool) -> None:
    """Raise UserError for the problems the flags do not let the run skip, or when no pair is left."""
    refused = [r for r in problems if not (allow_unmatched if r in UNMATCHED else skip_bad_pairs)]
    if refused:
        found = describe_problems(problems, scale=scale, lr_size=lr_size, reasons=refused)
        raise UserError(f"Cannot build a paired test set from LR {lr_dir} and HR {hr_dir}: {found}. "
                        f"To go on, {_remedies(refused)}.")
    if not pairs:
        found = describe_problems(problems, scale=scale, lr_size=lr_size, reasons=problems)
        raise UserError(f"No usable LR/HR pairs in LR {lr_dir} and HR {hr_dir}: {found}. Check that the folders hold "
                        "the LR and HR images of one test set and that lr_suffix / hr_suffix, scale and lr_size match "
                        "their names and sizes.")


@dataclass(frozen=True)
class _PairedShardBuilder:
    """Builds one shard of a paired set: each pair's LR centre crop and the HR crop at the same place."""

    out: Path
    lr_dir: Path
    hr_dir: Path
    pairs: list[ImagePair]
    samples_per_shard: int
    lr_size: int
    scale: int
    max_pixels: int

    def __call__(self, shard: int) -> dict:
        items = _items(shard, len(self.pairs), self.samples_per_shard)
        rows = []
        with TarShardWriter(tar_path(self.out, shard)) as writer:
            for pair in (self.pairs[i] for i in items):
                lr_tile, hr_tile, meta = self._crop(pair)
                writer.write(pair.key, _sample_fields(lr_tile, hr_tile, meta))
                rows.append({"key": pair.key, "status": OK, "error": "", "name": meta["name"],
                             "lr_source": meta["lr_source"], "hr_source": meta["hr_source"],
                             "lr_source_bytes": os.fsencode(pair.lr_relative),
                             "hr_source_bytes": os.fsencode(pair.hr_relative)})
        _write_index(self.out, shard, rows)
        stats = _shard_stats(shard, writer.count)
        write_stats(self.out, shard, stats)
        return stats

    def _crop(self, pair: ImagePair) -> tuple[np.ndarray, np.ndarray, dict]:
        """(LR tile, HR tile, metadata); the HR box is the LR box x scale."""
        lr_size, scale = self.lr_size, self.scale
        hr_crop = lr_size * scale
        lr = _reload(Path(self.lr_dir), pair.lr_relative, pair.lr_size, self.max_pixels)
        hr = _reload(Path(self.hr_dir), pair.hr_relative, pair.hr_size, self.max_pixels)
        left, top = (pair.lr_size[0] - lr_size) // 2, (pair.lr_size[1] - lr_size) // 2
        hr_left, hr_top = left * scale, top * scale
        meta = {
            "key": pair.key,
            "name": pair.name,
            "lr_source": images.readable_name(pair.lr_relative),
            "hr_source": images.readable_name(pair.hr_relative),
            "lr_source_size": list(pair.lr_size),
            "hr_source_size": list(pair.hr_size),
            "lr_crop_box": [left, top, left + lr_size, top + lr_size],
            "hr_crop_box": [hr_left, hr_top, hr_left + hr_crop, hr_top + hr_crop],
            "scale": scale,
        }
        lr_tile = np.ascontiguousarray(lr[top : top + lr_size, left : left + lr_size])
        hr_tile = np.ascontiguousarray(hr[hr_top : hr_top + hr_crop, hr_left : hr_left + hr_crop])
        return lr_tile, hr_tile, meta


def _paired_report(pairs: list[ImagePair], problems: dict[str, list[str]], *, lr_size: int, scale: int,
                   started: float) -> dict:
    """The paired set's figures, beside the shard framework's counts."""
    return {
        "testset": "paired",
        "pairs": len(pairs),
        "lr_size": lr_size,
        "hr_size": lr_size * scale,
        "skipped": {reason: len(problems[reason]) for reason in sorted(problems)},
        "skipped_examples": {reason: problems[reason][:LISTED_PER_PROBLEM] for reason in sorted(problems)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def build_paired_testset(
    *,
    lr_dir: Path,
    hr_dir: Path,
    out: Path,
    lr_size: int = 128,
    scale: int = 4,
    lr_suffix: str = "",
    hr_suffix: str = "",
    allow_unmatched: bool = False,
    skip_bad_pairs: bool = False,
    samples_per_shard: int = 250,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    workers: int = 1,
    prepare_out: PrepareOut | None = None,
    progress: Progress | None = None,
) -> dict:
    """Centre-crop matched LR/HR files (LR to ``lr_size``, HR to ``lr_size * scale``) into pair shards in ``out``.

    Every problem ``match_pairs`` finds refuses the whole set with one UserError, before anything is
    written, unless ``allow_unmatched`` (files without a partner) or ``skip_bad_pairs`` (the other problems)
    lets the run skip them; skips are counted by reason in the report. ``workers`` and ``prepare_out`` as for
    ``build_synthetic_testset``.
    """
    started = time.perf_counter()
    if lr_size < 1 or scale < 1 or samples_per_shard < 1:
        raise UserError("lr_size, scale and samples_per_shard must be positive, "
                        f"got {lr_size}, {scale} and {samples_per_shard}.")
    pairs, problems = match_pairs(lr_dir=lr_dir, hr_dir=hr_dir, lr_size=lr_size, scale=scale, lr_suffix=lr_suffix,
                                  hr_suffix=hr_suffix, max_pixels=max_pixels, progress=progress)
    _refuse_problems(problems, pairs, lr_dir=lr_dir, hr_dir=hr_dir, lr_size=lr_size, scale=scale,
                     allow_unmatched=allow_unmatched, skip_bad_pairs=skip_bad_pairs)
    out = _prepared(out, prepare_out)
    build = _PairedShardBuilder(out, lr_dir, hr_dir, pairs, samples_per_shard, lr_size=lr_size, scale=scale,
                                max_pixels=max_pixels)
    return _run_shards(out, PAIRED_STAGE, len(pairs), samples_per_shard, build, workers=workers, start_method="fork",
                       totals=lambda report, stats: _paired_report(pairs, problems, lr_size=lr_size, scale=scale,
                                                                   started=started),
                       progress=progress, phase="writing pairs")
