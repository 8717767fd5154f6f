"""The shard stage: bad inputs become rows, outputs are deterministic and resumable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BAD_CORPUS_EXPECTED, output_bytes
from stages import shard as shard_stage
from xpsr_core.errors import FailureRatioExceeded, UserError
from xpsr_core.io.atomic import HOST
from xpsr_core.io.images import decode_png
from xpsr_core.io.shards import read_shard, read_sizes


def make_config(inputs, out: Path, **changes) -> shard_stage.ShardConfig:
    values = dict(
        inputs=[{"path": str(p), "dataset": name} for name, p in inputs.items()],
        out=out, crop_size=48, crops_per_image=2, images_per_shard=2, min_size=8, workers=1,
    )
    values.update(changes)
    return shard_stage.ShardConfig(**values)


def index_rows(folder: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)


def test_every_bad_input_gets_its_row_and_status(bad_corpus, tmp_path):
    config = make_config({"bad": bad_corpus}, tmp_path / "out", max_failure_ratio=1.0, crops_per_image=1)
    report = shard_stage.run(config)
    rows = index_rows(tmp_path / "out").set_index("source")
    assert sorted(rows.index) == sorted(BAD_CORPUS_EXPECTED)
    for name, (status, size) in BAD_CORPUS_EXPECTED.items():
        row = rows.loc[name]
        assert row["status"] == status, (name, row["error"])
        if status == "ok":
            assert (row["width"], row["height"]) == size, name
            assert row["crops"] == 1
        else:
            assert row["error"], f"{name} failed without an error message"
            assert row["crops"] == 0
    failures = sum(1 for s, _ in BAD_CORPUS_EXPECTED.values() if s != "ok")
    assert report["failed"] == failures
    assert report["inputs"] == len(BAD_CORPUS_EXPECTED)
    assert report["status_counts"]["ok"] == len(BAD_CORPUS_EXPECTED) - failures


def test_mode_conversions_are_the_documented_ones(bad_corpus, tmp_path):
    from xpsr_core.io.images import load_image

    rgba = load_image(bad_corpus / "rgba.png", 10**8).pixels
    assert (rgba[:, :36] == 255).all(), "transparent pixels must be composited over white"
    gray16 = load_image(bad_corpus / "sixteen_bit.png", 10**8).pixels
    gray8 = load_image(bad_corpus / "grayscale.png", 10**8).pixels
    assert gray16.dtype == np.uint8 and np.array_equal(gray16, gray8), "16-bit values scale to 8 bits by v / 257"
    assert (gray16[..., 0] == gray16[..., 2]).all()
    rotated = load_image(bad_corpus / "exif_rotated.jpg", 10**8)
    assert rotated.exif_transposed and rotated.pixels.shape == (96, 64, 3)


def test_failure_ratio_threshold_fails_the_run_but_keeps_shards(bad_corpus, tmp_path):
    config = make_config({"bad": bad_corpus}, tmp_path / "out", max_failure_ratio=0.1)
    with pytest.raises(FailureRatioExceeded, match="failed"):
        shard_stage.run(config)
    assert read_sizes(tmp_path / "out"), "shards that worked must be kept"


def test_crops_keys_and_metadata(photo_dir, tmp_path):
    out = tmp_path / "out"
    report = shard_stage.run(make_config({"photos": photo_dir}, out))
    assert report["samples"] == 12 and report["failed"] == 0
    sizes = read_sizes(out)
    assert sizes == {0: 4, 1: 4, 2: 4}
    samples = [s for shard in sorted(sizes) for s in read_shard(out / f"{shard:05d}.tar")]
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == 12 and all("." not in k and len(k) == 10 for k in keys)
    for sample in samples:
        meta = json.loads(sample["json"])
        crop = decode_png(sample["png"])
        assert crop.shape == (48, 48, 3)
        left, top, right, bottom = meta["crop_box"]
        assert right - left == 48 and bottom - top == 48
        assert meta["dataset"] == "photos" and meta["source"].endswith(".png")
        # the crop is exactly the source pixels at its box (flipped when recorded so)
        source = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(photo_dir / meta["source"]).convert("RGB"))
        expected = source[top:bottom, left:right]
        assert np.array_equal(crop, expected[:, ::-1] if meta["hflip"] else expected)


def test_grid_mode_and_padding(photo_dir, tmp_path):
    out = tmp_path / "grid"
    shard_stage.run(make_config({"photos": photo_dir}, out, crop_mode="grid", crop_size=40, hflip=False))
    rows = index_rows(out).set_index("source")
    for source, row in rows.iterrows():
        assert row["crops"] == (row["height"] // 40) * (row["width"] // 40)
    padded_out = tmp_path / "padded"
    shard_stage.run(make_config({"photos": photo_dir}, padded_out, crop_size=128, crops_per_image=1))
    samples = [s for p in sorted(padded_out.glob("*.tar")) for s in read_shard(p)]
    meta = [json.loads(s["json"]) for s in samples]
    assert all(m["padded"] for m in meta) and all(decode_png(s["png"]).shape == (128, 128, 3) for s in samples)
    assert all(m["crop_box"][1] < 0 for m in meta), "padded crops extend above the source (all heights < 128)"
    skipped_out = tmp_path / "skipped"
    with pytest.raises(FailureRatioExceeded):
        shard_stage.run(make_config({"photos": photo_dir}, skipped_out, crop_size=128, small_images="skip"))
    assert set(index_rows(skipped_out)["status"]) == {"too_small"}


def test_one_and_two_workers_give_identical_bytes(photo_dir, tmp_path):
    shard_stage.run(make_config({"photos": photo_dir}, tmp_path / "one", workers=1))
    shard_stage.run(make_config({"photos": photo_dir}, tmp_path / "two", workers=2))
    one, two = output_bytes(tmp_path / "one"), output_bytes(tmp_path / "two")
    assert len(one) == 3 * 3 + 1 and one == two


def _finished_pid() -> int:
    """The pid of a process that has exited (a crashed writer)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_live_writers_are_kept(tmp_path):
    from xpsr_core.io.atomic import remove_temporaries

    (tmp_path / f"00000.tar.tmp-{HOST}-{_finished_pid()}").write_bytes(b"dead writer")
    live = tmp_path / f"00001.tar.tmp-{HOST}-{__import__('os').getpid()}"
    live.write_bytes(b"another rank still writing")
    assert remove_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_interrupted_run_resumes_to_identical_bytes(photo_dir, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    shard_stage.run(make_config({"photos": photo_dir}, reference))

    out = tmp_path / "interrupted"
    real_build = shard_stage.build_shard
    dead_pid = _finished_pid()
    calls = {"n": 0}

    def crash_after_one(config, folder, items, shard):
        calls["n"] += 1
        if calls["n"] == 2:
            # die mid-shard: a half-written tar is left behind under a temporary name
            (folder / f"{shard:05d}.tar.tmp-{HOST}-{dead_pid}").write_bytes(b"partial")
            raise RuntimeError("simulated crash")
        return real_build(config, folder, items, shard)

    monkeypatch.setattr(shard_stage, "build_shard", crash_after_one)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard_stage.run(make_config({"photos": photo_dir}, out))
    assert not (out / "sizes.json").exists()
    monkeypatch.setattr(shard_stage, "build_shard", real_build)
    report = shard_stage.run(make_config({"photos": photo_dir}, out))
    assert report["shards_skipped"] == 1 and report["shards_processed"] == 2
    assert not list(out.glob("*.tmp-*"))
    assert output_bytes(out) == output_bytes(reference)


def test_tar_without_stats_is_rebuilt(photo_dir, tmp_path):
    out = tmp_path / "out"
    shard_stage.run(make_config({"photos": photo_dir}, out))
    reference = output_bytes(out)
    (out / "00001.stats.json").unlink()
    (out / "00001.tar").write_bytes(b"garbage from a crash")
    report = shard_stage.run(make_config({"photos": photo_dir}, out))
    assert report["shards_processed"] == 1
    assert output_bytes(out) == reference


def test_changed_config_is_refused_unless_overwrite(photo_dir, tmp_path):
    out = tmp_path / "out"
    shard_stage.run(make_config({"photos": photo_dir}, out))
    with pytest.raises(UserError, match="crop_size"):
        shard_stage.run(make_config({"photos": photo_dir}, out, crop_size=32))
    report = shard_stage.run(make_config({"photos": photo_dir}, out, crop_size=32, overwrite=True))
    assert report["shards_processed"] == 3
    assert decode_png(next(read_shard(out / "00000.tar"))["png"]).shape == (32, 32, 3)
    # runtime settings (workers) do not count as a different config
    assert shard_stage.run(make_config({"photos": photo_dir}, out, crop_size=32, workers=2))["shards_processed"] == 0


def test_rank_sharding_splits_work_without_overlap(photo_dir, tmp_path, monkeypatch):
    out = tmp_path / "ranked"
    reports = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        reports.append(shard_stage.run(make_config({"photos": photo_dir}, out)))
    assert [r["shards"] for r in reports] == [2, 1]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    single = tmp_path / "single"
    shard_stage.run(make_config({"photos": photo_dir}, single))
    assert output_bytes(out) == output_bytes(single)


def test_input_limit_takes_the_first_files_in_sorted_order(photo_dir, tmp_path):
    config = make_config({"photos": photo_dir}, tmp_path / "out")
    config.inputs[0].limit = 3
    shard_stage.run(config)
    sources = list(index_rows(tmp_path / "out")["source"])
    assert sources == ["astronaut.png", "camera.png", "chelsea.png"]


def test_other_ranks_wait_for_rank_zero_to_prepare_the_folder(photo_dir, tmp_path, monkeypatch):
    from xpsr_core.io.outputs import prepare_output_dir

    config = make_config({"photos": photo_dir}, tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match="waited"):
        prepare_output_dir(tmp_path / "out", "shard", config, wait_seconds=0.5)
    assert not (tmp_path / "out" / "config.json").exists(), "rank 1 never writes the record"
    monkeypatch.setenv("RANK", "0")
    prepare_output_dir(tmp_path / "out", "shard", config)
    monkeypatch.setenv("RANK", "1")
    assert prepare_output_dir(tmp_path / "out", "shard", config, wait_seconds=0.5) == tmp_path / "out"
