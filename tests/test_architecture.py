"""The import rules ARCHITECTURE.md states ("Layers and their imports"), checked on the import statements.

Every import counts (module level and inside functions), read with ast through ``xpsr_core/import_graph.py``.
"""

from __future__ import annotations

from pathlib import Path

from xpsr_core.import_graph import direct_imports

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
