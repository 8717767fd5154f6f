"""dvc.yaml's deps hold every project source file each stage's command can load, so `dvc repro` never keeps stale
outputs.

The files a command can load are found statically: every import (module level or inside a function,
absolute or relative) of the stage's module, followed through the project's own modules. The CLI
(`stages/cli.py`) only maps options onto the stage config, which DVC tracks through params, so it is
not a dependency of any stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("xpsr_core", "stages")
NOT_A_DEPENDENCY = {"stages/cli.py"}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None when it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module name an import statement anywhere in ``path`` names (``from a import b``: a and a.b)."""
    package = ".".join(path.relative_to(ROOT).parent.parts)  # what a relative import is relative to
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def loaded_files(module: str) -> set[str]:
    """Project files (relative, posix) that importing and running ``module`` can load, its packages' __init__
    included."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return {p.relative_to(ROOT).as_posix() for p in seen} - NOT_A_DEPENDENCY


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_deps_cover_every_source_file_the_stage_loads(name):
    stage = dvc_stages()[name]
    command = stage["cmd"].split()[1]
    assert stage["cmd"].startswith("xpsr "), stage["cmd"]
    module = f"stages.{command.replace('-', '_')}"
    assert module_file(module) is not None, f"{name}: no stage module {module} for `xpsr {command}`"
    missing = sorted(f for f in loaded_files(module) if not covered(f, stage.get("deps", [])))
    assert not missing, f"dvc.yaml stage {name} loads {missing} but does not list them (or their folder) in deps"


def test_the_import_walk_sees_function_local_and_relative_imports():
    files = loaded_files("stages.evaluate")
    assert "xpsr_core/evaluation/compare.py" in files  # imported inside run()
    assert "xpsr_core/evaluation/baselines.py" in files  # imported relatively inside a function of compare.py
    assert "xpsr_core/__init__.py" in files and "stages/cli.py" not in files


def stage_module(stage: str) -> str:
    """The stage module behind a fingerprint entry (testset_synthetic and testset_paired share one)."""
    return "stages." + ("testset" if stage.startswith("testset_") else stage)


@pytest.mark.parametrize("stage", sorted(__import__("xpsr_core.fingerprint").fingerprint.STAGE_SOURCES))
def test_the_code_fingerprint_covers_every_source_file_the_stage_loads(stage):
    from xpsr_core.fingerprint import STAGE_SOURCES

    missing = sorted(f for f in loaded_files(stage_module(stage)) if not covered(f, STAGE_SOURCES[stage]))
    assert not missing, f"the {stage} fingerprint (xpsr_core/fingerprint.py STAGE_SOURCES) lacks {missing}"
