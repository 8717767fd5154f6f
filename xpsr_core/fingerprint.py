"""Code fingerprints: what code and which library versions compute a stage's outputs.

Every output folder (``config.json``) and every shard's done marker (its stats file) records the
config hash and the fingerprint of its stage. Done work is reused only when both match, so a
changed line of the degradation, or a new basicsr, rebuilds the shards it affects.

The fingerprint is deterministic across machines for the same code: it hashes the contents of
the project's source files the stage uses (``STAGE_SOURCES``, sorted relative paths, never
mtimes) and the installed versions of the libraries involved (``STAGE_LIBRARIES``). These two
tables are the one place that says which files and libraries shape a stage's outputs (dvc.yaml's
``deps`` may be checked against ``STAGE_SOURCES``).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

# the repository root: xpsr_core/ and stages/ live here (a test may point it at a changed copy)
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# what every stage command loads (tests/test_dvc_deps.py finds each stage's files by following its imports)
_CORE = [
    "xpsr_core/__init__.py",
    "xpsr_core/config.py",
    "xpsr_core/errors.py",
    "xpsr_core/seeding.py",
    "xpsr_core/dist.py",
    "xpsr_core/progress.py",
    "xpsr_core/sharded.py",
    "xpsr_core/fingerprint.py",
    "xpsr_core/io",
    "stages/__init__.py",
    "stages/common.py",
]
_MODELS = ["xpsr_core/models", "xpsr_core/encoding.py", "xpsr_core/compiling.py", "xpsr_core/infer"]

# project sources (files, or folders whose *.py files all count) whose code computes each stage's outputs
STAGE_SOURCES: dict[str, list[str]] = {
    "demo_data": ["stages/demo_data.py", *_CORE],
    "models": ["stages/models.py", "xpsr_core/zoo.py", *_CORE],
    "shard": ["stages/shard.py", "xpsr_core/hr_shards.py", "xpsr_core/crops.py", *_CORE],
    "degrade": ["stages/degrade.py", "xpsr_core/degrade", *_CORE],
    "caption": ["stages/caption.py", "xpsr_core/caption", *_CORE],
    "embed": ["stages/embed.py", "xpsr_core/training_shards.py", *_MODELS, *_CORE],
    "train": ["stages/train.py", "xpsr_core/train", *_MODELS, *_CORE],
    "sr": ["stages/sr.py", "xpsr_core/caption", *_MODELS, *_CORE],
    "evaluate": [
        "stages/evaluate.py",
        "xpsr_core/evaluation",
        "xpsr_core/metrics",
        "xpsr_core/caption",
        "xpsr_core/degrade",
        *_MODELS,
        *_CORE,
    ],
    "testset_synthetic": [
        "stages/testset.py",
        "xpsr_core/testsets.py",
        "xpsr_core/crops.py",
        "xpsr_core/degrade",
        *_CORE,
    ],
    "testset_paired": ["stages/testset.py", "xpsr_core/testsets.py", "xpsr_core/crops.py", "xpsr_core/degrade", *_CORE],
}

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
    """The relative paths (sorted, posix) of the source files that enter ``stage``'s fingerprint."""
    root = Path(root or PROJECT_ROOT)
    files: set[str] = set()
    for entry in STAGE_SOURCES.get(stage, [f"stages/{stage}.py", *_CORE]):
        path = root / entry
        if path.is_dir():
            files.update(p.relative_to(root).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.is_file():
            files.add(entry)
    return sorted(files)


def library_versions(stage: str) -> dict[str, str]:
    """name -> installed version (or "absent") of the libraries that shape ``stage``'s outputs."""
    from importlib import metadata

    versions = {}
    for name in sorted(set(STAGE_LIBRARIES.get(stage, [])) | {"python"}):
        if name == "python":
            import sys

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
