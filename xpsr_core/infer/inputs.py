"""SR inputs: the images a run names, their captions, and a run generator's state in a sidecar.

Inputs are image files, folders (recursive) or globs, each with a unique relative name. Captions
come from the captioner (the config's two instructions, by default the paper's, on the LR image),
from a caption manifest (Parquet file or folder of them, matched by source path, file name, stem
or key), or are given once for every image.
"""

from __future__ import annotations

import base64
import gc
import glob
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pyarrow.parquet as pq
import torch

from ..caption import captioner as captioner_module
from ..caption.served import CaptionFailure, Endpoint, ServedCaptioner
from ..caption.settings import GenerationSettings
from ..dist import rank_device
from ..errors import UserError
from ..io.images import IMAGE_SUFFIXES, find_images, readable_name
from .config import SRModelConfig


def collect_inputs(specs: list[str]) -> list[tuple[Path, str]]:
    """(path, relative name) of every image named by files, folders or globs; names are unique."""
    found: list[tuple[Path, str]] = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            found += [(p, p.relative_to(path).as_posix()) for p in find_images(path)]
        elif path.is_file():
            found.append((path, path.name))
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if matches:
                root = glob_root(spec)  # names are relative to the pattern's fixed prefix
                found += [(m, m.relative_to(root).as_posix()) for m in matches]
            else:
                raise UserError(f"The pattern {spec!r} matches no images.")
        else:
            raise UserError(f"Input {spec} is not an image file, a folder or a glob pattern that matches images.")
    if not found:
        raise UserError("No input images: the given folders hold no jpg, png, webp, tiff or bmp files.")
    names = [name for _, name in found]
    if len(set(names)) != len(names):
        duplicates = sorted({readable_name(n) for n in names if names.count(n) > 1})
        raise UserError(
            f"Several inputs map to the same output name ({', '.join(duplicates[:5])}); run them separately."
        )
    return found


def glob_root(spec: str) -> Path:
    """The fixed part of a glob pattern, before its first component with a wildcard ("." when none)."""
    parts = Path(os.path.expanduser(spec)).parts
    fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return Path(*fixed) if fixed else Path(".")


# a stem whose sidecar would be the folder's own record
RESERVED_STEMS = frozenset({"config"})


def output_stems(names: list[str]) -> list[str]:
    """The output stem of each input name: the name without its suffix (``sub/x.jpg`` -> ``sub/x``, giving
    ``sub/x.png`` and ``sub/x.json``), except where several names share that stem (ignoring case, as some file
    systems do: ``x.png`` and ``X.jpg``) or it is reserved (``config``): then each of them keeps its suffix
    (``x.png.png``, ``X.jpg.png``). A function of the names alone, so reruns and resumes find the same files;
    names that clash even so are a UserError listing them."""
    plain = [str(Path(name).with_suffix("")) for name in names]
    sharing = Counter(stem.casefold() for stem in plain)
    stems = [name if sharing[stem.casefold()] > 1 or stem in RESERVED_STEMS else stem
             for name, stem in zip(names, plain)]
    final = Counter(stem.casefold() for stem in stems)
    clashing = sorted(readable_name(name) for name, stem in zip(names, stems) if final[stem.casefold()] > 1)
    if clashing:
        raise UserError(
            f"These inputs would write the same output files: {', '.join(clashing[:6])}. Rename one of them, "
            "or run them into separate output folders."
        )
    return stems


