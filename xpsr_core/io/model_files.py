"""A broken or incomplete model folder, said in one line: what loaders raise on bad files, as a ``UserError``.

Kept apart from ``models`` (which imports torch and diffusers) so that every loader, the captioner's included,
shares it without importing the XPSR models.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from ..errors import UserError


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not os.path.isabs(text)


def is_local_source(path_or_id: str | os.PathLike) -> bool:
    """Whether a model source is a local path: it exists, or it does not look like a hub id (``owner/name``)."""
    text = os.fspath(path_or_id)
    return os.path.exists(os.path.expanduser(text)) or not _looks_like_hub_id(text)


def _weight_errors() -> tuple[type[BaseException], ...]:
    """What loaders raise on a broken model folder: unreadable or truncated files, bad JSON, wrong shapes."""
    # OSError: missing files, and the hub libraries' wrapper for unreadable weights; ValueError: JSON decode errors
    # and mismatched configs; RuntimeError, EOFError, UnpicklingError and LookupError (KeyError, IndexError): what
    # torch.load's unpickler raises on truncated or garbage .bin/.pth files, and a config naming an unknown class
    return (OSError, ValueError, RuntimeError, LookupError, EOFError, pickle.UnpicklingError, SafetensorError)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MISSING_FILE = re.compile(r"(?:file named|containing an?) ([\w.\-]+?)(?: file|\.? |\.?$)")


def describe_load_error(error: BaseException, path: str | os.PathLike) -> str:
    """One line on why loading ``path`` failed, naming the file; for a local folder never a hub URL."""
    text = " ".join(str(error).split()).split(". ")[0] or type(error).__name__  # the first sentence says it
    local = is_local_source(path)
    missing = _MISSING_FILE.search(text)
    if local and not os.path.exists(os.path.expanduser(os.fspath(path))):
        return "it does not exist"
    if local and ("huggingface.co" in text or "does not appear to have" in text):
        return f"it has no {missing.group(1)}" if missing else "files are missing from it"
    if not local and ("huggingface.co" in text or "does not appear to have" in text):
        return f"there is no such local folder, and the hub could not serve it ({text.rstrip('.')})"
    if isinstance(error, json.JSONDecodeError):
        return f"one of its JSON files is not valid JSON ({text})"

    place = Path(os.path.expanduser(os.fspath(path)))
    if place.is_file():  # one weight file: whatever its reader raised (torch.load's KeyError is a bare number)
        return f"the file is truncated or corrupt ({type(error).__name__}: {text.rstrip('.')})"
    if isinstance(error, (SafetensorError, EOFError, pickle.UnpicklingError)) or "checkpoint file" in text:
        weights = sorted(p.name for p in place.glob("*") if p.suffix in WEIGHT_SUFFIXES) if local else []
        named = f" ({', '.join(weights)})" if weights else ""
        return f"its weight file{named} is truncated or corrupt ({text.rstrip('.')})"
    return text.rstrip(".")


@contextmanager
def loading_model(
    what: str, path: str | os.PathLike, hint: str = "", also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Wrap one model load: a broken or incomplete model folder becomes a ``UserError`` naming ``what`` and ``path``.

    Only the errors loaders raise on bad files (see ``_weight_errors``, plus ``also``) are turned into user errors;
    anything else is a programming error and propagates.
    """
    try:
        yield
    except UserError:
        raise
    except _weight_errors() + also as error:
        hint = hint or "Replace the folder with a complete copy, or rebuild it with the command that wrote it."
        raise UserError(f"Could not load {what} from {os.fspath(path)}: {describe_load_error(error, path)}. "
                        f"{hint}") from error
