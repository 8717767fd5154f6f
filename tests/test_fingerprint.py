"""Code fingerprints: done shards are reused only when the config hash and the code that made them match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import output_bytes
from stages import degrade as degrade_stage
from xpsr_core import fingerprint
from xpsr_core.errors import UserError
from xpsr_core.io.shards import read_shard


def degrade(hr: Path, out: Path, **changes) -> dict:
    return degrade_stage.run(degrade_stage.DegradeConfig(input_dir=hr, out=out, batch_size=2, workers=1, **changes))


def lr_bytes(out: Path) -> list[bytes]:
    return [s["lr.png"] for tar in sorted(out.glob("*.tar")) for s in read_shard(tar)]


def test_fingerprint_is_deterministic_and_covers_the_stage_sources():
    first, second = fingerprint.stage_fingerprint("degrade"), fingerprint.stage_fingerprint("degrade")
    assert first == second
    assert "xpsr_core/degrade/pipeline.py" in first["sources"] and "stages/degrade.py" in first["sources"]
    assert "stages/common.py" in first["sources"]
    assert {"torch", "basicsr", "numpy"} <= set(first["libraries"])
    assert "xpsr_core/degrade/pipeline.py" not in fingerprint.stage_fingerprint("shard")["sources"]


def test_changed_library_rebuilds_under_overwrite_and_is_refused_without(hr_shards, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    first = degrade(hr_shards, out)
    assert first["shards_processed"] == 3
    before = lr_bytes(out)
    # an unchanged rerun rebuilds nothing
    assert degrade(hr_shards, out)["shards_processed"] == 0
    record = json.loads((out / "config.json").read_text())
    assert record["fingerprint"]["code"] == json.loads((out / "00000.stats.json").read_text())["produced_by"]["code"]

    # "a new basicsr" whose degradation differs: the fingerprint covers its version
    real_versions = fingerprint.library_versions
    monkeypatch.setattr(fingerprint, "library_versions", lambda stage: {**real_versions(stage), "basicsr": "99.0"})
    import xpsr_core.degrade.pipeline as degrade_lib

    real_batch = degrade_lib.degrade_batch

    def darker(hr, params, settings, usm_hr=True):
        target, lr = real_batch(hr, params, settings, usm_hr=usm_hr)
        return target, lr * 0.5

    monkeypatch.setattr(degrade_lib, "degrade_batch", darker)
    with pytest.raises(UserError, match=r"basicsr .* -> 99\.0"):
        degrade(hr_shards, out)
    report = degrade(hr_shards, out, overwrite=True)
    assert report["shards_processed"] == 3 and report["shards_skipped"] == 0
    assert lr_bytes(out) != before
    assert degrade(hr_shards, out)["shards_processed"] == 0


def test_one_changed_source_line_rebuilds(hr_shards, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    degrade(hr_shards, out)
    reference = output_bytes(out)
    copy = tmp_path / "src"
    for part in ("stages", "xpsr_core"):
        shutil.copytree(
            Path(fingerprint.PROJECT_ROOT) / part, copy / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    pipeline = copy / "xpsr_core" / "degrade" / "pipeline.py"
    pipeline.write_text(pipeline.read_text() + "\n# one changed line\n")
    monkeypatch.setattr(fingerprint, "PROJECT_ROOT", copy)
    with pytest.raises(UserError, match="xpsr_core/degrade/pipeline.py"):
        degrade(hr_shards, out)
    report = degrade(hr_shards, out, overwrite=True)
    assert report["shards_processed"] == 3
    # same behaviour, same bytes, but the markers name the new code
    assert {k: v for k, v in output_bytes(out).items() if not k.endswith("stats.json")} == \
        {k: v for k, v in reference.items() if not k.endswith("stats.json")}
    # a change to code the stage does not use changes nothing
    other = copy / "xpsr_core" / "caption" / "captioner.py"
    other.write_text(other.read_text() + "\n# unrelated\n")
    assert degrade(hr_shards, out)["shards_processed"] == 0


def test_a_marker_of_other_code_is_not_reused(hr_shards, tmp_path):
    out = tmp_path / "pairs"
    degrade(hr_shards, out)
    reference = output_bytes(out)
    stats = out / "00001.stats.json"
    marker = json.loads(stats.read_text())
    marker["produced_by"]["code"] = "0" * 16
    stats.write_text(json.dumps(marker))
    report = degrade(hr_shards, out)
    assert report["shards_processed"] == 1 and report["shards_skipped"] == 2
    assert output_bytes(out) == reference


def test_dvc_yaml_deps_cover_every_fingerprinted_source():
    import yaml

    stages = yaml.safe_load((Path(fingerprint.PROJECT_ROOT) / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        sources = fingerprint.stage_files(stage["cmd"].split()[1])
        missing = [s for s in sources if s not in stage.get("deps", [])]
        assert not missing, f"dvc.yaml stage {name} lacks deps {missing}"
