"""`dvc repro` of the whole authors' recipe (params-official.yaml: captions, training, inference) on the tiny zoo.

params-official.yaml points at real models and datasets, which CI does not have. So the test builds
a copy of the project in a temporary folder, writes its params.yaml as the embedded default's with
the authors' recipe values overlaid (xpsr_core.recipes.RECIPE_KEYS: what is recipe, not run),
runs the real `dvc repro` there and checks that every stage ran the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What the tiny zoo cannot take from params-official.yaml as it is:
# - caption.quality_model: the authors' quality captioner (a Q-Instruct model) is not in CI; the
#   tiny captioner stands in for it, so the caption stage still runs its separate-quality-model path.
# - evaluate.process_size: the official preset enlarges conditions to a 512 px short side (SD-1.5's
#   native size). The tiny zoo's native size is 128 px, and this run's validation HR crops are 128 px
#   (SMALL_RUN), so 512 would sample 16 times their area; 160 still runs the preset's
#   enlarge-then-resize-back path.
TINY_OVERRIDES = {"caption": {"quality_model": "models/tiny/captioner"}, "evaluate": {"process_size": 160}}
# The run's size is not the recipe: 128 px crops instead of the default's 256 (the tiny zoo's native size; training
# and sampling cost a quarter), 30 training steps instead of 100. 60 samples still show the 10 % HR conditioning,
# and checkpoints and validation grids still come twice.
SMALL_RUN = {
    "shard": {"crop_size": 128},
    "train": {"max_train_steps": 30, "checkpointing_steps": 15, "validation_steps": 15},
}

pytestmark = pytest.mark.slow


def project_files(repo: Path) -> list[str]:
    """The working tree's files as git sees them: tracked, plus untracked but not ignored, minus
    tests/fixtures (not needed) and dvc.lock (the lock of a run in the source tree; the copy starts
    with none, so every stage runs)."""
    listed = []
    for extra in ([], ["--others", "--exclude-standard"]):
        result = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *extra], capture_output=True, check=True)
        listed += [name for name in result.stdout.decode().split("\0") if name]
    return sorted({name for name in listed
                   if not name.startswith("tests/fixtures/") and name != "dvc.lock" and os.path.lexists(repo / name)})


def copy_project(repo: Path, target: Path) -> Path:
    """A copy of the working tree (uncommitted changes included), with DVC working without git."""
    for name in project_files(repo):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, destination, follow_symlinks=False)
    subprocess.run([str(BIN / "dvc"), "config", "core.no_scm", "true"], cwd=target, check=True, capture_output=True)
    return target


def official_tiny_params(project: Path) -> dict:
    """params.yaml with params-official.yaml's recipe overlaid (the run's paths, sizes and devices kept)."""
    from xpsr_core.recipes import overlay_recipe

    default = yaml.safe_load((project / "params.yaml").read_text())
    official = yaml.safe_load((project / "params-official.yaml").read_text())
    return overlay_recipe(default, official, overrides=TINY_OVERRIDES)


def dvc_repro(project: Path, timeout: float) -> subprocess.CompletedProcess:
    # tiny models run fastest on one thread (see conftest.one_torch_thread): with other processes on
    # the cores, OpenMP's spin-waiting threads stall sampling and training many times over
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")
    # its own process group, so a timeout also ends the stage dvc is running (not only dvc)
    process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"dvc repro ran past {timeout:.0f} s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the project's git checkout (git ls-files names what to copy)")
    project = copy_project(REPO, tmp_path_factory.mktemp("official-pipeline") / "project")
    params = official_tiny_params(project)
    for section, values in SMALL_RUN.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    result = dvc_repro(project, timeout=900)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, (
        f"dvc repro failed after {seconds:.0f} s:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return {"project": project, "params": params, "seconds": seconds, "stdout": result.stdout}


def test_recipe_overlay_keeps_the_run_and_takes_the_recipe():
    from xpsr_core.recipes import RECIPE_KEYS, overlay_recipe

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    official = yaml.safe_load((REPO / "params-official.yaml").read_text())
    params = overlay_recipe(default, official, overrides=TINY_OVERRIDES)
    # the run stays the default's: paths, sizes, step counts, devices, dtypes, mixed precision
    for section in ("demo_data", "models", "shard", "degrade", "embed"):
        assert params[section] == default[section]
    for section, names in RECIPE_KEYS.items():
        for key, value in default[section].items():
            if key not in names:
                assert params[section][key] == value, (section, key)
    assert (
        params["train"]["mixed_precision"] == "no"
        and params["train"]["max_train_steps"] == default["train"]["max_train_steps"]
    )
    assert params["caption"]["dtype"] == "float32" and params["caption"]["device"] == "auto"
    # the recipe is the authors'
    for section, names in RECIPE_KEYS.items():
        for key in names:
            if key in official.get(section, {}) and key not in TINY_OVERRIDES.get(section, {}):
                assert params[section][key] == official[section][key], (section, key)
    assert params["caption"]["quality_model"] == "models/tiny/captioner"
    assert params["caption"]["caption_hr"] is True
    assert params["train"]["fusion"] == "transformer" and params["train"]["init"] == "official"
    assert params["sr"]["preset"] == params["evaluate"]["preset"] == "official"
    # a recipe key the recipe does not state falls back to the field default, even if the target states it
    assert (
        "guidance_scale"
        not in overlay_recipe({"sr": {"guidance_scale": 7.0, "device": "cpu"}}, {"sr": {"preset": "official"}})["sr"]
    )
    # and nothing a params file has no section for is invented
    assert "sr" not in overlay_recipe({}, {"caption": {"caption_hr": True}})
    # the derived params validate as stage configs
    from stages.caption import CaptionConfig
    from stages.evaluate import EvaluateConfig
    from stages.sr import SRConfig
    from xpsr_core.config import resolve_config
    from xpsr_core.train.settings import TrainConfig

    for cls, section in (
        (CaptionConfig, "caption"),
        (TrainConfig, "train"),
        (SRConfig, "sr"),
        (EvaluateConfig, "evaluate"),
    ):
        resolve_config(cls, section, params)


def test_official_recipe_dvc_repro_on_the_tiny_zoo(official_run):
    import pandas as pd

    project, params = official_run["project"], official_run["params"]
    print(f"dvc repro with the authors' recipe: {official_run['seconds']:.0f} s")

    # caption: a separate quality captioner with the authors' instruction, and HR quality captions
    manifests = sorted((project / "manifests/captions").glob("*.parquet"))
    assert manifests
    captions = pd.concat([pd.read_parquet(m) for m in manifests])
    assert len(captions) and (captions["status"] == "ok").all()
    assert {"hr_quality_caption", "content_captioner", "quality_captioner"} <= set(captions.columns)
    assert captions["hr_quality_caption"].notna().all()
    assert (captions["quality_captioner"] == "models/tiny/captioner").all()
    assert (captions["quality_instruction"] == params["caption"]["quality_instruction"]).all()
    assert params["caption"]["quality_instruction"] == "Describe and evaluate the quality of the image."

    # embed: every training sample carries the HR image's quality embedding
    import tarfile

    tars = sorted((project / "data/shards/train").glob("*.tar"))
    assert tars
    for path in tars:
        with tarfile.open(path) as tar:
            names = tar.getnames()
        keys = {n.split(".", 1)[0] for n in names if n.endswith(".lr.png")}
        assert keys and all(f"{k}.hr_quality.npy" in names for k in keys), path

    # train: the authors' DFC heads (13 latent + 3 pixel), HR conditioning, and architecture
    log = pd.read_csv(project / "models/xpsr/train_log.tsv", sep="\t")
    assert len([c for c in log.columns if c.startswith("dfc_latent_")]) == 13
    assert len([c for c in log.columns if c.startswith("dfc_pixel_")]) == 3
    assert "hr_condition_share" in log.columns
    assert log["step"].max() == params["train"]["max_train_steps"]
    assert log["loss"].notna().all()
    assert 0 < log["hr_condition_share"].mean() < 0.5  # p = 0.1 of 60 samples
    assert (log["lr"] == params["train"]["learning_rate"]).all()  # constant schedule, no warmup
    settings = json.loads((project / "models/xpsr/final/xpsr.json").read_text())["settings"]
    assert (
        settings
        | {
            "fusion": "transformer",
            "conditional_attention_type": "transformer",
            "dfc_latent_heads": "residuals",
            "dfc_target_resize": "bilinear",
            "init": "official",
        }
        == settings
    )
    train_config = json.loads((project / "models/xpsr/config.json").read_text())["config"]
    for key in ("use_high_prompt", "hr_condition_probability", "lr_scheduler", "dfc_weight", "max_grad_norm"):
        assert train_config[key] == params["train"][key], key

    # evaluate: the official preset's sampling values, recorded with the outputs
    from xpsr_core.infer.presets import preset_values

    official = preset_values("official")
    evaluated = json.loads((project / "metrics/eval/config.json").read_text())["config"]
    assert evaluated["preset"] == "official"
    expected = {**official, **{k: v for k, v in params["evaluate"].items() if k in official}}
    assert {k: evaluated[k] for k in official} == expected
    assert evaluated["guidance_scale"] == 4.5 and evaluated["start_latent"] == "sample" and evaluated["seed"] is None
    assert (
        evaluated["added_noise_level"] == 800
        and evaluated["generator_scope"] == "run"
        and evaluated["process_size"] == 160
    )
    assert evaluated["crop_border"] == 0, "the authors' metric protocol comes with their recipe"
    details = json.loads((project / "metrics/eval/metric_details.json").read_text())
    assert details["methods"]["xpsr"]["images"] > 0 and details["methods"]["xpsr"]["failed"] == 0
    assert "psnr_y" in json.loads((project / "metrics/eval/metrics.json").read_text())["xpsr"]
    per_image = pd.read_parquet(project / "metrics/eval/per_image.parquet")
    assert (per_image["status"] == "ok").all()
    assert len(list((project / "metrics/eval/sr/xpsr").glob("*.png"))) == (per_image["method"] == "xpsr").sum()

    # a second `dvc repro` has nothing to do
    again = dvc_repro(project, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Running stage" not in again.stdout, again.stdout[-4000:]
    assert "up to date" in again.stdout, again.stdout[-4000:]
