"""Test sets as pair shards: synthetic crops (deterministic, resumable), real pairs (matched, centred, refused)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import output_bytes, photo
from stages import testset as testset_stage
from stages.cli import app
from xpsr_core.degrade.settings import DegradationSettings
from xpsr_core.errors import UserError
from xpsr_core.io.images import decode_png
from xpsr_core.io.outputs import read_record
from xpsr_core.io.shards import read_shard, read_sizes, stats_path, tar_path
from xpsr_core.testsets import build_paired_testset, build_synthetic_testset, stem_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# small kernels, so that 64 px crops can take every draw (min_hr_size 40)
TINY_DEGRADATION = {"kernel_sizes": [7, 9, 11]}
HR_SIZE = 64
SCALE = 4


def read_pairs(folder: Path) -> list[dict]:
    """The samples in shard order, decoded as `xpsr evaluate --pairs` reads them (sizes.json, then each tar)."""
    pairs = []
    for shard in sorted(read_sizes(folder)):
        for sample in read_shard(tar_path(folder, shard)):
            pairs.append({"key": sample["__key__"], "lr": decode_png(sample["lr.png"]),
                          "hr": decode_png(sample["hr.png"]), "meta": json.loads(sample["json"])})
    return pairs


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory) -> Path:
    """Two photographs above the crop size, one under it (padded), an undecodable file and a non-image."""
    root = tmp_path_factory.mktemp("div2k_val")
    (root / "sub").mkdir()
    Image.fromarray(photo("astronaut", (100, 90))).save(root / "a_astronaut.png")
    Image.fromarray(photo("coffee", (120, 80))).save(root / "sub" / "b_coffee.png")
    Image.fromarray(photo("chelsea", (70, 50))).save(root / "c_chelsea.png")
    (root / "d_broken.png").write_text("not an image")
    (root / "notes.txt").write_text("a file that is not an input")
    return root


def synthetic(hr_folder: Path, out: Path, **changes) -> dict:
    values = dict(hr_dirs=[hr_folder], out=out, count=7, hr_size=HR_SIZE, samples_per_shard=3, seed=3,
                  settings=DegradationSettings(**TINY_DEGRADATION), batch_size=2)
    values.update(changes)
    return build_synthetic_testset(**values)


def test_synthetic_pairs_sizes_sources_and_parameters(hr_folder, tmp_path):
    report = synthetic(hr_folder, tmp_path / "set")
    assert report["samples"] == 7 and report["shards"] == 3 and report["images_used"] == 3
    assert report["failures"] == {"decode_error": 1} and report["failed_files"][0]["source"] == "d_broken.png"
    assert report["images_padded"] == 1 and report["skipped_paths"] == {"unsupported_extension": 1}
    assert read_sizes(tmp_path / "set") == {0: 3, 1: 3, 2: 1}
    pairs = read_pairs(tmp_path / "set")
    assert [p["key"] for p in pairs] == [f"{i:07d}" for i in range(7)]
    usable = ["a_astronaut.png", "c_chelsea.png", "sub/b_coffee.png"]  # sorted relative paths
    for index, pair in enumerate(pairs):
        assert pair["hr"].shape == (HR_SIZE, HR_SIZE, 3) and pair["lr"].shape == (HR_SIZE // SCALE, HR_SIZE // SCALE, 3)
        meta = pair["meta"]
        assert meta["source"] == usable[index % 3], "crop i comes from usable image i mod n"
        assert meta["padded"] == (meta["source"] == "c_chelsea.png")
        assert meta["usm_hr"] is True and meta["scale"] == SCALE
        assert meta["degradation"]["hr_size"] == HR_SIZE and "stage1_noise_type" in meta["degradation"]
    index = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "set").glob("*.parquet"))])
    assert len(index) == 7 and (index["status"] == "ok").all() and "deg.final_order" in index.columns
    assert len({p["meta"]["crop_box"][0] for p in pairs if p["meta"]["source"] == "a_astronaut.png"}) > 1, (
        "each crop draws its own position")


def test_synthetic_is_byte_identical_and_the_seed_matters(hr_folder, tmp_path):
    synthetic(hr_folder, tmp_path / "a")
    synthetic(hr_folder, tmp_path / "b", batch_size=3)
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")
    synthetic(hr_folder, tmp_path / "c", seed=4)
    assert output_bytes(tmp_path / "c")["00000.tar"] != output_bytes(tmp_path / "a")["00000.tar"]


def test_synthetic_hr_is_the_recorded_crop_without_usm(hr_folder, tmp_path):
    synthetic(hr_folder, tmp_path / "plain", count=4, usm_hr=False)
    unpadded = [pair for pair in read_pairs(tmp_path / "plain") if not pair["meta"]["padded"]]
    assert len(unpadded) == 3
    for pair in unpadded:
        meta = pair["meta"]
        left, top, right, bottom = meta["crop_box"]
        source = np.asarray(Image.open(hr_folder / meta["source"]).convert("RGB"))[top:bottom, left:right]
        assert np.array_equal(pair["hr"], source[:, ::-1] if meta["hflip"] else source)


def test_synthetic_skip_mode_and_bad_sizes(hr_folder, tmp_path):
    report = synthetic(hr_folder, tmp_path / "skip", count=4, small_images="skip")
    assert report["failures"] == {"decode_error": 1, "too_small": 1} and report["images_used"] == 2
    assert {p["meta"]["source"] for p in read_pairs(tmp_path / "skip")} == {"a_astronaut.png", "sub/b_coffee.png"}
    with pytest.raises(UserError, match="divisible by the scale 4"):
        synthetic(hr_folder, tmp_path / "odd", hr_size=62)
    with pytest.raises(UserError, match="at least 40 px"):
        synthetic(hr_folder, tmp_path / "small", hr_size=36)
    with pytest.raises(UserError, match="does not exist"):
        synthetic(hr_folder, tmp_path / "none", hr_dirs=[tmp_path / "nowhere"])
    assert not (tmp_path / "odd").exists(), "nothing is written for a refused config"
    (tmp_path / "unusable").mkdir()
    (tmp_path / "unusable" / "broken.png").write_text("not an image")
    with pytest.raises(UserError, match=r"None of the 1 images .* \(decode_error: 1\): broken.png"):
        synthetic(hr_folder, tmp_path / "none", hr_dirs=[tmp_path / "unusable"])


def test_synthetic_stage_records_config_and_resumes(hr_folder, tmp_path):
    config = testset_stage.SyntheticTestsetConfig(hr_dirs=[hr_folder], out=tmp_path / "stage", count=7, hr_size=HR_SIZE,
                                                  samples_per_shard=3, seed=3, degradation=TINY_DEGRADATION)
    testset_stage.run_synthetic(config)
    assert read_record(tmp_path / "stage")["stage"] == "testset_synthetic"
    reference = output_bytes(tmp_path / "stage")
    stats_path(tmp_path / "stage", 1).unlink()  # an interrupted shard: its tar may be there, its marker is not
    report = testset_stage.run_synthetic(config)
    assert report["shards_processed"] == 1 and report["shards_skipped"] == 2
    assert json.loads((tmp_path / "stage" / "report.json").read_text())["shards_processed"] == 1
    assert output_bytes(tmp_path / "stage") == reference
    with pytest.raises(UserError, match="seed"):
        testset_stage.run_synthetic(config.model_copy(update={"seed": 4}))


# ---------------------------------------------------------------------------- paired


def save_pair(lr_root: Path, hr_root: Path, lr_name: str, hr_name: str, hr: np.ndarray,
              lr: np.ndarray | None = None) -> None:
    """HR as given; LR its exact x4 box downscale unless given."""
    for root, name in ((lr_root, lr_name), (hr_root, hr_name)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hr).save(hr_root / hr_name)
    Image.fromarray(lr if lr is not None else np.asarray(Image.fromarray(hr).reduce(SCALE))).save(lr_root / lr_name)


@pytest.fixture
def pair_folders(tmp_path) -> tuple[Path, Path]:
    """Good pairs (RealSR-style names, a nested name with a dot), an unmatched LR, an odd-sized HR, a too-small pair."""
    lr_root, hr_root = tmp_path / "LR", tmp_path / "HR"
    lr_root.mkdir(), hr_root.mkdir()
    save_pair(lr_root, hr_root, "Canon_001_LR4.png", "Canon_001_HR.png", photo("astronaut", (96, 88)))
    save_pair(lr_root, hr_root, "sub/rocket.v2_LR4.png", "sub/rocket.v2_HR.png", photo("rocket", (100, 72)))
    Image.fromarray(photo("coffee", (24, 20))).save(lr_root / "orphan_LR4.png")
    save_pair(lr_root, hr_root, "odd_LR4.png", "odd_HR.png", photo("chelsea", (90, 70)), lr=photo("chelsea", (24, 20)))
    save_pair(lr_root, hr_root, "tiny_LR4.png", "tiny_HR.png", photo("camera", (48, 48)))
    return lr_root, hr_root


def paired(folders: tuple[Path, Path], out: Path, **changes) -> dict:
    values = dict(lr_dir=folders[0], hr_dir=folders[1], out=out, lr_size=16, scale=SCALE, lr_suffix="_LR4",
                  hr_suffix="_HR")
    values.update(changes)
    return build_paired_testset(**values)


def test_paired_refuses_with_every_problem_listed(pair_folders, tmp_path):
    with pytest.raises(UserError) as refused:
        paired(pair_folders, tmp_path / "set")
    message = str(refused.value)
    for fragment in ("LR files without an HR file of the same name (1): orphan_LR4.png",
                     "HR is not 4x the LR in size (1)",
                     "odd_LR4.png (LR 24x20, HR 90x70", "smaller than the 16 px crop (1): tiny_LR4.png (LR 12x12)",
                     "--allow-unmatched", "--skip-bad-pairs"):
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "set").exists(), "nothing is written for a refused set"
    with pytest.raises(UserError) as refused:
        paired(pair_folders, tmp_path / "set", allow_unmatched=True)
    assert "orphan" not in str(refused.value) and "odd_LR4.png" in str(refused.value)
    with pytest.raises(UserError, match="without an HR file") as refused:
        paired(pair_folders, tmp_path / "set", lr_suffix="", hr_suffix="")
    assert "--lr-suffix" in str(refused.value)


def test_paired_skips_when_allowed_and_crops_are_centred_and_aligned(pair_folders, tmp_path):
    out = tmp_path / "set"
    report = paired(pair_folders, out, allow_unmatched=True, skip_bad_pairs=True)
    assert report["pairs"] == 2 and report["skipped"] == {"size_mismatch": 1, "too_small": 1, "unmatched_lr": 1}
    pairs = read_pairs(out)
    assert [p["key"] for p in pairs] == ["Canon_001_LR4", "sub/rocket%2Ev2_LR4"], "keys are the LR stems, dots escaped"
    lr_root, hr_root = pair_folders
    for pair in pairs:
        meta = pair["meta"]
        assert pair["lr"].shape == (16, 16, 3) and pair["hr"].shape == (64, 64, 3)
        full_lr = np.asarray(Image.open(lr_root / meta["lr_source"]))
        height, width = full_lr.shape[:2]
        left, top = (width - 16) // 2, (height - 16) // 2
        assert meta["lr_crop_box"] == [left, top, left + 16, top + 16]
        assert meta["hr_crop_box"] == [v * SCALE for v in meta["lr_crop_box"]]
        assert np.array_equal(pair["lr"], full_lr[top : top + 16, left : left + 16])
        # the HR box is the LR box x4: the LR crop is exactly the box downscale of the HR crop
        assert np.array_equal(pair["lr"], np.asarray(Image.fromarray(pair["hr"]).reduce(SCALE)))
    assert pairs[1]["meta"]["hr_source"] == "sub/rocket.v2_HR.png" and pairs[1]["meta"]["name"] == "sub/rocket.v2"


def test_paired_runs_on_workers_and_ranks_with_the_same_bytes(pair_folders, tmp_path, monkeypatch):
    options = dict(allow_unmatched=True, skip_bad_pairs=True, samples_per_shard=1)
    report = paired(pair_folders, tmp_path / "one", **options)
    assert report["shards"] == 2 and report["samples"] == 2 and report["status_counts"] == {"ok": 2}
    assert json.loads((tmp_path / "one" / "report.json").read_text())["pairs"] == 2
    assert paired(pair_folders, tmp_path / "one", **options)["shards_skipped"] == 2  # done markers: resumed
    paired(pair_folders, tmp_path / "workers", workers=2, **options)
    assert output_bytes(tmp_path / "workers") == output_bytes(tmp_path / "one")
    # two array tasks: each builds its own shards, sizes.json appears when both are done
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        report = paired(pair_folders, tmp_path / "ranks", **options)
        assert report["shards_processed"] == 1
        assert (tmp_path / "ranks" / "sizes.json").exists() == (task == "0")
    assert output_bytes(tmp_path / "ranks") == output_bytes(tmp_path / "one")


def test_stem_key_is_dot_free_and_keeps_stems_apart():
    assert stem_key("Canon_001_LR4") == "Canon_001_LR4"
    assert stem_key("a.b") == "a%2Eb" and stem_key("a%2Eb") == "a%252Eb"
    assert stem_key("caf\udce9") == "caf%E9"


# ---------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_synthetic(hr_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: only defaults and options apply
    out = tmp_path / "cli_synthetic"
    result = runner.invoke(app, ["testset", "synthetic", "--hr-dir", str(hr_folder), "--count", "2", "--hr-size", "64",
                                 "--scale", "4", "--seed", "5", "--out", str(out),
                                 "--set", "degradation.kernel_sizes=[7,9,11]"])
    assert result.exit_code == 0, result.output
    assert read_sizes(out) == {0: 2} and read_record(out)["config"]["degradation"]["scale"] == 4
    assert all(p["lr"].shape == (16, 16, 3) for p in read_pairs(out))


def test_cli_paired(pair_folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lr_root, hr_root = pair_folders
    common = ["testset", "paired", "--lr-dir", str(lr_root), "--hr-dir", str(hr_root), "--lr-size", "16",
              "--scale", "4", "--lr-suffix", "_LR4", "--hr-suffix", "_HR", "--out", str(tmp_path / "cli_paired")]
    refused = runner.invoke(app, common)
    assert refused.exit_code != 0 and "Error:" in refused.output and "orphan_LR4.png" in refused.output
    assert "Traceback" not in refused.output
    result = runner.invoke(app, [*common, "--allow-unmatched", "--skip-bad-pairs"])
    assert result.exit_code == 0, result.output
    assert read_sizes(tmp_path / "cli_paired") == {0: 2}
    assert read_record(tmp_path / "cli_paired")["stage"] == "testset_paired"
