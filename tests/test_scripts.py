"""The scripts beside the package (benchmarks/, tools/) run rarely, some only on a GPU machine: the settings they
build must still be the package's. Every keyword of a call to one of our pydantic settings classes is one of its
fields, read with ast (nothing of the scripts runs)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from pydantic import BaseModel

from xpsr_core.import_graph import PACKAGES, module_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "tools") for p in (ROOT / folder).glob("*.py"))


def settings_classes() -> dict[str, type[BaseModel]]:
    """Every pydantic model class the project defines, by class name (the names are unique)."""
    found: dict[str, type[BaseModel]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            module = importlib.import_module(module_name(path, ROOT))
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__:
                    assert found.setdefault(value.__name__, value) is value, f"two classes named {value.__name__}"
    return found


def unknown_keywords(source: Path, classes: dict[str, type[BaseModel]]) -> list[str]:
    """``file.py:line Class(name=...)`` for every keyword that is neither a field nor a field's alias."""
    problems = []
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        cls = classes.get(name)
        if cls is None:
            continue
        known = {key for key, field in cls.model_fields.items() for key in (key, field.alias) if key}
        problems += [f"{source.parent.name}/{source.name}:{node.lineno} {name}({keyword.arg}=...)"
                     for keyword in node.keywords if keyword.arg is not None and keyword.arg not in known]
    return problems


@pytest.fixture(scope="module")
def classes():
    return settings_classes()


def test_the_scripts_name_real_settings(classes):
    assert {"TrainConfig", "CaptionConfig", "EmbedConfig", "SRModelConfig"} <= set(classes)
    problems = [problem for script in SCRIPTS for problem in unknown_keywords(script, classes)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_renamed_setting(classes, tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("from stages import caption\n"
                      "caption.CaptionConfig(input_dir='pairs', model='captioner', captioner='captioner')\n")
    assert unknown_keywords(script, classes) == [f"{tmp_path.name}/bench.py:2 CaptionConfig(model=...)"]
