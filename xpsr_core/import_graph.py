"""Which project files a module can load, read from the import statements (``ast``, nothing is imported).

Every import counts, at module level or inside a function, absolute or relative, so a stage's files are all the
files its command can run. The code fingerprint (:mod:`.fingerprint`), ``tools/dvc_deps.py`` (dvc.yaml's deps)
and the test of ARCHITECTURE.md's import rules read the same graph.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

PACKAGES = ("xpsr_core", "stages")
# the CLI maps options onto stage configs (tracked as params), it computes no output
NOT_A_DEPENDENCY = frozenset({"stages/cli.py"})
RELATIVE_MODULE = re.compile(r"\.+[a-z_][a-z0-9_.]*")


def module_file(name: str, root: Path) -> Path | None:
    """The project file of a dotted module name (a package's ``__init__.py``), or None when it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = Path(root).joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def module_name(path: Path, root: Path) -> str:
    """The dotted name of a project file (``a/b/__init__.py`` -> ``a.b``)."""
    parts = Path(path).relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> frozenset[str]:
    """Every module name an import statement anywhere in ``path`` names (``from a import b``: a and a.b)."""
    info = Path(path).stat()
    return _imported_modules(str(path), str(root), info.st_size, info.st_mtime_ns)


@lru_cache(maxsize=None)
def _imported_modules(path: str, root: str, size: int, mtime_ns: int) -> frozenset[str]:  # size, mtime key the cache
    package = ".".join(Path(path).relative_to(root).parent.parts)  # what a relative import is relative to
    lazy_package = Path(path).name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=path)):
        if lazy_package and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and RELATIVE_MODULE.fullmatch(node.value):
            # a package's lazy exports (xpsr_core.lazy_exports) name their submodules as relative strings
            level = len(node.value) - len(node.value.lstrip("."))
            parent = package.split(".")[: len(package.split(".")) - level + 1]
            names.add(".".join(parent + [node.value[level:]]))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(names)


def direct_imports(path: Path, root: Path) -> set[Path]:
    """The project files ``path``'s import statements name (not the packages' ``__init__`` run on the way)."""
    files = {module_file(name, root) for name in imported_modules(path, root)}
    return {file for file in files if file is not None and file != Path(path)}


def loaded_files(module: str, root: Path) -> list[str]:
    """Project files (sorted, relative, posix) that importing and running ``module`` can load, its packages'
    ``__init__`` included, the CLI left out."""
    root = Path(root)
    todo, seen = [module], set()
    while todo:
        parts = todo.pop().split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = module_file(".".join(parts[:depth]), root)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path, root))
    return sorted({p.relative_to(root).as_posix() for p in seen} - NOT_A_DEPENDENCY)


def stage_module(stage: str) -> str:
    """The stage module behind a stage name (``testset_synthetic`` and ``testset_paired`` share one)."""
    return "stages." + ("testset" if stage.startswith("testset_") else stage.replace("-", "_"))
