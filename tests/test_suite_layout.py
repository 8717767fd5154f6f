"""The test suite's own rules: test modules share code through conftest.py (or a helper module), never by importing
one another; importing a test module runs its module-level code again and, under pytest, re-registers its
fixtures in the importer (an autouse fixture then silently applies there too)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(source: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an ``import`` or ``from ... import`` names, at any depth in the file."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, "." * node.level + node.module))
            # ``from tests import test_x`` names the test module as an imported name
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def offending_imports(folder: Path) -> list[str]:
    test_modules = {path.stem for path in folder.glob("test_*.py")}
    problems = []
    for source in sorted(folder.glob("*.py")):
        for line, name in imported_modules(source):
            parts = name.lstrip(".").split(".")
            if parts[-1] in test_modules or (parts[0] == folder.name and len(parts) > 1 and parts[1] in test_modules):
                problems.append(f"{source.name}:{line} imports the test module {name}")
            elif name.lstrip(".") == f"{folder.name}.conftest":
                problems.append(f"{source.name}:{line} imports {name} (a second copy of conftest; use `conftest`)")
    return problems


def test_no_test_module_imports_another():
    assert offending_imports(TESTS) == []


def test_the_check_finds_each_kind_of_import(tmp_path):
    folder = tmp_path / "tests"
    folder.mkdir()
    (folder / "test_a.py").write_text("X = 1\n")
    (folder / "helpers.py").write_text("Y = 2\n")
    (folder / "test_b.py").write_text("import helpers\nfrom conftest import photo\n")
    (folder / "test_c.py").write_text("from test_a import X\n")
    (folder / "test_d.py").write_text("def f():\n    import test_a\n")
    (folder / "test_e.py").write_text("from tests import test_a\nfrom tests.conftest import photo\n")
    assert offending_imports(folder) == [
        "test_c.py:1 imports the test module test_a",
        "test_d.py:2 imports the test module test_a",
        "test_e.py:1 imports the test module tests.test_a",
        "test_e.py:2 imports tests.conftest (a second copy of conftest; use `conftest`)",
    ]


def test_the_in_process_cli_shows_what_a_process_would(tmp_path, monkeypatch):
    """``xpsr_here``: the exit code and the one Error line of a user error; the traceback of an exception the command
    lets through (a process prints it), and the test process's folder and environment as they were."""
    from conftest import assert_one_line_error, xpsr_here
    from stages import cli, shard  # noqa: F401 (importing the CLI quiets third-party libraries: once, not per command)

    cwd, environ = os.getcwd(), dict(os.environ)
    refused = xpsr_here("shard", "missing-folder", "--out", "out", "--set", "crop_sise=32", cwd=tmp_path)
    assert_one_line_error(refused, "crop_sise")

    def broken(config):
        os.environ["XPSR_SET_BY_THE_COMMAND"] = "1"
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(shard, "run", broken)
    (tmp_path / "photos").mkdir()
    crashed = xpsr_here("shard", "photos", "--out", "out", cwd=tmp_path)
    assert crashed.code not in (0, None)
    assert "Traceback" in crashed.stderr and "RuntimeError: a bug, not a user error" in crashed.stderr
    assert os.getcwd() == cwd and dict(os.environ) == environ
