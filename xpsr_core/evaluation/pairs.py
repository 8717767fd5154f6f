"""LR/HR pairs to evaluate on, and SR images made elsewhere matched to them.

Pairs come from pair shards (``lr.png``/``hr.png`` per key: ``xpsr degrade`` or ``xpsr testset``)
or from two folders matched by relative path without extension. A pair that cannot be used keeps
its key and an ``error``, so it is reported rather than silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..io import images as image_io
from ..io.shards import read_shard, require_finished, tar_path


@dataclass
class Pair:
    key: str  # the shard key, or the LR file's relative path without extension (non-UTF-8 bytes as surrogates)
    name: str  # the LR file's relative path (folders) or the key (shards)
    key_bytes: Optional[bytes] = None  # folders: the key's exact bytes (tables show ``key`` readable, \xNN)
    lr: Optional[np.ndarray] = None  # H x W x 3 uint8
    hr: Optional[np.ndarray] = None  # (scale H) x (scale W) x 3 uint8
    error: Optional[str] = None


def images_by_stem(folder: Path) -> dict[str, Path]:
    """Every image under ``folder`` by its relative path without extension."""
    return {str(path.relative_to(folder).with_suffix("")): path for path in image_io.find_images(folder)}


def _require_folder(folder: Optional[Path], what: str) -> Path:
    if folder is None or not Path(folder).is_dir():
        raise UserError(f"The {what} {image_io.readable_name(str(folder))} does not exist or is not a folder.")
    return Path(folder)


def pairs_from_folders(lr_dir: Path, hr_dir: Path, limit: Optional[int] = None) -> list[Pair]:
    """Pairs of LR and HR files with the same relative path (extension ignored), in LR path order."""
    lr_dir, hr_dir = _require_folder(lr_dir, "LR folder"), _require_folder(hr_dir, "HR folder")
    hr_by_stem = images_by_stem(hr_dir)
    lr_files = image_io.find_images(lr_dir)
    if not lr_files:
        raise UserError(f"{image_io.readable_name(str(lr_dir))} holds no images.")
    pairs: list[Pair] = []
    for path in lr_files[:limit]:
        stem = str(path.relative_to(lr_dir).with_suffix(""))
        pair = Pair(key=stem, name=path.relative_to(lr_dir).as_posix(), key_bytes=os.fsencode(stem))
        if stem not in hr_by_stem:
            pair.error = f"no HR image for {image_io.readable_name(stem)} in {image_io.readable_name(str(hr_dir))}"
        else:
            try:
                pair.lr = image_io.load_image(path, image_io.DEFAULT_MAX_PIXELS).pixels
                pair.hr = image_io.load_image(hr_by_stem[stem], image_io.DEFAULT_MAX_PIXELS).pixels
            except image_io.ImageRejected as rejected:
                pair.error = f"{rejected.status}: {rejected.message}"
        pairs.append(pair)
    return pairs


def pairs_from_shards(folder: Path, limit: Optional[int] = None) -> list[Pair]:
    """The pairs of a finished pair-shard folder, in shard and key order."""
    if folder is None:
        raise UserError("No pairs: pass pair shards (--input-dir) or an LR/HR folder pair (--lr-dir, --hr-dir).")
    sizes = require_finished(Path(folder), "pair-shard", "Pass pair shards (--input-dir; `xpsr testset` or "
                             "`xpsr degrade` write them) or an LR/HR folder pair (--lr-dir, --hr-dir).")
    pairs: list[Pair] = []
    for shard in sorted(sizes):
        for sample in read_shard(tar_path(folder, shard)):
            pair = Pair(key=sample["__key__"], name=sample["__key__"])
            try:
                pair.lr, pair.hr = image_io.decode_png(sample["lr.png"]), image_io.decode_png(sample["hr.png"])
            except Exception as error:  # a damaged sample is reported with its key
                pair.error = f"cannot decode the pair: {error}"
            pairs.append(pair)
            if limit and len(pairs) >= limit:
                return pairs
    return pairs


def check_scale(pairs: list[Pair], scale: int) -> None:
    """Mark pairs whose HR is not ``scale`` x the LR in both sides."""
    for pair in pairs:
        if pair.error is None:
            (lh, lw), (hh, hw) = pair.lr.shape[:2], pair.hr.shape[:2]
            if (hh, hw) != (lh * scale, lw * scale):
                pair.error = f"HR is {hw}x{hh}, not {scale} x the LR's {lw}x{lh}"


def match_images(folder: Path, pairs: list[Pair]) -> dict[str, Path | str]:
    """For each usable pair's key: the image in ``folder`` with its key or LR name (without extension), or why none."""
    folder = _require_folder(folder, "SR folder")
    by_stem = images_by_stem(folder)
    by_file_stem: dict[str, list[Path]] = {}
    for path in by_stem.values():
        by_file_stem.setdefault(path.stem, []).append(path)
    found: dict[str, Path | str] = {}
    for pair in pairs:
        if pair.error is not None:
            continue
        candidates = [by_stem.get(pair.key), by_stem.get(str(Path(pair.name).with_suffix("")))]
        unique = by_file_stem.get(Path(pair.name).stem, [])
        if len(unique) == 1:  # a flat folder of results named like the LR files
            candidates.append(unique[0])
        missing = f"no image for {image_io.readable_name(pair.key)} in {image_io.readable_name(str(folder))}"
        found[pair.key] = next((c for c in candidates if c is not None), missing)
    return found
