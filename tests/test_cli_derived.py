"""The command line is derived from the settings: options from fields, recipe keys from marks, errors before torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from stages.cli import COMMANDS, SECTIONS, app, build_command

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# the recipe keys as they were listed by hand before the fields carried the mark
LISTED_RECIPE_KEYS = {
    "caption": {"quality_model", "quality_trust_remote_code", "caption_hr", "content_instruction",
                "quality_instruction", "do_sample", "temperature", "top_p", "num_beams", "repetition_penalty"},
    "train": {"sfa_mode", "conditional_attention", "fusion", "conditional_attention_type", "dfc_pixel", "dfc_latent",
              "dfc_latent_heads", "dfc_target_resize", "dfc_weight", "init", "use_high_prompt",
              "hr_condition_probability", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler",
              "warmup_steps", "max_grad_norm", "online_encoding"},
}
SAMPLING = {"scale", "steps", "scheduler", "guidance_scale", "negative_prompt", "cfg_batched", "controlnet_negative",
            "conditioning_scale", "color_fix", "tile_size", "tile_overlap", "vae_tile_size", "vae_tile_overlap", "seed",
            "added_prompt", "negative_quality_prompt", "start_latent", "added_noise_level", "resize", "process_size",
            "pad_multiple", "latent_tile_threshold", "vae_decode_tile_size", "generator_scope", "generator_device"}
LISTED_RECIPE_KEYS["sr"] = {"preset", "content_instruction", "quality_instruction"} | SAMPLING
LISTED_RECIPE_KEYS["evaluate"] = LISTED_RECIPE_KEYS["sr"] | {"crop_border"}


@pytest.fixture(autouse=True)
def outside_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _config_class(words):
    import importlib

    spec = COMMANDS[words]
    return getattr(importlib.import_module(f"stages.{spec.stage}"), spec.config)


def test_recipe_keys_are_the_marked_fields_and_the_listed_set():
    from xpsr_core.config import recipe_fields
    from xpsr_core.recipes import RECIPE_KEYS

    assert {k: set(v) for k, v in RECIPE_KEYS.items()} == LISTED_RECIPE_KEYS
    for words, spec in COMMANDS.items():  # the stage configs mark exactly these, no stage adds a recipe field
        assert set(recipe_fields(_config_class(words))) == LISTED_RECIPE_KEYS.get(spec.section, set()), words


def test_every_command_reports_a_bad_set_before_torch_is_imported():
    """One process runs every command with a bad --set and checks, at the error, that no model library loaded."""
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from stages.cli import COMMANDS, app\n"
        "seen = {}\n"
        "for words in COMMANDS:\n"
        "    result = CliRunner().invoke(app, [*words, '--set', 'no_such_setting=1'])\n"
        "    heavy = [m for m in ('torch', 'diffusers', 'transformers', 'basicsr') if m in sys.modules]\n"
        "    seen[' '.join(words)] = [result.exit_code, 'no_such_setting' in result.output, heavy]\n"
        "print(json.dumps(seen))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen) == {" ".join(words) for words in COMMANDS}
    for command, (code_, named, heavy) in seen.items():
        assert code_ == 1 and named and heavy == [], (command, code_, named, heavy)


def test_bad_params_value_and_unknown_key_fail_before_torch(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  batch_size: -1\nsr:\n  guidance_scal: 3\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from stages.cli import app\n"
        f"for args in (['train', '--params', {str(params)!r}], ['sr', '--params', {str(params)!r}],\n"
        "             ['degrade', '--set', 'degradation.sinc_prob=2']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 1 and 'Error:' in result.output, result.output\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_every_option_is_a_field_with_its_description():
    for words, spec in COMMANDS.items():
        config_cls = _config_class(words)
        for param in build_command(words).params:
            if param.name in ("help",) or getattr(param, "hidden", False):
                continue
            assert param.help, (words, param.name)
            if param.name in config_cls.model_fields:
                assert param.help.startswith(config_cls.model_fields[param.name].description), (words, param.name)


def test_same_thing_same_option_name():
    """The input folder, the captioner, the learning rate and USM of the HR image have one name everywhere."""
    names = {words: {o for p in build_command(words).params if not getattr(p, "hidden", False) for o in p.opts}
             for words in COMMANDS}
    for words in (("degrade",), ("caption",), ("embed",), ("train",), ("evaluate",)):
        assert "--input-dir" in names[words], words
    assert "--captioner" in names[("caption",)] and "--captioner" in names[("sr",)]
    assert "--learning-rate" in names[("train",)] and "--usm-hr" in names[("degrade",)]
    for old in ("--in", "--pairs", "--data", "--model", "--lr", "--usm", "--latents"):
        assert not any(old in options for options in names.values()), old


def test_a_new_field_becomes_an_option(monkeypatch):
    """A field added to a stage config is an option of its command (help, default, flag, repeatable) with no edit of
    the CLI."""
    from stages import demo_data

    class WithMore(demo_data.DemoDataConfig):
        brightness: int = Field(3, ge=0, description="How bright the photographs are.")
        sharpen: bool = Field(True, description="Sharpen the photographs.")
        tags: list[str] = Field(default_factory=list, description="A tag (repeatable).")

    seen = {}
    monkeypatch.setattr(demo_data, "DemoDataConfig", WithMore)
    monkeypatch.setattr(demo_data, "run", lambda config: seen.setdefault("config", config))
    shown = runner.invoke(app, ["demo-data", "--help"]).output
    assert "--brightness INT" in shown and "How bright the photographs are. [default: 3]" in shown
    assert "--sharpen / --no-sharpen" in shown and "--tags TEXT" in shown
    result = runner.invoke(app, ["demo-data", "--brightness", "5", "--no-sharpen", "--tags", "a", "--tags", "b"])
    assert result.exit_code == 0, result.output
    assert (seen["config"].brightness, seen["config"].sharpen, seen["config"].tags) == (5, False, ["a", "b"])
    bad = runner.invoke(app, ["demo-data", "--brightness", "-1"])
    assert bad.exit_code == 1 and "brightness" in bad.output


@pytest.mark.parametrize("old, new, field, value", [
    (["train", "--lr", "0.25"], "--learning-rate", "learning_rate", 0.25),
    (["train", "--data", "shards"], "--input-dir", "input_dir", Path("shards")),
    (["degrade", "--no-usm"], "--usm-hr", "usm_hr", False),
    (["caption", "--model", "cap"], "--captioner", "captioner", "cap"),
    (["embed", "--pairs", "p", "--no-latents"], "--encode-latents", "encode_latents", False),
    (["evaluate", "--pairs", "p"], "--input-dir", "input_dir", Path("p")),
])
def test_old_option_names_still_work_with_one_deprecation_line(monkeypatch, old, new, field, value):
    import importlib

    spec = COMMANDS[(old[0],)]
    stage = importlib.import_module(f"stages.{spec.stage}")
    seen = {}
    monkeypatch.setattr(stage, spec.run, lambda config: seen.setdefault("config", config))
    result = runner.invoke(app, old)
    assert result.exit_code == 0, result.output
    assert getattr(seen["config"], field) == value
    assert f"is deprecated and will be removed: use {new}" in result.output


@pytest.mark.parametrize("section, old, new", [
    ("embed", "pairs_dir", "input_dir"), ("train", "train_dir", "input_dir"), ("evaluate", "pairs_dir", "input_dir"),
    ("caption", "model", "captioner"),
])
def test_renamed_params_keys_fail_naming_the_new_key(tmp_path, section, old, new):
    params = tmp_path / "p.yaml"
    params.write_text(f"{section}:\n  {old}: somewhere\n")
    words = next(w for w, s in COMMANDS.items() if s.section == section)
    result = runner.invoke(app, [*words, "--params", str(params)])
    assert result.exit_code == 1 and f"'{old}' is now called '{new}'" in result.output, result.output


def test_shorthands_and_positional_arguments(monkeypatch, tmp_path):
    from stages import testset

    seen = {}
    monkeypatch.setattr(testset, "run_synthetic", lambda config: seen.setdefault("config", config))
    result = runner.invoke(app, ["testset", "synthetic", "--hr-dir", "a", "--hr-dir", "b", "--scale", "2"])
    assert result.exit_code == 0, result.output
    assert seen["config"].hr_dirs == [Path("a"), Path("b")] and seen["config"].degradation.scale == 2
    assert set(SECTIONS) == {spec.section for spec in COMMANDS.values()}


def test_help_is_wide_in_a_pipe_and_flags_read_as_flags():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    shown = subprocess.run([sys.executable, "-m", "stages.cli", "evaluate", "--help"], capture_output=True,
                           text=True, check=True, env=env).stdout
    assert any(len(line) > 100 for line in shown.splitlines())
    assert "--ablations / --no-ablations" in shown and "--seed INT" in shown and "[default: 0]" in shown
    top = subprocess.run([sys.executable, "-m", "stages.cli", "--help"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert "--debug " in top and "--debug BOOL" not in top.upper().replace("<BOOL>", "BOOL")