class CaptionLookup:
    """Captions from Parquet manifests, looked up by source path, file name, stem or key."""

    def __init__(self, manifest: Path):
        manifest = Path(manifest)
        files = sorted(manifest.glob("*.parquet")) if manifest.is_dir() else [manifest]
        if not files or not all(f.is_file() for f in files):
            raise UserError(f"Caption manifest {manifest} does not exist or holds no .parquet files.")
        self.table: dict[str, tuple[str, str]] = {}
        for file in files:
            try:
                rows = pq.read_table(file).to_pylist()
            except Exception as error:
                raise UserError(f"Cannot read the caption manifest {file}: {error}") from None
            for row in rows:
                if row.get("status", "ok") != "ok" or row.get("content_caption") is None:
                    continue
                pair = (row["content_caption"], row.get("quality_caption") or "")
                for name in (row.get("key"), row.get("source")):
                    if name:
                        self.table.setdefault(str(name), pair)
                        self.table.setdefault(Path(str(name)).name, pair)
                        self.table.setdefault(Path(str(name)).stem, pair)

    def get(self, *names: str) -> Optional[tuple[str, str]]:
        for name in names:
            for candidate in (name, Path(name).name, Path(name).stem):
                if candidate in self.table:
                    return self.table[candidate]
        return None


def caption_images(
    config: SRModelConfig, items: list[dict], on_progress: Optional[Callable[[int, int], None]] = None
) -> None:
    """Fill ``content``/``quality`` (or ``error``) of items holding a PIL ``image`` and a ``name``/``key``.

    ``on_progress(done, total)`` follows the captioner's batches.
    """
    ready = [item for item in items if "image" in item and "error" not in item]
    if config.captions == "given":
        for item in ready:
            item["content"], item["quality"] = config.content_caption, config.quality_caption
        return
    if config.captions == "manifest":
        if config.manifest is None:
            raise UserError("captions=manifest needs a manifest path (--manifest FILE_OR_FOLDER).")
        lookup = CaptionLookup(config.manifest)
        for item in ready:
            found = lookup.get(*(n for n in (item.get("name"), item.get("key")) if n))
            if found is None:
                item["error"] = f"no ok caption for {item.get('name') or item.get('key')} in {config.manifest}"
            else:
                item["content"], item["quality"] = found
        return

    generation = GenerationSettings(max_new_tokens=config.caption_max_new_tokens)
    served = config.caption_engine == "openai"
    captioner = _served_captioner(config, generation) if served else _local_captioner(config, generation)
    instructions = [config.content_instruction, config.quality_instruction]
    # a server takes every image at once (caption_concurrency requests in flight)
    step = max(len(ready), 1) if served else config.caption_batch_size
    for start in range(0, len(ready), step):
        batch = ready[start : start + step]
        texts = captioner.caption([item["image"] for item in batch], instructions)
        for item, (content, quality) in zip(batch, texts):
            failed = [f"{kind} caption: {text.error}" for kind, text in (("content", content), ("quality", quality))
                      if isinstance(text, CaptionFailure)]
            if failed:
                item["error"] = "; ".join(failed)
            else:
                item["content"], item["quality"] = content, quality
        if on_progress is not None:
            on_progress(start + len(batch), len(ready))
    if served:
        return
    del captioner  # its weights go before the SR model loads

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _local_captioner(config: SRModelConfig, generation):
    # looked up when called, so that a replaced captioner_module.Captioner takes effect
    return captioner_module.Captioner(config.captioner, dtype=config.dtype, device=rank_device(config.device),
                                      settings=generation)


def _served_captioner(config: SRModelConfig, generation):
    """The captioner behind ``caption_endpoint``; a one-line UserError when that server is down or serves others."""
    if not config.caption_endpoint:
        raise UserError("caption_engine=openai needs the server's base URL: set caption_endpoint "
                        "(e.g. http://127.0.0.1:8000/v1).")
    endpoint = Endpoint(config.caption_endpoint.rstrip("/"), config.caption_api_model or config.captioner,
                        config.caption_api_key_env, config.caption_request_timeout, config.caption_max_retries)
    return ServedCaptioner(endpoint, generation, config.caption_concurrency)


def generator_state(generator) -> str:
    """A torch.Generator's state as text (base64), for a sidecar."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(generator, text: str) -> None:
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))


def saved_generator_state(path: Path) -> Optional[str]:
    """The generator state recorded in a finished image's sidecar (None when absent or unreadable)."""
    try:
        state = json.loads(Path(path).read_text()).get("generator_state")
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, str) and state else None
