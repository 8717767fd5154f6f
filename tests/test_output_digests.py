"""tools/output_digests.py: canonical digests of JSON, Parquet and CSV outputs, and the comparison of two runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpsr_core.errors import UserError

REPOSITORY = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("output_digests", REPOSITORY / "tools" / "output_digests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digests = _load_tool()


def _write_json(path: Path, value: object, **dump_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, **dump_options), encoding="utf-8")
    return path


def _write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _fake_outputs(root: Path) -> Path:
    """A few small files for every listed output, shaped like what `dvc repro` writes."""
    for listed in (path for paths in digests.DIGEST_GROUPS.values() for path in paths):
        target = root / listed
        if target.suffix == ".json":
            _write_json(target, {"psnr_y": 21.5, "seconds": 3.2})
        elif target.suffix == ".parquet":
            _write_parquet(target, {"key": ["0", "1"], "psnr_y": [20.1, 22.9]})
        elif target.suffix == ".csv":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("key,psnr_y\n0,20.1\n1,22.9\n", encoding="utf-8")
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "00000.tar").write_bytes(listed.encode() * 8)
            _write_json(target / "00000.stats.json", {"samples": 4, "produced_by": {"code": "1a2b"}})
            _write_json(target / "config.json", {"config_hash": "3c4d"})
    return root


def test_json_digest_ignores_layout_timings_and_fingerprints(tmp_path):
    first = _write_json(tmp_path / "a" / "report.json", {"samples": 24, "seconds": 17.6, "samples_per_s": 1.36})
    second = _write_json(tmp_path / "b" / "report.json", {"samples_per_s": 0.4, "seconds": 60.0, "samples": 24},
                         indent=2)
    changed = _write_json(tmp_path / "c" / "report.json", {"samples": 23, "seconds": 17.6})
    assert digests.file_digest(first) == digests.file_digest(second)
    assert digests.file_digest(first) != digests.file_digest(changed)

    marker = _write_json(tmp_path / "a" / "00000.stats.json", {"samples": 4, "produced_by": {"code": "1a2b"}})
    other_code = _write_json(tmp_path / "b" / "00000.stats.json", {"samples": 4, "produced_by": {"code": "9f8e"}})
    assert digests.file_digest(marker) == digests.file_digest(other_code)


def test_parquet_digest_is_of_the_content_without_timing_columns(tmp_path):
    rows = {"key": ["0", "1", "2"], "blur": [0.5, None, 1.25], "source_bytes": [b"a.png", b"b.png", b"\xff"]}
    reference = _write_parquet(tmp_path / "reference.parquet", rows)
    regrouped = _write_parquet(tmp_path / "regrouped.parquet", rows, row_group_size=1)
    timed = _write_parquet(tmp_path / "timed.parquet", {**rows, "seconds": [0.1, 0.2, 0.3]})
    changed = _write_parquet(tmp_path / "changed.parquet", {**rows, "blur": [0.5, None, 1.2500001]})
    assert reference.read_bytes() != regrouped.read_bytes()
    assert digests.file_digest(reference) == digests.file_digest(regrouped) == digests.file_digest(timed)
    assert digests.file_digest(reference) != digests.file_digest(changed)


def test_csv_digest_drops_timing_columns(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("key,psnr_y\n0,20.1\n", encoding="utf-8")
    timed = tmp_path / "timed.csv"
    timed.write_text("key,seconds,psnr_y\n0,4.5,20.1\n", encoding="utf-8")
    changed = tmp_path / "changed.csv"
    changed.write_text("key,psnr_y\n0,20.2\n", encoding="utf-8")
    assert digests.file_digest(plain) == digests.file_digest(timed) != digests.file_digest(changed)


def test_other_files_are_hashed_byte_for_byte(tmp_path):
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00\x01weights" * 100_000)
    assert digests.file_digest(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_collect_groups_by_stage_and_leaves_out_output_configs(tmp_path):
    root = _fake_outputs(tmp_path)
    nested_config = _write_json(root / "models/xpsr/final/controlnet/config.json", {"block_out_channels": [32, 64]})
    collected = digests.collect_digests(root)
    assert set(collected) == set(digests.DIGEST_GROUPS)
    assert "data/shards/hr/00000.tar" in collected["shard"]
    assert "data/shards/hr/00000.stats.json" in collected["shard"]
    assert "data/shards/hr/config.json" not in collected["shard"]
    assert nested_config.relative_to(root).as_posix() in collected["train"]
    assert set(collected["evaluate"]) == set(digests.DIGEST_GROUPS["evaluate"])
    assert "evaluate" not in digests.collect_digests(root, frozenset({"evaluate"}))


def test_compare_lists_differing_missing_and_new_files(tmp_path, capsys):
    root = _fake_outputs(tmp_path / "run")
    reference = tmp_path / "digests.json"
    assert digests.main([str(root), "--out", str(reference)]) == 0
    assert digests.main([str(root), "--compare", str(reference)]) == 0
    assert "match" in capsys.readouterr().out

    # a new timing and fingerprint alone change nothing
    _write_json(root / "data/shards/pairs/00000.stats.json", {"samples": 4, "produced_by": {"code": "ffff"}})
    _write_json(root / "data/shards/pairs/config.json", {"config_hash": "eeee"})
    _write_json(root / "metrics/eval/metrics.json", {"psnr_y": 21.5, "seconds": 99.0})
    assert digests.main([str(root), "--compare", str(reference)]) == 0
    capsys.readouterr()

    (root / "data/shards/train/00000.tar").write_bytes(b"other samples")
    (root / "manifests/captions/00000.stats.json").unlink()
    (root / "models/xpsr/final/extra.safetensors").write_bytes(b"new part")
    _write_json(root / "metrics/eval/metrics.json", {"psnr_y": 19.0})
    assert digests.main([str(root), "--compare", str(reference)]) == 1
    report = capsys.readouterr().out.splitlines()
    assert report[:-1] == [
        "caption: manifests/captions/00000.stats.json missing",
        "embed: data/shards/train/00000.tar differs",
        "evaluate: metrics/eval/metrics.json differs",
        "train: models/xpsr/final/extra.safetensors new",
    ]
    assert report[-1].startswith("4 difference(s)")

    (root / "metrics/eval/metrics.json").unlink()
    assert digests.main([str(root), "--compare", str(reference), "--skip", "evaluate"]) == 1
    assert "evaluate" not in capsys.readouterr().out


def test_missing_outputs_and_bad_reference_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="data/shards/hr is missing .*dvc repro"):
        digests.collect_digests(tmp_path)
    with pytest.raises(UserError, match="unknown group"):
        digests.collect_digests(tmp_path, frozenset({"sr"}))
    root = _fake_outputs(tmp_path / "run")
    not_digests = _write_json(tmp_path / "other.json", ["not", "digests"])
    assert digests.main([str(root), "--compare", str(not_digests)]) == 2
    assert "not a digest file" in capsys.readouterr().err


def test_recorded_default_digests_cover_every_group():
    recorded = json.loads((REPOSITORY / "tests/fixtures/default_digests.json").read_text(encoding="utf-8"))
    assert set(recorded) == set(digests.DIGEST_GROUPS)
    for group, files in recorded.items():
        assert files, group
        assert all(re.fullmatch("[0-9a-f]{64}", digest) for digest in files.values())
        assert all(path.startswith(digests.DIGEST_GROUPS[group]) for path in files)
