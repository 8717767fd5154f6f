"""Output folders own only what xpsr wrote in them: the ledger, --overwrite, foreign files, failed runs, sr's
output names and its refusal of folders that overlap its inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_one_line_error, photo, run_xpsr, tree_digest, xpsr_here
from stages import shard as shard_stage
from xpsr_core.errors import UserError
from xpsr_core.io.atomic import atomic_write_bytes
from xpsr_core.io.outputs import LEDGER_FILE, Ownership, claim, prepare_output_dir, read_ledger, read_record


def shard_config(photos: Path, out: Path, **values) -> shard_stage.ShardConfig:
    values = {"crop_size": 48, **values}
    return shard_stage.ShardConfig(inputs=[{"dataset": "photos", "path": str(photos)}], out=out, crops_per_image=1,
                                   images_per_shard=2, min_size=8, **values)


@pytest.fixture(scope="module")
def checkpoint(tiny_models, perturbed_xpsr, tmp_path_factory):
    from xpsr_core.models.loading import load_base_sd

    model = perturbed_xpsr(load_base_sd(tiny_models.sd), seed=0)
    return model.save_trainable(tmp_path_factory.mktemp("xpsr") / "final")


def sr_args(tiny_models, checkpoint, captions: tuple = ("--content", "a photo", "--quality", "blurry")) -> list[str]:
    return ["--base-model", str(tiny_models.sd), "--xpsr", str(checkpoint), *captions, "--steps", "1", "--scale", "2"]


def sr_config(tiny_models, checkpoint, inputs: list, out: Path, **values):
    from stages import sr

    common = dict(base_model=str(tiny_models.sd), xpsr=str(checkpoint), steps=1, scale=2, captions="given",
                  content_caption="a photo", quality_caption="blurry")
    return sr.SRConfig(inputs=[str(i) for i in inputs], out=out, **{**common, **values})


def small_photo(path: Path, name: str = "camera") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(name, (24, 16))).save(path)
    return path


# ---------------------------------------------------------------------------- the library


def test_the_ledger_holds_every_atomic_write_and_claim(photo_dir, tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(out, "shard", shard_config(photo_dir, out))
    (out / "sub").mkdir()
    atomic_write_bytes(out / "sub" / "a.bin", b"a")
    claim(out, "tree/")
    (out / "tree").mkdir()
    (out / "tree" / "weights.bin").write_bytes(b"w")
    (out / "mine.txt").write_bytes(b"not xpsr's")
    assert read_ledger(out) == {"sub/a.bin", "tree/"}
    ownership = Ownership(out, "shard", read_record(out))
    assert ownership.owned == ["sub/a.bin", "tree/weights.bin"] and ownership.foreign == ["mine.txt"]
    assert read_record(out)["finished"] is False


def test_a_stage_finishing_marks_its_record(photo_dir, tmp_path):
    out = tmp_path / "out"
    shard_stage.run(shard_config(photo_dir, out))
    record = read_record(out)
    assert record["finished"] is True
    assert {"00000.tar", "00000.stats.json", "00000.parquet", "sizes.json", "report.json"} <= read_ledger(out)
    assert "finished" not in record["settings"], "the record's status is no setting: the hash stays"


def test_overwrite_removes_exactly_what_xpsr_wrote(photo_dir, tmp_path, capfd):
    out = tmp_path / "out"
    shard_stage.run(shard_config(photo_dir, out))
    owned = len(Ownership(out, "shard", read_record(out)).owned)
    shard_stage.run(shard_config(photo_dir, out, crop_size=32, overwrite=True))
    assert f"removing the {owned} files xpsr wrote there" in capfd.readouterr().err


def test_a_failed_run_leaves_the_folder_rerunnable(photo_dir, tmp_path, monkeypatch, capfd):
    from xpsr_core.io.shards import tar_path

    out = tmp_path / "out"

    def crash(*args, **kwargs):
        atomic_write_bytes(tar_path(out, 0), b"half a shard")  # a tar without stats: unfinished
        raise RuntimeError("killed")

    monkeypatch.setattr(shard_stage, "build_shard", crash)
    with pytest.raises(RuntimeError):
        shard_stage.run(shard_config(photo_dir, out, crop_size=40))
    assert read_record(out)["finished"] is False and (out / "00000.tar").exists()
    monkeypatch.undo()
    report = shard_stage.run(shard_config(photo_dir, out))  # another crop size, no --overwrite
    assert report["shards_processed"] == 3
    assert "did not finish and left no finished output" in capfd.readouterr().err
    with pytest.raises(UserError, match="3 finished outputs.*--overwrite"):
        shard_stage.run(shard_config(photo_dir, out, crop_size=40))


def test_a_folder_of_older_code_owns_only_its_stages_names(photo_dir, tmp_path):
    out = tmp_path / "out"
    shard_stage.run(shard_config(photo_dir, out))
    (out / LEDGER_FILE).unlink()  # as older code left it: config.json, no ledger
    record = read_record(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in record.items() if k != "finished"}))
    (out / "notes.txt").write_text("mine")
    ownership = Ownership(out, "shard", read_record(out))
    assert ownership.legacy and ownership.foreign == ["notes.txt"] and "00000.tar" in ownership.owned
    with pytest.raises(UserError, match="notes.txt"):
        shard_stage.run(shard_config(photo_dir, out, crop_size=32, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "00000.tar").exists()
    (out / "notes.txt").unlink()
    assert shard_stage.run(shard_config(photo_dir, out))["shards_processed"] == 0  # adopted: resumes
    assert "00000.tar" in read_ledger(out)


@pytest.mark.parametrize("names, stems", [
    (["a.png", "sub/b.jpg"], ["a", "sub/b"]),
    (["x.png", "x.jpg", "y.png"], ["x.png", "x.jpg", "y"]),
    (["X.png", "x.jpg"], ["X.png", "x.jpg"]),
    (["config.png", "sub/config.png"], ["config.png", "sub/config"]),
])
def test_output_stems_keep_the_suffix_where_stems_would_clash(names, stems):
    from xpsr_core.infer.inputs import output_stems

    assert output_stems(names) == stems


def test_output_stems_that_still_clash_are_refused():
    from xpsr_core.infer.inputs import output_stems

    with pytest.raises(UserError, match="x.png.jpg"):
        output_stems(["x.png", "x.jpg", "x.png.jpg"])


def test_sr_on_a_name_that_is_not_utf8_writes_its_sidecar_and_resumes(tiny_models, checkpoint, tmp_path):
    from stages import sr

    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    Image.fromarray(photo("coffee", (24, 16))).save(os.fsdecode(raw))
    out = tmp_path / "out"
    assert sr.run(sr_config(tiny_models, checkpoint, [folder], out))["done"] == 1
    meta = json.loads(Path(os.fsdecode(os.path.join(os.fsencode(out), b"caf\xe9.json"))).read_text())
    assert meta["input"].endswith("caf\\xe9.png") and bytes.fromhex(meta["input_bytes"]) == raw
    assert meta["output"] == "caf\\xe9.png"
    assert sr.run(sr_config(tiny_models, checkpoint, [folder], out))["skipped"] == 1


# ---------------------------------------------------------------------------- the real CLI


# case -> (extra arguments, fragments of the one Error line); the folder holds a user's mine.txt
SHARD_CASES = {
    "shard into a foreign folder": ([], ("1 files xpsr did not write", "mine.txt")),
    "shard --overwrite over a foreign folder": (["--overwrite"], ("mine.txt", "nothing was changed")),
}


# case -> (inputs, --out, the photographs to make, fragments of the one Error line)
SR_CASES = {
    "sr --out is the input folder": (["in"], "in", ["in/a.png"], ("is, or lies inside, the input folder",)),
    "sr --out inside the input folder": (["in"], "in/sr", ["in/a.png"], ("lies inside, the input folder",)),
    "sr --out holds the input folder": (["out/in"], "out", ["out/in/a.png"], ("holds the input folder",)),
    "sr --out holds an input file": (["out/a.png"], "out", ["out/a.png"], ("holds the input out/a.png",)),
    "sr pattern would match its outputs": (["in/**/*.png"], "in/sr", ["in/a.png"], ("would match its output",)),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_shard_cli_refuses_foreign_folders_and_changes_nothing(case, photo_dir, tmp_path):
    extra, fragments = SHARD_CASES[case]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("a user's file")
    before = tree_digest(tmp_path, photo_dir)
    result = run_xpsr("shard", photo_dir, "--out", "out", "--crop-size", "48", *extra, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert tree_digest(tmp_path, photo_dir) == before


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_cli_refuses_output_folders_that_overlap_the_inputs(case, tiny_models, checkpoint, tmp_path):
    inputs, out, photos, fragments = SR_CASES[case]
    for relative in photos:
        small_photo(tmp_path / relative)
    before = tree_digest(tmp_path)
    result = xpsr_here("sr", *inputs, "--out", out, *sr_args(tiny_models, checkpoint), cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert tree_digest(tmp_path) == before


def test_sr_cli_gives_clashing_inputs_distinct_outputs(tiny_models, checkpoint, tmp_path):
    small_photo(tmp_path / "in" / "x.png", "camera")
    small_photo(tmp_path / "in" / "x.jpg", "coffee")
    small_photo(tmp_path / "in" / "y.png", "rocket")
    before = tree_digest(tmp_path / "in")
    result = xpsr_here("sr", "in", "--out", "out", *sr_args(tiny_models, checkpoint), cwd=tmp_path)
    assert result.code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert written == ["x.jpg.png", "x.png.png", "y.png"]
    assert json.loads((tmp_path / "out" / "x.jpg.json").read_text())["output"] == "x.jpg.png"
    assert tree_digest(tmp_path / "in") == before


def test_sr_cli_overwrite_keeps_foreign_files_and_a_failed_run_reruns(tiny_models, checkpoint, tmp_path):
    small_photo(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    (out / "b.png").write_bytes(b"a user's picture")
    foreign = tree_digest(out / "notes.txt", out / "b.png")
    inputs = tree_digest(tmp_path / "in")
    # fails after preparing the folder: the manifest is read once the images are decoded
    failed = xpsr_here("sr", "in", "--out", "out", *sr_args(tiny_models, checkpoint, captions=()),
                       "--captions", "manifest", "--manifest", "missing.parquet", cwd=tmp_path)
    assert_one_line_error(failed, "missing.parquet")
    corrected = xpsr_here("sr", "in", "--out", "out", *sr_args(tiny_models, checkpoint), cwd=tmp_path)
    assert corrected.code == 0, corrected.output
    assert "did not finish and left no finished output" in corrected.output
    first_seed = json.loads((out / "a.json").read_text())["seed"]
    again = xpsr_here("sr", "in", "--out", "out", *sr_args(tiny_models, checkpoint), "--seed", "3", cwd=tmp_path)
    assert_one_line_error(again, "1 finished outputs", "--overwrite")
    replaced = xpsr_here("sr", "in", "--out", "out", *sr_args(tiny_models, checkpoint), "--seed", "3",
                         "--overwrite", cwd=tmp_path)
    assert replaced.code == 0, replaced.output
    assert "removing the 2 files xpsr wrote there; the 2 other files there are kept" in replaced.output
    assert tree_digest(out / "notes.txt", out / "b.png") == foreign and tree_digest(tmp_path / "in") == inputs
    assert json.loads((out / "a.json").read_text())["seed"] != first_seed, "remade under the new seed"


def test_sr_cli_never_writes_over_a_file_it_did_not_write(tiny_models, checkpoint, tmp_path):
    small_photo(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"a user's picture")
    before = tree_digest(tmp_path)
    result = xpsr_here("sr", "in", "--out", "out", *sr_args(tiny_models, checkpoint), cwd=tmp_path)
    assert_one_line_error(result, "did not write", "a.png")
    assert tree_digest(tmp_path) == before
