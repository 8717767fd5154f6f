"""Evaluation: PSNR/SSIM against basicsr, optional metrics reported honestly, the evaluate stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo


def _basicsr_metrics():
    import xpsr_core.degrade.compat  # noqa: F401  (installs the torchvision alias basicsr 1.4.2 needs)
    from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim

    return calculate_psnr, calculate_ssim


@pytest.mark.parametrize("shape,crop", [((64, 64, 3), 4), ((67, 53, 3), 2), ((40, 96, 3), 0)])
def test_psnr_ssim_equal_basicsr(shape, crop):
    from xpsr_core.metrics import psnr_y, ssim_y

    calculate_psnr, calculate_ssim = _basicsr_metrics()
    reference = photo("astronaut", (shape[1], shape[0]))
    rng = np.random.default_rng(shape[0])
    degraded = np.clip(reference.astype(np.int16) + rng.integers(-25, 26, reference.shape), 0, 255).astype(np.uint8)
    # basicsr reads images with OpenCV (BGR); ours are RGB, so basicsr gets the channel-reversed arrays
    expected_psnr = calculate_psnr(degraded[..., ::-1], reference[..., ::-1], crop, test_y_channel=True)
    expected_ssim = calculate_ssim(degraded[..., ::-1], reference[..., ::-1], crop, test_y_channel=True)
    assert psnr_y(degraded, reference, crop) == pytest.approx(expected_psnr, abs=1e-6)
    assert ssim_y(degraded, reference, crop) == pytest.approx(expected_ssim, abs=1e-6)
    assert psnr_y(reference, reference, crop) == calculate_psnr(reference, reference, crop, test_y_channel=True) == float("inf")
    assert ssim_y(reference, reference, crop) == pytest.approx(1.0, abs=1e-9)


def test_optional_metrics_without_weights_are_not_computed_with_a_reason(tmp_path):
    from xpsr_core.metrics import OPTIONAL_METRICS, prepare_metrics

    paths = {name: str(tmp_path / "absent" / name) for name in OPTIONAL_METRICS}
    paths["musiq"] = None
    runs = prepare_metrics(OPTIONAL_METRICS, paths)
    assert [r.name for r in runs] == ["lpips", "dists", "fid", "maniqa", "musiq", "clipiqa"]
    for run in runs:
        assert not run.computed and run.metric is None
        assert run.reason and (str(tmp_path) in run.reason or "no weights path" in run.reason)
    # weights present but no implementation installed: the reason says so
    (tmp_path / "dists.pt").write_bytes(b"x")
    (dists,) = prepare_metrics(["dists"], {"dists": str(tmp_path / "dists.pt")})
    assert not dists.computed and "pyiqa" in dists.reason


def test_lpips_runs_from_local_weight_files(tmp_path):
    """LPIPS from a local VGG-16 state dict and linear-layer file (random here: no real weights offline)."""
    import torchvision

    from xpsr_core.metrics import prepare_metrics

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16-test.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "vgg.pth")
    (lpips,) = prepare_metrics(["lpips"], {"lpips": str(tmp_path)})
    assert lpips.computed, lpips.reason
    image = photo("coffee", (64, 64))
    other = photo("rocket", (64, 64))
    assert lpips.metric(image, image) == pytest.approx(0.0, abs=1e-7)
    assert lpips.metric(image, other) > 0
    # a broken weights file is reported, not fatal
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "vgg.pth")
    (broken,) = prepare_metrics(["lpips"], {"lpips": str(tmp_path)})
    assert not broken.computed and "failed" in broken.reason


@pytest.fixture
def folder_pairs(tmp_path):
    """HR photographs, their x4 bicubic LR, and 'SR' images (bicubic back up) in three folders."""
    roots = {name: tmp_path / name for name in ("lr", "hr", "sr")}
    for root in roots.values():
        (root / "sub").mkdir(parents=True)
    names = ["astronaut", "sub/coffee", "chelsea"]
    for name, sample in zip(names, ["astronaut", "coffee", "chelsea"]):
        hr = photo(sample, (64, 48))
        lr = Image.fromarray(hr).resize((16, 12), Image.BICUBIC)
        lr.save(roots["lr"] / f"{name}.png")
        Image.fromarray(hr).save(roots["hr"] / f"{name}.png")
        lr.resize((64, 48), Image.BICUBIC).save(roots["sr"] / f"{name}.png")
    return roots, names


def test_evaluate_existing_sr_folder(folder_pairs, tmp_path):
    import pandas as pd

    from stages import evaluate
    from xpsr_core.metrics import psnr_y, ssim_y

    roots, names = folder_pairs
    report = evaluate.run(evaluate.EvaluateConfig(lr_dir=roots["lr"], hr_dir=roots["hr"], sr_dir=roots["sr"], out=tmp_path / "eval",
                                                  metric_weights={}, grid_images=2))
    table = pd.read_parquet(tmp_path / "eval" / "per_image.parquet")
    assert sorted(table["key"]) == sorted(names) and (table["status"] == "ok").all()
    for name in names:
        sr = np.asarray(Image.open(roots["sr"] / f"{name}.png").convert("RGB"))
        hr = np.asarray(Image.open(roots["hr"] / f"{name}.png").convert("RGB"))
        row = table[table["key"] == name].iloc[0]
        assert row["psnr_y"] == pytest.approx(psnr_y(sr, hr, 4)) and row["ssim_y"] == pytest.approx(ssim_y(sr, hr, 4))
    numbers = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in numbers.values()), "metrics.json holds numbers only"
    metrics = {**numbers, **json.loads((tmp_path / "eval" / "metric_details.json").read_text())}
    assert metrics["images"] == 3 and metrics["crop_border"] == 4
    assert metrics["psnr_y"] == pytest.approx(table["psnr_y"].mean())
    assert metrics["metrics"]["ssim_y"]["value"] == pytest.approx(table["ssim_y"].mean())
    for name in ("lpips", "dists", "fid", "maniqa", "musiq", "clipiqa"):
        entry = metrics["metrics"][name]
        assert entry["computed"] is False and entry["reason"] and "value" not in entry and name not in metrics
        assert metrics["not_computed"][name] == entry["reason"]
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (3 * 64 + 2 * 4, 2 * 48 + 4)
    assert report["images"] == 3


def test_make_grid_places_lr_sr_hr_side_by_side():
    from xpsr_core.infer import make_grid

    lr_up, sr, hr = (np.full((20, 30, 3), v, np.uint8) for v in (10, 120, 250))
    grid = np.asarray(make_grid(lr_up, sr, Image.fromarray(hr).resize((15, 10))))
    assert grid.shape == (20, 3 * 30 + 2 * 4, 3)
    assert (grid[:, :30] == 10).all() and (grid[:, 34:64] == 120).all() and (grid[:, 68:] >= 249).all()


def test_evaluate_runs_the_pipeline_on_pair_shards(tiny_models, pair_shards, tmp_path):
    import pandas as pd

    from stages import evaluate
    from xpsr_core.models.xpsr import XPSRModel

    checkpoint = XPSRModel.from_base(tiny_models.sd, with_dfc=False).save_trainable(tmp_path / "run" / "final")
    report = evaluate.run(evaluate.EvaluateConfig(
        pairs_dir=pair_shards, out=tmp_path / "eval", base_model=str(tiny_models.sd), xpsr=str(checkpoint.parent),
        captions="given", content_caption="a photograph", quality_caption="blurry", steps=1, limit=3, grid_images=3,
    ))
    table = pd.read_parquet(tmp_path / "eval" / "per_image.parquet")
    assert len(table) == 3 and (table["status"] == "ok").all()
    assert table["psnr_y"].notna().all() and table["ssim_y"].between(-1, 1).all()
    assert (table["content_caption"] == "a photograph").all()
    assert report["images"] == 3 and report["psnr_y"] == pytest.approx(table["psnr_y"].mean())
    assert len(list((tmp_path / "eval" / "sr").glob("*.png"))) == 3
    assert Image.open(tmp_path / "eval" / "grid.png").size == (3 * 96 + 8, 3 * 96 + 8)


def test_evaluate_cli_missing_checkpoint(tiny_models, pair_shards, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--pairs", str(pair_shards), "--out", "eval", "--base-model",
                                      str(tiny_models.sd), "--xpsr", "nowhere/final", "--captions", "given"])
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code != 0 and "Traceback" not in text and "nowhere/final does not exist" in text
