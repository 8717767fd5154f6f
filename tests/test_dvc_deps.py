"""dvc.yaml's deps hold every project source file each stage's command can load, so `dvc repro` never keeps stale
outputs; the code fingerprints hash the same files.

Both come from one import graph (`xpsr_core/import_graph.py`): every import (module level or inside a function,
absolute or relative) of the stage's module, followed through the project's own modules. `tools/dvc_deps.py`
writes dvc.yaml's deps from it. The CLI (`stages/cli.py`) only maps options onto the stage config, which DVC
tracks through params, so it is not a dependency of any stage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from xpsr_core import fingerprint
from xpsr_core.import_graph import loaded_files, stage_module

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "dvc_deps.py"


def test_dvc_yaml_deps_are_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_the_generator_rewrites_only_source_deps(tmp_path):
    original = (ROOT / "dvc.yaml").read_text()
    stale = original.replace("      - xpsr_core/crops.py\n", "", 1).replace("stages:\n", "stages:  # mine\n", 1)
    stale = stale.replace("      - xpsr_core/io/shards.py\n", "      - xpsr_core/gone.py\n", 1)
    (tmp_path / "dvc.yaml").write_text(stale)
    for part in ("xpsr_core", "stages"):
        (tmp_path / part).symlink_to(ROOT / part)
    check = subprocess.run([sys.executable, str(TOOL), "--check", "--root", str(tmp_path)], capture_output=True,
                           text=True)
    assert check.returncode == 1 and "-      - xpsr_core/gone.py" in check.stdout
    assert (tmp_path / "dvc.yaml").read_text() == stale
    subprocess.run([sys.executable, str(TOOL), "--root", str(tmp_path)], check=True)
    assert (tmp_path / "dvc.yaml").read_text() == original.replace("stages:\n", "stages:  # mine\n", 1)


def test_every_dvc_stage_lists_its_stage_module_and_data():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = stage["cmd"].split()[1]
        assert f"stages/{command.replace('-', '_')}.py" in stage["deps"], name
        assert "stages/cli.py" not in stage["deps"], name
    assert "data/shards/train" in stages["train"]["deps"] and "models/tiny" in stages["train"]["deps"]


def test_the_import_walk_sees_function_local_and_relative_imports():
    files = loaded_files("stages.evaluate", ROOT)
    assert "xpsr_core/evaluation/compare.py" in files  # imported inside run()
    assert "xpsr_core/evaluation/baselines.py" in files  # imported relatively inside a function of compare.py
    assert "xpsr_core/__init__.py" in files and "stages/cli.py" not in files
    assert "xpsr_core/degrade/pipeline.py" not in loaded_files("stages.shard", ROOT)


def test_the_code_fingerprint_hashes_every_file_the_stage_loads():
    for stage in ("shard", "degrade", "train", "sr", "evaluate", "testset_synthetic", "import_official"):
        assert fingerprint.stage_files(stage) == loaded_files(stage_module(stage), ROOT)
        assert set(fingerprint.stage_fingerprint(stage)["sources"]) == set(fingerprint.stage_files(stage))
