"""Nothing a user says is dropped, and what the CLI prints reads well in a log: the start line, the
preset-vs-params note, no third-party noise, no wrapped lines, ``--device auto``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, photo, run_xpsr, tree_digest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("kernels-community", "publisher trust", "Loading weights", "it/s]", "Writing model shards")
LONG = "a-folder-name-long-enough-that-any-line-holding-it-passes-eighty-columns"


@pytest.fixture()
def workdir(tmp_path) -> Path:
    """A working folder without params.yaml, one small input image, and a long folder name below it."""
    Image.fromarray(photo("astronaut", (32, 32))).save(tmp_path / "in.png")
    (tmp_path / LONG).mkdir()
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- bad input: one Error line naming the problem, nothing changed ----

BAD_INPUTS = {
    "misspelled section": (
        lambda d: ["train", "--params", _write(d / LONG / "params.yaml", "trian:\n  max_train_steps: 1\n")],
        [f"{LONG}/params.yaml: unknown section 'trian' (did you mean 'train'?)"],
    ),
    "misspelled key in a section": (
        lambda d: ["sr", "in.png", "--params", _write(d / "p.yaml", "sr:\n  guidance_scal: 3\n")],
        ["guidance_scal", "did you mean 'guidance_scale'?"],
    ),
    "--content with --captions manifest": (
        lambda d: ["sr", "in.png", "--content", "a cat", "--captions", "manifest"],
        ["content_caption/--content", "captions: manifest", "--captions given"],
    ),
    "--quality beside a params file's captions in the same params file": (
        lambda d: ["evaluate", "--params", _write(d / "p.yaml", "evaluate:\n  captions: captioner\n"
                                                             "  quality_caption: sharp\n")],
        ["quality_caption/--quality", "captions: captioner", "p.yaml"],
    ),
    "unknown --set key": (
        lambda d: ["sr", "in.png", "--set", "guidanc_scale=3"],
        ["guidanc_scale", "did you mean 'guidance_scale'?"],
    ),
    "unknown nested --set key": (
        lambda d: ["degrade", "--set", "degradation.scal=2"],
        ["degradation.scal", "did you mean 'scale'?"],
    ),
    "unknown device": (
        lambda d: ["embed", "--device", "gpu"],
        ["device must be auto | cpu | cuda | cuda:N", "'gpu'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_changes_nothing(case, workdir):
    make_args, fragments = BAD_INPUTS[case]
    args = make_args(workdir)
    before = tree_digest(workdir)
    result = run_xpsr(*args, cwd=workdir)
    assert_one_line_error(result, *fragments)
    assert tree_digest(workdir) == before


# ---- how layers combine (in-process) ----

def test_text_captions_mean_given_unless_a_layer_as_high_names_another_source():
    from stages.sr import SRConfig
    from xpsr_core.config import resolve_config
    from xpsr_core.errors import UserError

    captioner = {"sr": {"captions": "captioner"}}
    assert resolve_config(SRConfig, "sr", captioner, {"content_caption": "a cat"}).captions == "given"
    assert resolve_config(SRConfig, "sr", {"sr": {"quality_caption": "sharp"}}).captions == "given"
    assert resolve_config(SRConfig, "sr", None, {"content_caption": "x", "captions": "given"}).captions == "given"
    assert resolve_config(SRConfig, "sr", captioner).captions == "captioner"
    assert SRConfig(content_caption="a cat").captions == "given"
    assert SRConfig.model_validate(SRConfig(content_caption="").resolved()).captions == "captioner"
    for params, overrides in (({"sr": {"content_caption": "x", "captions": "manifest"}}, None),
                              ({"sr": {"content_caption": "x"}}, {"captions": "captioner"})):
        with pytest.raises(UserError, match="drop one, or use --captions given"):
            resolve_config(SRConfig, "sr", params, overrides)


def test_every_params_file_and_recipe_overlay_has_only_known_sections():
    import yaml

    from stages.cli import SECTIONS
    from xpsr_core.config import load_params
    from xpsr_core.recipes import overlay_recipe

    for name in ("params.yaml", "params-paper.yaml", "params-official.yaml"):
        assert load_params(ROOT / name, SECTIONS)
    default, official = (yaml.safe_load((ROOT / n).read_text()) for n in ("params.yaml", "params-official.yaml"))
    assert set(overlay_recipe(default, official)) <= set(SECTIONS)
    from stages.cli import COMMANDS

    assert {spec.section for spec in COMMANDS.values()} == set(SECTIONS)


def test_device_defaults_to_auto_outside_the_config_hash_with_one_help_text():
    from stages import caption, degrade, embed, evaluate, sr, testset, train
    from stages.cli import COMMANDS, build_command

    for config_cls in (degrade.DegradeConfig, caption.CaptionConfig, embed.EmbedConfig, sr.SRConfig,
                       evaluate.EvaluateConfig, testset.SyntheticTestsetConfig, train.TrainConfig):
        field = config_cls.model_fields["device"]
        assert field.default == "auto" and field.json_schema_extra == {"runtime": True}, config_cls
    helps = {}
    for words in COMMANDS:
        for param in build_command(words).params:
            if param.name == "device":
                helps[words[-1]] = param.help
    assert set(helps) == {"degrade", "caption", "embed", "train", "sr", "evaluate", "synthetic"}
    assert helps.pop("train").startswith("auto: GPUs when present")  # training runs on every GPU accelerate sees
    assert all(text.startswith("auto | cpu | cuda | cuda:N") for text in helps.values()), helps


# ---- what a real run prints into a log ----

def _assert_quiet_and_unwrapped(result, *whole: str) -> None:
    assert result.code == 0, result.output
    for noise in NOISE:
        assert noise not in result.output, (noise, result.output)
    lines = result.output.splitlines()
    for text in whole:
        assert any(text in line for line in lines), (text, result.output)


def test_models_tiny_prints_a_start_line_and_no_noise(workdir):
    out = workdir / LONG / "zoo"
    result = run_xpsr("models", "tiny", "--out", out, cwd=workdir)
    recorded = json.loads((out / "config.json").read_text())["config_hash"]
    start = f"models: no params file, config {recorded} (full config: {out / 'config.json'})"
    _assert_quiet_and_unwrapped(result, start, f"models done: {out}/sd15 and {out}/captioner")
    assert result.output.splitlines()[0] == start
    assert "models config:" not in result.output


@pytest.fixture(scope="module")
def untrained_xpsr(tiny_models, tmp_path_factory) -> Path:
    from xpsr_core.models.loading import load_base_sd
    from xpsr_core.models.xpsr import XPSRModel

    folder = tmp_path_factory.mktemp("xpsr") / "final"
    return XPSRModel.from_base(load_base_sd(tiny_models.sd), with_dfc=False).save_trainable(folder)


def test_sr_with_a_params_file_a_preset_and_given_content(workdir, tiny_models, untrained_xpsr):
    """./params.yaml (with a sampling value the preset also sets) + --preset + --content alone: the start line
    names all three, a note says the params file wins, the sidecar holds the given caption, the log stays quiet."""
    _write(workdir / "params.yaml", f"sr:\n  base_model: {tiny_models.sd}\n  xpsr: {untrained_xpsr}\n"
                                    "  captions: captioner\n  guidance_scale: 3.5\n")
    out = workdir / LONG / "sr"
    result = run_xpsr("sr", "in.png", "--out", out, "--preset", "paper", "--content", "a red cat", "--steps", "2",
                      "--scale", "2", cwd=workdir, env={"XPSR_PROGRESS_SECONDS": "0.05"})
    recorded = json.loads((out / "config.json").read_text())["config_hash"]
    start = (f"sr: params params.yaml, preset paper, device cpu (auto), config {recorded} "
             f"(full config: {out / 'config.json'})")
    note = ("params.yaml sets guidance_scale, which the preset paper also sets: params.yaml wins "
            "(precedence: preset < params file < command line)")
    _assert_quiet_and_unwrapped(result, start, note)
    assert result.output.splitlines()[:2] == [start, "  " + note]
    assert not any(line.startswith("captions:") for line in result.output.splitlines()), result.output
    sidecar = json.loads((out / "in.json").read_text())
    assert sidecar["content_caption"] == "a red cat" and sidecar["settings"]["guidance_scale"] == 3.5
    assert np.asarray(Image.open(out / "in.png")).shape == (64, 64, 3)
