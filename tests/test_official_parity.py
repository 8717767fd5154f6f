"""Known answers from the authors' own code (tests/fixtures/official, made by tools/official_reference.py).

Their tiny checkpoint goes through ``import_official``; then the model forward, one training loss
and ``xpsr sr --preset official`` must give what their ControlNet/UNet, train.py and test.py gave.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xpsr_core.models import XPSRModel, load_base_sd, training_loss  # noqa: E402
from xpsr_core.models.official import import_official  # noqa: E402
from xpsr_core.zoo import write_clip_tokenizer  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "official"
ATOL = RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """Their base folder (plus our deterministic CLIP tokenizer) and their checkpoint, imported."""
    root = tmp_path_factory.mktemp("official-parity")
    base = root / "base"
    shutil.copytree(FIXTURE / "base", base)
    write_clip_tokenizer(base / "tokenizer")
    summary = import_official(FIXTURE / "checkpoint", base, root / "imported")
    assert summary.base_max_abs_diff == 0.0 and not summary.used_checkpoint_unet
    return root / "imported"


@pytest.fixture(scope="module")
def model(imported) -> XPSRModel:
    unet = load_base_sd(imported, components=("unet",)).unet
    return XPSRModel.load_trainable(imported / "xpsr", unet).eval()


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    diff = (got.float() - expected.float()).abs()
    bound = atol + rtol * expected.float().abs()
    assert bool((diff <= bound).all()), f"{name}: max abs diff {diff.max().item():.3g}"


@pytest.mark.parametrize("run", ["f1", "f2"])
def test_forward_matches_the_authors_controlnet_and_unet(model, run):
    known = load_file(str(FIXTURE / "forward.safetensors"))
    spec = next(r for r in json.loads((FIXTURE / "forward.json").read_text())["runs"] if r["prefix"] == run)
    scale = spec["conditioning_scale"]
    inputs = {k[len(run) + 4:]: v for k, v in known.items() if k.startswith(f"{run}.in.")}
    condition = inputs["cond_u8"].float().div(255)
    with torch.no_grad():
        cn = model.controlnet(inputs["sample"], inputs["timestep"], inputs["c_h"], condition,
                              low_level_hidden_states=inputs["c_l"], conditioning_scale=scale, return_features=True)
        eps = model(
            inputs["sample"], inputs["timestep"], inputs["c_h"], inputs["c_l"], condition, conditioning_scale=scale
        ).sample
        pixels, latents = model.dfc_heads(cn.pixel_features, model.dfc_heads.latent_inputs(cn))
    assert len(cn.down_block_res_samples) == 12 and len(latents) == 13 and len(pixels) == 3
    for i, residual in enumerate(cn.down_block_res_samples):
        assert_close(f"down_res.{i:02d}", residual, known[f"{run}.cn.down_res.{i:02d}"])
    assert_close("mid_res", cn.mid_block_res_sample, known[f"{run}.cn.mid_res"])
    for i, latent in enumerate(latents[:-1]):
        assert_close(f"latent_dfc.{i:02d}", latent, known[f"{run}.cn.latent_dfc.{i:02d}"])
    assert_close("latent_dfc_mid", latents[-1], known[f"{run}.cn.latent_dfc_mid"])
    for i, rgb in enumerate(pixels):
        assert_close(f"rgb.{i}", rgb, known[f"{run}.cn.rgb.{i}"])
    assert_close("eps", eps, known[f"{run}.unet.eps"])


def test_training_loss_matches_the_authors_train_py_term_by_term(model):
    known = load_file(str(FIXTURE / "train_loss.safetensors"))
    spec = json.loads((FIXTURE / "train_loss.json").read_text())
    hr = known["hr_u8"].float().div(255) * 2 - 1
    condition = known["lr_u8"].float().div(255)
    with torch.no_grad():
        out = model(known["noisy_latents"], known["timesteps"], known["c_h"], known["c_l"], condition,
                    hr_image=hr, hr_latent=known["latents"], return_dfc=True)
        _, logs = training_loss(out.sample, known["noise"], out.dfc, 0.05)
    ours = {f"rgb.{i}": logs[f"dfc_pixel_{i}"] for i in range(3)}
    ours.update({f"latent_dfc.{i:02d}": logs[f"dfc_latent_{i}"] for i in range(12)})
    ours["latent_dfc_mid"] = logs["dfc_latent_12"]
    assert len(spec["terms"]) == 16 == len(out.dfc.terms)
    for term in spec["terms"]:
        assert ours[term["name"]] == pytest.approx(term["l1"], rel=1e-4, abs=1e-5), term["name"]
    assert logs["loss_eps"] == pytest.approx(known["mse_loss"].item(), rel=1e-4, abs=1e-5)
    assert logs["loss"] == pytest.approx(known["loss"].item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("case", ["A", "B"])
def test_sr_official_preset_reproduces_the_authors_final_image(imported, case, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    folder = FIXTURE / f"pipeline_{case}"
    spec = json.loads((folder / "case.json").read_text())
    args = [
        "sr",
        str(folder / "lr.png"),
        "--pipeline",
        str(imported),
        "--preset",
        "official",
        "--out",
        str(tmp_path / "out"),
        "--captions",
        "given",
        "--content",
        spec["highlevel_prompt_file"],
        "--quality",
        spec["lowlevel_prompt_file"],
        "--process-size",
        str(spec["settings"]["process_size"]),
    ]
    if spec["seed"] is not None:
        args += ["--seed", str(spec["seed"])]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    ours = np.asarray(Image.open(next((tmp_path / "out").glob("*.png"))).convert("RGB")).astype(int)
    theirs = np.asarray(Image.open(folder / "sr.png").convert("RGB")).astype(int)
    assert ours.shape == theirs.shape
    off = np.abs(ours - theirs) > 2
    print(f"case {case}: max |diff| {np.abs(ours - theirs).max()}, share above 2/255 {off.mean():.5f}")
    assert off.mean() <= 0.001, f"{off.mean():.4%} of values differ by more than 2/255"
    assert json.dumps(sidecar)  # the sidecar records the run
