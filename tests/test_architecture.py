"""The import rules ARCHITECTURE.md states ("Layers and their imports"), checked on the import statements.

Every import counts (module level and inside functions), read with ast through ``xpsr_core/import_graph.py``.
Where an import may sit (the top of its module, or inside a function) is read with ast as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

from xpsr_core.import_graph import PACKAGES, direct_imports, module_file, module_name

ROOT = Path(__file__).resolve().parent.parent

# (importing files, imported files, why not): prefixes of repository-relative paths; ARCHITECTURE.md's rules
FORBIDDEN = [
    ("xpsr_core/", "stages/", "the library never imports the stages"),
    ("xpsr_core/models/", "xpsr_core/infer/", "models sit below inference"),
    ("xpsr_core/models/", "xpsr_core/train/", "models sit below training"),
    ("xpsr_core/io/", "xpsr_core/models/", "the formats sit below the models"),
    ("xpsr_core/io/", "xpsr_core/infer/", "the formats sit below inference"),
    ("xpsr_core/io/", "xpsr_core/train/", "the formats sit below training"),
    ("xpsr_core/infer/", "xpsr_core/train/", "inference does not depend on training"),
]
# stage modules may import the shared helpers of stages/ and nothing else of it
STAGE_HELPERS = {"stages/__init__.py", "stages/common.py"}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def import_edges(package: str) -> dict[str, set[str]]:
    files = sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)
    return {relative(p): {relative(q) for q in direct_imports(p, ROOT)} for p in files}


def test_no_layer_imports_one_above_it():
    edges = {**import_edges("xpsr_core"), **import_edges("stages")}
    broken = [f"{source} imports {target} ({why})" for source, targets in edges.items() for target in sorted(targets)
              for importer, imported, why in FORBIDDEN if source.startswith(importer) and target.startswith(imported)]
    assert not broken, "\n".join(broken)


def test_no_stage_module_imports_another():
    broken = [f"{source} imports {target}" for source, targets in import_edges("stages").items()
              for target in sorted(targets)
              if target.startswith("stages/") and target not in STAGE_HELPERS and source != "stages/cli.py"]
    assert not broken, "\n".join(broken)


def test_no_import_cycle_among_library_modules():
    edges = import_edges("xpsr_core")
    cycles = []
    state: dict[str, str] = {}  # visiting / done

    def visit(node: str, path: list[str]) -> None:
        state[node] = "visiting"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "visiting":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_rules_see_function_local_imports():
    # the checks would catch an import inside a function: the graph holds them
    assert "xpsr_core/evaluation/baselines.py" in import_edges("xpsr_core")["xpsr_core/evaluation/compare.py"]


# ---- imports go at the top of modules, except optional dependencies and what keeps the light modules light ----
# the light modules' roots: the CLI, and the stage modules, whose config classes the CLI imports to derive a
# command's options and validate its values before the stage runs; the light set is their module-level closure
LIGHT_ROOTS = ("stages/cli.py", "stages/*.py")
# what a light module imports only inside the function that needs it (top-level names; project modules whose
# module-level closure reaches one of these are heavy too)
HEAVY = frozenset({
    "torch", "torchvision", "diffusers", "transformers", "accelerate", "basicsr", "safetensors", "pyiqa", "cv2",
    "scipy", "skimage", "webdataset", "pandas", "pyarrow", "PIL", "numpy", "huggingface_hub",
})
# `xpsr --help` loads typer and nothing more (the config machinery loads when a command runs), so it is instant
HELP_HEAVY = HEAVY | {"pydantic", "pydantic_core", "yaml", "rich"}
# imported where used, so that the project works without them (any import under `except ImportError` counts too)
OPTIONAL = frozenset({"pyiqa", "openai", "httpx", "vllm", "bitsandbytes", "open_clip", "timm"})
# (file, imported module): why it stays inside a function (an import cycle at module level)
CYCLE_BREAKERS: dict[tuple[str, str], str] = {}


def _is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _imports(root: Path, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute module names an import statement loads (``from a import b``: a, and a.b when it is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        name = module_name(path, root)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [base, *(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", root))]


def _top_level(statements: list[ast.stmt]):
    """The imports that run when the module is imported: in its body, its classes and top-level if/try/with
    blocks, not under ``if TYPE_CHECKING``."""
    for statement in statements:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            yield statement
        elif isinstance(statement, ast.If):
            if not _is_type_checking(statement.test):
                yield from _top_level(statement.body)
            yield from _top_level(statement.orelse)
        elif isinstance(statement, ast.Try):
            for block in (statement.body, statement.orelse, statement.finalbody, *(h.body for h in statement.handlers)):
                yield from _top_level(block)
        elif isinstance(statement, (ast.ClassDef, ast.With)):
            yield from _top_level(statement.body)


def _function_local(tree: ast.Module):
    """(import, whether it sits under ``except ImportError``) for every import inside a function."""
    def visit(node: ast.AST, in_function: bool, guarded: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                yield child, guarded
            catches = isinstance(child, ast.Try) and any(
                name in ast.unparse(h.type) for h in child.handlers if h.type for name in ("ImportError",
                                                                                            "ModuleNotFoundError"))
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
                             guarded or catches)

    yield from visit(tree, False, False)


def misplaced_imports(root: Path) -> list[str]:
    """``file:line imports X inside a function`` for each function-local import that could be at its module's top."""
    root = Path(root)
    files = sorted(p for package in PACKAGES for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in files}
    project: dict[Path, set[Path]] = {}  # module-level edges: project files, the packages' __init__ on the way
    external: dict[Path, set[str]] = {}
    for path, tree in trees.items():
        project[path], external[path] = set(), set()
        for node in _top_level(tree.body):
            for name in _imports(root, path, node):
                parts = name.split(".")
                if parts[0] not in PACKAGES:
                    external[path].add(parts[0])
                found = {module_file(".".join(parts[:i]), root) for i in range(1, len(parts) + 1)}
                project[path] |= {f for f in found if f is not None and f != path}

    def closure(starts) -> set[Path]:
        seen, todo = set(), list(starts)
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo += project.get(path, ())
        return seen

    def heavy(path: Path, names: frozenset) -> bool:
        return any(external[q] & names for q in closure([path]))

    light = closure(p for pattern in LIGHT_ROOTS for p in root.glob(pattern) if p in trees)
    help_path = closure([root / "stages/cli.py"]) if root / "stages/cli.py" in trees else set()
    offenders = []
    for path, tree in trees.items():
        where = path.relative_to(root).as_posix()
        for node, guarded in _function_local(tree):
            names = _imports(root, path, node)
            top = names[0].split(".")[0]
            if guarded or top in OPTIONAL or (where, names[0]) in CYCLE_BREAKERS:
                continue
            if path in light:
                kept_out = HELP_HEAVY if path in help_path else HEAVY
                if top in kept_out or any(heavy(f, kept_out) for n in names if (f := module_file(n, root))):
                    continue
            shown = names[1:] if isinstance(node, ast.ImportFrom) and len(names) > 1 else names
            offenders.append(f"{where}:{node.lineno} imports {', '.join(shown)} inside a function")
    return offenders


