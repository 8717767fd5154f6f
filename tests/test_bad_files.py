"""Broken model files, bad images, unreadable manifests and file names of any bytes, through the real CLI.

Every broken model folder or input file is one ``Error:`` line naming it, never a traceback; file names that are not
UTF-8 are written out, with a readable column (``\\xNN`` escapes) and an exact bytes column in the Parquet tables.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import assert_one_line_error, photo, run_xpsr, tree_digest, xpsr_here

# the environment a user without HF_HUB_OFFLINE has: a local folder must never be looked up on the hub
ONLINE = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""}
# huggingface_hub reads the offline switch at import, so the ONLINE runs need a new process: one per library that
# loads local folders (transformers for the captioner, diffusers for the base model); the other broken folders
# run in this process (offline, where a look-up on the hub would fail with another message than the one expected)
ONLINE_CASES = {"captioner-truncated-caption", "unet-truncated-sr"}
NON_UTF8 = b"caf\xe9"  # Latin-1 bytes: not UTF-8


@pytest.fixture(scope="module")
def xpsr_folder(tiny_models, tmp_path_factory) -> Path:
    """An untrained XPSR folder (save_trainable layout) on the tiny base model, and a pipeline folder of both."""
    from xpsr_core.infer.pipeline import XPSRPipeline
    from xpsr_core.models.loading import load_base_sd
    from xpsr_core.models.xpsr import XPSRModel

    root = tmp_path_factory.mktemp("xpsr-models")
    base = load_base_sd(tiny_models.sd)
    model = XPSRModel.from_base(base, with_dfc=False)
    model.save_trainable(root / "xpsr")
    XPSRPipeline.from_model(model, base).save_pretrained(root / "pipeline")
    return root


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small-images")
    Image.fromarray(photo("coffee", (16, 16))).save(folder / "coffee.png")
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a weight file" * 4)


def _bad_json(path: Path) -> None:
    path.write_text("{not json")


# (case, model folder to copy, file or folder to break below it, how, the command, the fragments of its error)
WEIGHT_CASES = [
    ("captioner-truncated-caption", "captioner", "model.safetensors", _truncate, "caption",
     ("Could not load a captioner", "model.safetensors", "truncated or corrupt")),
    ("captioner-garbage-sr", "captioner", "model.safetensors", _garbage, "sr",
     ("Could not load a captioner", "model.safetensors")),
    ("unet-truncated-sr", "sd", "unet/diffusion_pytorch_model.safetensors", _truncate, "sr",
     ("the unet of the base model", "diffusion_pytorch_model.safetensors", "truncated or corrupt")),
    ("vae-config-embed", "sd", "vae/config.json", _bad_json, "embed", ("the vae of the base model", "config.json")),
    ("text-encoder-garbage-embed", "sd", "text_encoder/model.safetensors", _garbage, "embed",
     ("the text_encoder of the base model", "model.safetensors")),
    ("tokenizer-json-sr", "sd", "tokenizer/tokenizer_config.json", _bad_json, "sr",
     ("the tokenizer of the base model", "not valid JSON")),
    ("unet-truncated-train", "sd", "unet/diffusion_pytorch_model.safetensors", _truncate, "train",
     ("the unet of the base model", "truncated or corrupt")),
    ("controlnet-truncated-sr", "xpsr", "controlnet/diffusion_pytorch_model.safetensors", _truncate, "sr",
     ("the XPSR controlnet", "truncated or corrupt")),
    ("pipeline-without-controlnet-sr", "pipeline", "xpsr/controlnet", shutil.rmtree, "sr",
     ("has no controlnet/ folder",)),
    ("official-controlnet-truncated", "official", "controlnet/diffusion_pytorch_model.safetensors", _truncate,
     "import-official", ("diffusion_pytorch_model.safetensors", "truncated or corrupt")),
    ("realesrgan-garbage-evaluate", "realesrgan", "RealESRGAN_x4plus.pth", _garbage, "evaluate",
     ("Real-ESRGAN checkpoint", "RealESRGAN_x4plus.pth", "truncated or corrupt")),
]

OFFICIAL = Path(__file__).parent / "fixtures" / "official"


def _copy_model(kind: str, tiny_models, xpsr_folder: Path, tmp_path: Path) -> Path:
    if kind == "realesrgan":
        (tmp_path / "esrgan").mkdir()
        return tmp_path / "esrgan"
    source = {"captioner": tiny_models.captioner, "sd": tiny_models.sd, "xpsr": xpsr_folder / "xpsr",
              "pipeline": xpsr_folder / "pipeline", "official": OFFICIAL / "checkpoint"}[kind]
    return Path(shutil.copytree(source, tmp_path / kind))


def _command(command: str, kind: str, model: Path, tiny_models, xpsr_folder, images: Path, pairs: Path,
             train_shards: Path, captions: Path, out: Path) -> list:
    sd = model if kind == "sd" else tiny_models.sd
    given = ["--captions", "given", "--content", "a cup", "--quality", "sharp"]
    if command == "caption":
        return ["caption", images, "--out", out / "c.parquet", "--captioner", model, "--base-model", sd]
    if command == "sr":
        if kind == "captioner":
            return ["sr", images, "--out", out, "--pipeline", xpsr_folder / "pipeline", "--captioner", model,
                    "--steps", "2"]
        if kind == "pipeline":
            return ["sr", images, "--out", out, "--pipeline", model, *given, "--steps", "2"]
        xpsr = model if kind == "xpsr" else xpsr_folder / "xpsr"
        return ["sr", images, "--out", out, "--base-model", sd, "--xpsr", xpsr, *given, "--steps", "2"]
    if command == "embed":
        return ["embed", "--input-dir", pairs, "--captions-dir", captions, "--out", out, "--base-model", sd]
    if command == "train":
        return ["train", "--input-dir", train_shards, "--out", out, "--base-model", sd, "--max-train-steps", "1",
                "--batch-size", "2", "--set", "tensorboard=false", "--set", "metrics_file=null"]
    if command == "import-official":
        return ["import-official", model, "--base-model", OFFICIAL / "base", "--out", out]
    weights = model / "RealESRGAN_x4plus.pth"
    return ["evaluate", "--input-dir", pairs, "--out", out, "--method", f"esrgan=realesrgan:{weights}",
            "--metric", "psnr"]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[case[0] for case in WEIGHT_CASES])
def test_broken_model_files_are_one_line_errors(case, tiny_models, xpsr_folder, small_images, pair_shards,
                                               train_shards, pair_captions, tmp_path):
    _, kind, broken, breaks, command, fragments = case
    model = _copy_model(kind, tiny_models, xpsr_folder, tmp_path)
    if kind == "realesrgan":
        (model / broken).write_bytes(b"")
    breaks(model / broken)
    args = _command(command, kind, model, tiny_models, xpsr_folder, small_images, pair_shards, train_shards,
                    pair_captions, tmp_path / "out")
    before = tree_digest(model, small_images, pair_shards)
    if case[0] in ONLINE_CASES:
        result = run_xpsr(*args, cwd=tmp_path, env=ONLINE)
    else:
        result = xpsr_here(*args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert "huggingface.co" not in result.output
    assert tree_digest(model, small_images, pair_shards) == before


def test_missing_local_models_are_named_without_the_hub(tiny_models, small_images, tmp_path):
    """Paths that are not hub ids (three parts, ./) are never looked up online, even without HF_HUB_OFFLINE."""
    result = run_xpsr("caption", small_images, "--out", tmp_path / "c.parquet", "--captioner", "./models/captioner",
                      "--base-model", tiny_models.sd, cwd=tmp_path, env=ONLINE)
    assert_one_line_error(result, "The captioner folder ./models/captioner does not exist")
    assert "huggingface.co" not in result.output


def test_unreadable_caption_manifests_are_one_line_errors(tiny_models, pair_shards, tmp_path):
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "sizes.json").write_text('{"0": 2, "1": 2, "2": 2}')
    for shard in range(3):
        (captions / f"{shard:05d}.stats.json").write_text("{}")
        (captions / f"{shard:05d}.parquet").write_bytes(b"PAR1 but not really")
    result = xpsr_here("embed", "--input-dir", pair_shards, "--captions-dir", captions, "--out", tmp_path / "out",
                       "--base-model", tiny_models.sd, cwd=tmp_path)
    assert_one_line_error(result, "Cannot read the caption manifest", "00000.parquet")


def test_a_one_pixel_image_is_recorded_too_small_in_sr(xpsr_folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(photo("coffee", (16, 16))).save(images / "coffee.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(images / "dot.png")
    out = tmp_path / "out"
    result = xpsr_here("sr", images, "--out", out, "--pipeline", xpsr_folder / "pipeline", "--captions", "given",
                       "--steps", "2", cwd=tmp_path)
    assert result.code == 0, result.output
    assert "dot.png: too_small" in result.output
    assert (out / "coffee.png").is_file() and (out / "coffee.json").is_file()
    assert not (out / "dot.png").exists() and not (out / "dot.json").exists()


# ---- names of any bytes ----


def _nonutf8_images(folder: bytes, names: tuple[bytes, ...], size: tuple[int, int] = (48, 40)) -> bytes:
    os.makedirs(folder, exist_ok=True)
    for index, name in enumerate(names):
        Image.fromarray(photo(("coffee", "astronaut", "chelsea")[index], size)).save(os.path.join(folder, name))
    return folder


def test_caption_of_a_folder_with_non_utf8_names(tiny_models, tmp_path):
    folder = _nonutf8_images(os.fsencode(tmp_path / "photos"), (NON_UTF8 + b".png", b"plain.png"))
    before = tree_digest(Path(os.fsdecode(folder)))
    out = tmp_path / "c.parquet"
    result = run_xpsr("caption", folder, "--out", out, "--captioner", tiny_models.captioner, "--base-model",
                      tiny_models.sd, "--max-new-tokens", "4", cwd=tmp_path)
    assert result.code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [(r["source"], r["source_bytes"], r["status"]) for r in rows] == [
        ("caf\\xe9.png", NON_UTF8 + b".png", "ok"), ("plain.png", b"plain.png", "ok")]
    assert tree_digest(Path(os.fsdecode(folder))) == before


def test_shard_of_a_folder_whose_name_is_not_utf8(tmp_path):
    folder = _nonutf8_images(os.fsencode(tmp_path) + b"/" + NON_UTF8, (NON_UTF8 + b".png",))
    named = _nonutf8_images(os.fsencode(tmp_path) + b"/other" + NON_UTF8, (b"plain.png",))
    before = tree_digest(Path(os.fsdecode(folder)), Path(os.fsdecode(named)))
    out = tmp_path / "hr"
    result = run_xpsr("shard", folder, b"more=" + named, "--out", out, "--crop-size", "32", cwd=tmp_path)
    assert result.code == 0, result.output
    index = pq.read_table(out / "00000.parquet").to_pylist()
    assert [(r["dataset"], r["source"], r["source_bytes"]) for r in index] == [
        ("caf_", "caf\\xe9.png", NON_UTF8 + b".png"), ("more", "plain.png", b"plain.png")]
    assert "caf\\\\xe9" in (out / "config.json").read_text()  # the recorded input folder, readable
    assert tree_digest(Path(os.fsdecode(folder)), Path(os.fsdecode(named))) == before


def _paired_folders(tmp_path: Path) -> tuple[bytes, bytes]:
    names = (NON_UTF8 + b".png", b"plain.png")
    lr = os.fsencode(tmp_path) + b"/lr" + NON_UTF8
    hr = os.fsencode(tmp_path) + b"/hr" + NON_UTF8
    _nonutf8_images(lr, names, (16, 16))
    _nonutf8_images(hr, names, (64, 64))
    return lr, hr


def test_evaluate_on_folders_with_non_utf8_names(tmp_path):
    lr, hr = _paired_folders(tmp_path)
    inputs = (Path(os.fsdecode(lr)), Path(os.fsdecode(hr)))
    before = tree_digest(*inputs)
    out = tmp_path / "eval"
    result = run_xpsr("evaluate", "--lr-dir", lr, "--hr-dir", hr, "--out", out, "--method", "bicubic",
                      "--metric", "psnr", cwd=tmp_path)
    assert result.code == 0, result.output
    rows = pq.read_table(out / "per_image.parquet").to_pylist()
    assert sorted((r["key"], r["key_bytes"], r["status"]) for r in rows) == [
        ("caf\\xe9", NON_UTF8, "ok"), ("plain", b"plain", "ok")]
    assert os.path.isfile(os.fsencode(out) + b"/sr/bicubic/" + NON_UTF8 + b".png")
    assert os.path.isfile(os.fsencode(out) + b"/grids/" + NON_UTF8 + b".png")
    assert "lrcaf\\xe9" in (out / "table.md").read_text()
    # the SR folder of a method given as NAME=folder:DIR, with a non-UTF-8 name of its own
    results = os.fsencode(tmp_path) + b"/results" + NON_UTF8
    shutil.copytree(os.fsencode(out) + b"/sr/bicubic", results)
    # (the run above printed the names to a real pipe; this one needs no new process)
    again = xpsr_here("evaluate", "--lr-dir", lr, "--hr-dir", hr, "--out", tmp_path / "eval2", "--method",
                      b"mine=folder:" + results, "--metric", "psnr", cwd=tmp_path)
    assert again.code == 0, again.output
    assert {r["key_bytes"] for r in pq.read_table(tmp_path / "eval2" / "per_image.parquet").to_pylist()} == {
        NON_UTF8, b"plain"}
    assert tree_digest(*inputs) == before


def test_paired_testset_with_non_utf8_names(tmp_path):
    lr, hr = _paired_folders(tmp_path)
    inputs = (Path(os.fsdecode(lr)), Path(os.fsdecode(hr)))
    before = tree_digest(*inputs)
    out = tmp_path / "testset"
    result = run_xpsr("testset", "paired", "--lr-dir", lr, "--hr-dir", hr, "--out", out, "--lr-size", "16",
                      cwd=tmp_path)
    assert result.code == 0, result.output
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert sorted((r["lr_source"], r["lr_source_bytes"], r["hr_source_bytes"]) for r in rows) == [
        ("caf\\xe9.png", NON_UTF8 + b".png", NON_UTF8 + b".png"), ("plain.png", b"plain.png", b"plain.png")]
    assert tree_digest(*inputs) == before


def test_synthetic_testset_from_a_non_utf8_folder(tmp_path):
    hr = _nonutf8_images(os.fsencode(tmp_path) + b"/hr" + NON_UTF8, (NON_UTF8 + b".png",), (80, 80))
    out = tmp_path / "testset"
    result = run_xpsr("testset", "synthetic", "--hr-dir", hr, "--out", out, "--hr-size", "76", "--count", "1",
                      cwd=tmp_path)
    assert result.code == 0, result.output
    [row] = pq.read_table(out / "00000.parquet").to_pylist()
    assert (row["source"], row["source_bytes"]) == ("caf\\xe9.png", NON_UTF8 + b".png")
