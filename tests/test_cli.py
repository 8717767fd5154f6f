"""The command line: fast help, and user errors as one message with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stages.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def outside_the_project(tmp_path, monkeypatch):
    """Run where no params.yaml exists, so only the defaults and the options given apply."""
    monkeypatch.chdir(tmp_path)


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_user_error(result, *fragments: str) -> None:
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code != 0, text
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Error:" in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


@pytest.mark.parametrize("argv", [["--help"], ["shard", "--help"], ["degrade", "--help"], []])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys; from typer.testing import CliRunner; from stages.cli import app; "
        f"r = CliRunner().invoke(app, {argv!r}); "
        "assert 'Usage' in r.output, r.output; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'basicsr') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(root)})


def test_missing_input_folder(tmp_path):
    assert_user_error(invoke("shard", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")), "does not exist")


def test_bad_value(tmp_path):
    (tmp_path / "in").mkdir()
    result = invoke("shard", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--crop-mode", "diagonal")
    assert_user_error(result, "crop_mode", "diagonal")
    assert_user_error(invoke("shard", str(tmp_path / "in"), "--crop-size", "-3"), "crop_size")


def test_malformed_override_and_params(tmp_path):
    assert_user_error(invoke("shard", "--set", "crop_size"), "name=value")
    assert_user_error(invoke("shard", "--params", str(tmp_path / "missing.yaml")), "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard: [unclosed\n")
    assert_user_error(invoke("shard", "--params", str(bad)), "not valid YAML")
    assert_user_error(invoke("shard", "--set", "no_such_field=1", str(tmp_path)), "no_such_field")


def test_unwritable_output(photo_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(invoke("shard", str(photo_dir), "--out", str(blocker / "out")), "Cannot write")


def test_failure_ratio_is_a_clean_error(bad_corpus, tmp_path):
    result = invoke(
        "shard",
        str(bad_corpus),
        "--out",
        str(tmp_path / "out"),
        "--set",
        "max_failure_ratio=0.2",
        "--set",
        "min_size=8",
    )
    assert_user_error(result, "failed", "max_failure_ratio")


@pytest.mark.parametrize("flag", ["--input-dir", "--in"])  # --in: the old name, kept for a release
def test_degrade_needs_finished_shards(tmp_path, flag):
    (tmp_path / "empty").mkdir()
    result = invoke("degrade", flag, str(tmp_path / "empty"), "--out", str(tmp_path / "pairs"))
    assert_user_error(result, "xpsr shard")
    assert "point --input-dir at" in result.output, "the hint names the option as it is now"
    assert ("--in is deprecated and will be removed: use --input-dir" in result.output) == (flag == "--in")


def test_debug_flag_shows_the_traceback(tmp_path):
    from xpsr_core.errors import UserError

    result = invoke("--debug", "shard", str(tmp_path / "nowhere"))
    assert isinstance(result.exception, UserError)


def test_shard_command_end_to_end(photo_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("shard", f"mine={photo_dir}", "--out", str(out), "--crop-size", "32", "--images-per-shard", "3")
    assert result.exit_code == 0, result.output
    import json

    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["crop_size"] == 32 and saved["config"]["inputs"][0]["dataset"] == "mine"
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3}


def test_demo_data_holds_out_validation_photographs(tmp_path):
    import numpy as np
    from PIL import Image

    from stages.demo_data import DEMO_IMAGES, load_sample

    result = invoke("demo-data", "--out", str(tmp_path / "train"), "--set", f"val_out={tmp_path / 'val'}")
    assert result.exit_code == 0, result.output
    train = sorted(p.stem for p in (tmp_path / "train").glob("*.png"))
    val = sorted(p.stem for p in (tmp_path / "val").glob("*.png"))
    assert val == ["chelsea", "coffee"] and not set(val) & set(train)
    assert sorted(train + val) == sorted(DEMO_IMAGES)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "val" / "coffee.png")), load_sample("coffee"))


def test_every_params_file_resolves_for_every_stage():
    """params.yaml and the paper preset validate against the stage configs (no typo survives)."""
    from pathlib import Path

    from stages import caption, degrade, demo_data, embed, evaluate, models, shard, sr, train
    from xpsr_core.config import load_params, resolve_config

    sections = {
        "demo_data": demo_data.DemoDataConfig, "models": models.ModelsConfig, "shard": shard.ShardConfig,
        "degrade": degrade.DegradeConfig, "caption": caption.CaptionConfig, "embed": embed.EmbedConfig,
        "train": train.TrainConfig, "sr": sr.SRConfig, "evaluate": evaluate.EvaluateConfig,
    }
    root = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "params-paper.yaml"):
        params = load_params(root / name)
        assert set(params) <= set(sections), f"{name} has unknown sections {set(params) - set(sections)}"
        for section in params:
            resolve_config(sections[section], section, params)
    paper = load_params(root / "params-paper.yaml")
    assert paper["train"]["learning_rate"] == 5e-5 and paper["train"]["weight_decay"] == 0.01
    assert paper["shard"]["crop_size"] == 512 and paper["train"]["dfc_weight"] == 0.05


def test_demo_data_out_alone_keeps_the_held_out_photographs_beside_it(tmp_path):
    result = invoke("demo-data", "--out", "mine/photos", "--set", "images=[astronaut,coffee]",
                    "--set", "val_images=[coffee]")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "nothing written outside the folder named"
    assert [p.name for p in (tmp_path / "mine" / "photos").glob("*.png")] == ["astronaut.png"]
    assert [p.name for p in (tmp_path / "mine" / "photos-val").glob("*.png")] == ["coffee.png"]