def test_imports_are_at_the_top_of_modules():
    offenders = misplaced_imports(ROOT)
    assert not offenders, "\n".join(offenders)


def test_the_stage_modules_are_light_roots():
    from stages.cli import COMMANDS  # the CLI module imports no torch

    light_roots = {p.relative_to(ROOT).as_posix() for pattern in LIGHT_ROOTS for p in ROOT.glob(pattern)}
    assert {f"stages/{command.stage}.py" for command in COMMANDS.values()} <= light_roots


def test_the_import_check_finds_each_misplaced_import(tmp_path):
    files = {
        "stages/__init__.py": "",
        "stages/cli.py": "import typer\n\ndef run():\n    import yaml\n    import json\n",
        "stages/shard.py": "from xpsr_core import light\n\ndef run():\n    from xpsr_core import heavy\n"
                           "    from xpsr_core.light import VALUE\n",
        "xpsr_core/__init__.py": "",
        "xpsr_core/light.py": "import pydantic\nVALUE = 1\n\ndef f():\n    import torch\n    import yaml\n",
        "xpsr_core/heavy.py": "import numpy\n\ndef f():\n    import pyiqa\n    try:\n        import vllm\n"
                              "    except ImportError:\n        vllm = None\n    from . import light\n"
                              "    import torch\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(misplaced_imports(tmp_path)) == [
        "stages/cli.py:5 imports json inside a function",  # yaml (line 4) keeps `xpsr --help` instant
        "stages/shard.py:5 imports xpsr_core.light inside a function",  # xpsr_core.heavy (line 4) loads numpy
        "xpsr_core/heavy.py:10 imports torch inside a function",  # pyiqa and vllm are optional
        "xpsr_core/heavy.py:9 imports xpsr_core.light inside a function",
        "xpsr_core/light.py:6 imports yaml inside a function",  # torch (line 5) stays out of the light modules
    ]
