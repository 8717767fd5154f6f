#!/usr/bin/env python
"""Write the source files of dvc.yaml's deps from the stages' imports (the files their code fingerprints hash).

For each dvc.yaml stage ``xpsr COMMAND ...`` the project files that ``stages/COMMAND.py`` can load
(``xpsr_core.import_graph.loaded_files``) replace the stage's ``xpsr_core/`` and ``stages/`` deps; its other deps
(data, models) and every other line of dvc.yaml stay as they are, byte for byte.

    python tools/dvc_deps.py            # rewrite dvc.yaml
    python tools/dvc_deps.py --check    # exit 1 and show the difference when dvc.yaml is not up to date
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xpsr_core.import_graph import PACKAGES, loaded_files, stage_module  # noqa: E402

_STAGE = re.compile(r"^  ([A-Za-z0-9_-]+):\s*$")
_DEPS = re.compile(r"^    deps:\s*$")
_ENTRY = re.compile(r"^      - (.+?)\s*$")


def is_source(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def stage_sources(cmd: str, root: Path) -> list[str]:
    words = cmd.split()
    if len(words) < 2 or words[0] != "xpsr":
        raise SystemExit(f"dvc.yaml: {cmd!r} is not an xpsr command")
    return loaded_files(stage_module(words[1]), root)


def generated(text: str, root: Path) -> str:
    """dvc.yaml's text with each stage's source deps replaced by the files its command loads."""
    commands = {name: stage["cmd"] for name, stage in yaml.safe_load(text)["stages"].items()}
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage, in_deps, written = None, False, False
    for line in lines:
        header = _STAGE.match(line)
        if header:
            stage, in_deps = header.group(1), False
        elif _DEPS.match(line) and stage in commands:
            in_deps, written = True, False
        elif in_deps:
            entry = _ENTRY.match(line)
            if entry is None:
                in_deps = False
            elif is_source(entry.group(1)):
                if not written:
                    out.extend(f"      - {file}\n" for file in stage_sources(commands[stage], root))
                    written = True
                continue
        out.append(line)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 when dvc.yaml differs.")
    parser.add_argument("--root", type=Path, default=ROOT, help="Repository root (holds dvc.yaml).")
    args = parser.parse_args(argv)
    path = args.root / "dvc.yaml"
    text = path.read_text()
    new = generated(text, args.root)
    if new == text:
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                                   "dvc.yaml", "dvc.yaml (from the imports)"))
        print("dvc.yaml's deps differ from the stages' imports: run python tools/dvc_deps.py", file=sys.stderr)
        return 1
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
