"""Decoding untrusted image files into RGB uint8 arrays, with a status for every failure.

Conversions to RGB (deterministic, documented in the README):
- EXIF orientation is applied first, so crops are in the orientation a viewer shows.
- 16-bit grayscale (PIL modes I;16*, I) is scaled to 8 bits with round(v / 257).
- Grayscale (L) and bilevel (1) images are replicated to three channels.
- Images with transparency (RGBA, LA, PA, P with a transparency entry) are composited
  over a white background.
- CMYK and YCbCr use Pillow's fixed conversion (no ICC colour management).
- Any other mode (float images, multi-band scientific formats) is rejected as
  ``unsupported_mode``.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
# an LR image to super-resolve needs this many pixels on its shorter side: below it there is no picture to
# enlarge (a 1x1 pixel, a tracking dot) and x4 gives less than one 32 px output tile of the VAE's 8 px latent grid
MIN_SR_SIDE = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

# statuses recorded in shard indexes
OK = "ok"
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
DECODE_ERROR = "decode_error"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
UNSUPPORTED_MODE = "unsupported_mode"
# statuses of paths the input walk meets that are not readable image files
BROKEN_LINK = "broken_link"  # a symbolic link whose target does not exist
LINK_LOOP = "link_loop"  # a symbolic link that resolves to itself
NOT_A_FILE = "not_a_file"  # a FIFO, socket or device with an image extension
# reasons for paths that get no index row but a count in the report
UNSUPPORTED_EXTENSION = "unsupported_extension"  # a file the reader does not take
LINKED_FOLDER = "linked_folder"  # a symbolic link to a folder (not followed)


class ImageRejected(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # H x W x 3, uint8
    source_mode: str
    source_size: tuple[int, int]  # (width, height) as stored, before EXIF rotation
    exif_transposed: bool


def find_images(root: Path) -> list[Path]:
    """Every image file below ``root`` (recursive), sorted by relative path for determinism."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def readable_name(name: str) -> str:
    """A file name for people: bytes that are not UTF-8 shown as \\xNN escapes (the exact bytes: ``os.fsencode``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class WalkEntry:
    relative: str  # posix path below the root, as os.fsdecode gives it (non-UTF-8 bytes as surrogate escapes)
    status: str | None = None  # None: a file to read and decode; else why it cannot be
    error: str = ""


def _list_dir(path: str) -> list:
    with os.scandir(path) as entries:
        return list(entries)


def walk_inputs(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[list[WalkEntry], Counter]:
    """Every path below ``root``, accounted for: (entries, skipped).

    ``entries`` (sorted by relative path): files with an image extension to decode, and, with a status,
    every image-named path that cannot be read (broken links, link loops, FIFOs and devices) and every
    folder that cannot be listed. ``skipped`` counts by reason the paths that are not inputs: files with
    other extensions and links to folders (not followed), and links or special files without an image
    extension. Never raises for what it finds below ``root``.
    """
    entries: list[WalkEntry] = []
    skipped: Counter = Counter()
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            listing = _list_dir(os.path.join(root, folder) if folder else str(root))
        except OSError as error:
            if not folder:
                raise
            entries.append(WalkEntry(folder, UNREADABLE, f"cannot list folder: {error.strerror or error}"))
            continue
        for entry in listing:
            relative = f"{folder}/{entry.name}" if folder else entry.name
            image_named = os.path.splitext(entry.name)[1].lower() in suffixes
            kind, problem = _kind(entry)
            if kind == "dir" and problem is None:
                pending.append(relative)
            elif kind == "file" and problem is None:
                if image_named:
                    entries.append(WalkEntry(relative))
                else:
                    skipped[UNSUPPORTED_EXTENSION] += 1
            elif image_named and kind != "linked_dir":
                entries.append(WalkEntry(relative, kind if problem is None else problem[0], problem[1] if problem else
                                         "not a regular file (FIFO, socket or device)"))
            else:
                skipped[LINKED_FOLDER if kind == "linked_dir" else (problem[0] if problem else NOT_A_FILE)] += 1
    entries.sort(key=lambda e: PurePosixPath(e.relative))
    return entries, skipped


def walk_folder(root: Path, what: str, detail: str = "") -> tuple[list[WalkEntry], Counter]:
    """``walk_inputs`` of a folder the user named as the ``what`` (e.g. "HR folder"; ``detail`` follows its path):
    a ``UserError`` when it is missing, cannot be listed or holds no images."""
    named = f"the {what} {readable_name(str(root))}{detail}"
    if not Path(root).is_dir():
        raise UserError(f"{named[0].upper()}{named[1:]} does not exist or is not a folder.")
    try:
        entries, skipped = walk_inputs(root)
    except OSError as error:
        raise UserError(f"Cannot list {named}: {error.strerror or error}.") from None
    if not entries:
        others = f"; skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}" if skipped else ""
        raise UserError(f"{named[0].upper()}{named[1:]} holds no images (jpg, png, webp, tiff, bmp){others}.")
    return entries, skipped


def _kind(entry) -> tuple[str, tuple[str, str] | None]:
    """(file | dir | linked_dir | not_a_file, (status, error) when the path is unusable)."""
    try:
        if entry.is_symlink():
            try:
                target = os.stat(entry.path)
            except FileNotFoundError:
                return "link", (
                    BROKEN_LINK,
                    f"symbolic link to a missing target ({readable_name(os.readlink(entry.path))})",
                )
            except OSError as error:
                if error.errno == errno.ELOOP:
                    return "link", (LINK_LOOP, "symbolic link loop (it resolves to itself)")
                return "link", (UNREADABLE, f"cannot follow symbolic link: {error.strerror or error}")
            if stat.S_ISDIR(target.st_mode):
                return "linked_dir", None
            return ("file", None) if stat.S_ISREG(target.st_mode) else (NOT_A_FILE, None)
        if entry.is_dir(follow_symlinks=False):
            return "dir", None
        if entry.is_file(follow_symlinks=False):
            return "file", None
        return NOT_A_FILE, None
    except OSError as error:
        return "unknown", (UNREADABLE, f"cannot inspect path: {error.strerror or error}")


def read_file_bytes(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except PermissionError as error:
        raise ImageRejected(UNREADABLE, f"permission denied: {error.strerror}") from None
    except OSError as error:
        raise ImageRejected(UNREADABLE, f"cannot read file: {error.strerror or error}") from None
    if not data:
        raise ImageRejected(EMPTY_FILE, "file is empty (0 bytes)")
    return data


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageRejected(UNSUPPORTED_MODE, f"integer image with values outside 16 bits (mode {mode})")
        gray = np.round(values / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    raise ImageRejected(UNSUPPORTED_MODE, f"image mode {mode} has no defined RGB conversion")


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode bytes to RGB uint8; raise ImageRejected with a status for anything unusable."""
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own size guard below replaces Pillow's bomb check
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected(TOO_LARGE, f"header claims {width}x{height} pixels, over the limit of {max_pixels}")
        image.load()
        source_mode = image.mode
        transposed = _orientation(image) not in (None, 1)
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        pixels = np.asarray(rgb, dtype=np.uint8).copy()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(DECODE_ERROR, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageRejected(DECODE_ERROR, f"cannot decode image: {error}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    return DecodedImage(pixels=pixels, source_mode=source_mode, source_size=(width, height), exif_transposed=transposed)


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # malformed EXIF blocks are treated as "no orientation"
        return None


def load_image(path: Path, max_pixels: int, min_side: int = 1) -> DecodedImage:
    """Read and decode one file; an image whose shorter side is under ``min_side`` px is rejected as too small."""
    decoded = decode_image(read_file_bytes(path), max_pixels)
    height, width = decoded.pixels.shape[:2]
    if min(width, height) < min_side:
        raise ImageRejected(TOO_SMALL, f"{width}x{height} is under the minimum {min_side} px on a side")
    return decoded


def load_sr_input(path: Path) -> DecodedImage:
    """An LR image to super-resolve: decoded like every input, and at least ``MIN_SR_SIDE`` px on a side."""
    return load_image(path, DEFAULT_MAX_PIXELS, min_side=MIN_SR_SIDE)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes for an H x W x 3 uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
