"""Code fingerprints: what code and which library versions compute a stage's outputs.

Every output folder (``config.json``) and every shard's done marker (its stats file) records the
config hash and the fingerprint of its stage. Done work is reused only when both match, so a
changed line of the degradation, or a new basicsr, rebuilds the shards it affects.

The fingerprint is deterministic across machines for the same code: it hashes the contents of
the project's source files the stage's module can load (found by following its imports,
:mod:`.import_graph`; sorted relative paths, never mtimes) and the installed versions of the
libraries involved (``STAGE_LIBRARIES``). ``tools/dvc_deps.py`` writes dvc.yaml's ``deps`` from the
same import graph.
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .import_graph import loaded_files, stage_module

# the repository root: xpsr_core/ and stages/ live here (a test may point it at a changed copy)
PROJECT_ROOT = Path(__file__).resolve().parent.parent

_IMAGING = ["numpy", "pillow", "pyarrow"]
_TORCH = ["torch", "safetensors", "diffusers", "transformers", "tokenizers"]

# distributions whose versions enter each stage's fingerprint
STAGE_LIBRARIES: dict[str, list[str]] = {
    "demo_data": ["scikit-image", *_IMAGING],
    "models": [*_TORCH],
    "shard": [*_IMAGING],
    "degrade": ["torch", "torchvision", "basicsr", "opencv-python", "opencv-python-headless", "scipy", *_IMAGING],
    "caption": ["torch", "transformers", "tokenizers", "accelerate", *_IMAGING],
    "embed": [*_TORCH, *_IMAGING],
    "train": [*_TORCH, "accelerate", "webdataset", *_IMAGING],
    "sr": [*_TORCH, "accelerate", *_IMAGING],
    "evaluate": [*_TORCH, "accelerate", "scipy", "pyiqa", "timm", "basicsr", *_IMAGING],
    "testset_synthetic": [
        "torch",
        "torchvision",
        "basicsr",
        "opencv-python",
        "opencv-python-headless",
        "scipy",
        *_IMAGING,
    ],
    "testset_paired": [*_IMAGING],
}


def stage_files(stage: str, root: Path | None = None) -> list[str]:
    """The relative paths (sorted, posix) of the source files that enter ``stage``'s fingerprint: every
    project file its stage module can load."""
    return loaded_files(stage_module(stage), Path(root or PROJECT_ROOT))


def library_versions(stage: str) -> dict[str, str]:
    """name -> installed version (or "absent") of the libraries that shape ``stage``'s outputs."""
    versions = {}
    for name in sorted(set(STAGE_LIBRARIES.get(stage, [])) | {"python"}):
        if name == "python":
            versions[name] = "{}.{}".format(*sys.version_info[:2])
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime only key the cache
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def source_digests(stage: str, root: Path | None = None) -> dict[str, str]:
    root = Path(root or PROJECT_ROOT)
    digests = {}
    for relative in stage_files(stage, root):
        path = root / relative
        info = path.stat()
        digests[relative] = _file_digest(str(path), info.st_size, info.st_mtime_ns)
    return digests


def stage_fingerprint(stage: str) -> dict:
    """{"code": hash, "sources": {path: digest}, "libraries": {name: version}} for ``stage``."""
    sources = source_digests(stage)
    libraries = library_versions(stage)
    text = json.dumps({"stage": stage, "sources": sources, "libraries": libraries}, sort_keys=True)
    return {"code": hashlib.sha256(text.encode()).hexdigest()[:16], "sources": sources, "libraries": libraries}


def describe_changes(old: dict | None, new: dict) -> str:
    """What differs between two fingerprints, in words (files changed, libraries with other versions)."""
    if not old or not isinstance(old, dict) or "code" not in old:
        return "the outputs record no code fingerprint (made by an older xpsr)"
    parts = []
    old_sources, new_sources = old.get("sources", {}), new.get("sources", {})
    files = sorted(k for k in set(old_sources) | set(new_sources) if old_sources.get(k) != new_sources.get(k))
    if files:
        shown = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
        parts.append(f"source files {shown}")
    old_libs, new_libs = old.get("libraries", {}), new.get("libraries", {})
    libs = sorted(k for k in set(old_libs) | set(new_libs) if old_libs.get(k) != new_libs.get(k))
    if libs:
        parts.append(
            "libraries " + ", ".join(f"{k} {old_libs.get(k, 'absent')} -> {new_libs.get(k, 'absent')}" for k in libs)
        )
    return "; ".join(parts) or "the code fingerprint differs"
