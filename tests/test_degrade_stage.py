"""The degrade stage: pair shards with recorded parameters, deterministic and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import output_bytes
from stages import degrade as degrade_stage
from xpsr_core.errors import UserError
from xpsr_core.io.images import decode_png
from xpsr_core.io.shards import read_shard, read_sizes


def degrade(hr: Path, out: Path, **changes) -> dict:
    values = dict(input_dir=hr, out=out, batch_size=2, workers=1)
    values.update(changes)
    return degrade_stage.run(degrade_stage.DegradeConfig(**values))


def test_pairs_have_lr_hr_and_parameters(hr_shards, tmp_path):
    out = tmp_path / "pairs"
    report = degrade(hr_shards, out)
    assert report["samples"] == 6 and report["failed"] == 0
    assert read_sizes(out) == read_sizes(hr_shards)
    hr_samples = {s["__key__"]: s for p in sorted(hr_shards.glob("*.tar")) for s in read_shard(p)}
    pairs = [s for p in sorted(out.glob("*.tar")) for s in read_shard(p)]
    assert [p["__key__"] for p in pairs] == sorted(hr_samples)
    for pair in pairs:
        hr, lr = decode_png(pair["hr.png"]), decode_png(pair["lr.png"])
        assert hr.shape == (96, 96, 3) and lr.shape == (24, 24, 3) and lr.dtype == np.uint8
        meta = json.loads(pair["json"])
        source_meta = json.loads(hr_samples[pair["__key__"]]["json"])
        assert {k: meta[k] for k in source_meta} == source_meta, "HR metadata is carried over"
        assert meta["scale"] == 4 and meta["usm_hr"] is True and meta["degradation"]
        # USM sharpening changes the HR target but keeps it close to the source crop
        source = decode_png(hr_samples[pair["__key__"]]["png"]).astype(int)
        assert not np.array_equal(hr, source) and np.abs(hr.astype(int) - source).mean() < 20
    index = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    assert (index["status"] == "ok").all() and len(index) == 6
    assert any(c.startswith("deg.") for c in index.columns), "degradation parameters are columns of the index"


def test_the_callers_torch_thread_count_is_kept(hr_shards, tmp_path):
    """A shard runs on its share of the cores and gives the count back: the bytes of a later stage's float outputs
    (embeddings) depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        degrade(hr_shards, tmp_path / "pairs")  # one worker: every core for its shards
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_no_usm_keeps_hr_as_is(hr_shards, tmp_path):
    out = tmp_path / "plain"
    degrade(hr_shards, out, usm_hr=False)
    hr_samples = {s["__key__"]: s["png"] for p in sorted(hr_shards.glob("*.tar")) for s in read_shard(p)}
    for pair in (s for p in sorted(out.glob("*.tar")) for s in read_shard(p)):
        assert np.array_equal(decode_png(pair["hr.png"]), decode_png(hr_samples[pair["__key__"]]))


def test_deterministic_across_workers_batches_and_interruptions(hr_shards, tmp_path, monkeypatch):
    degrade(hr_shards, tmp_path / "a")
    degrade(hr_shards, tmp_path / "b", workers=2, batch_size=3)
    reference = output_bytes(tmp_path / "a")
    assert output_bytes(tmp_path / "b") == reference

    out = tmp_path / "c"
    real = degrade_stage.degrade_shard
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(degrade_stage, "degrade_shard", crash_on_second)
    with pytest.raises(RuntimeError):
        degrade(hr_shards, out)
    monkeypatch.setattr(degrade_stage, "degrade_shard", real)
    report = degrade(hr_shards, out)
    assert report["shards_skipped"] == 1
    assert output_bytes(out) == reference


def test_seed_changes_lr_and_is_refused_without_overwrite(hr_shards, tmp_path):
    out = tmp_path / "pairs"
    degrade(hr_shards, out)
    first = output_bytes(out)
    with pytest.raises(UserError, match="seed"):
        degrade(hr_shards, out, seed=1)
    degrade(hr_shards, out, seed=1, overwrite=True)
    assert output_bytes(out)["00000.tar"] != first["00000.tar"]


def test_cuda_request_without_gpu_is_a_user_error(hr_shards, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for machines without one")
    with pytest.raises(UserError, match="CUDA"):
        degrade(hr_shards, tmp_path / "gpu", device="cuda")
