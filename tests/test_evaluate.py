"""The evaluate stage: several methods on the same pairs, the comparison report, the inference-time ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo

Y_METRICS = ["psnr_y", "ssim_y"]


@pytest.fixture
def folder_pairs(tmp_path):
    """HR photographs, their x4 bicubic LR, and 'SR' images made elsewhere (a blurred HR) in three folders."""
    from PIL import ImageFilter

    roots = {name: tmp_path / name for name in ("lr", "hr", "other")}
    for root in roots.values():
        (root / "sub").mkdir(parents=True)
    names = ["astronaut", "sub/coffee", "chelsea"]
    for name, sample in zip(names, ["astronaut", "coffee", "chelsea"]):
        hr = Image.fromarray(photo(sample, (64, 48)))
        hr.resize((16, 12), Image.BICUBIC).save(roots["lr"] / f"{name}.png")
        hr.save(roots["hr"] / f"{name}.png")
        hr.filter(ImageFilter.GaussianBlur(1.2)).save(roots["other"] / f"{name}.png")
    return roots, names


def _rrdbnet_weights(path, seed=0):
    """A small random RRDBNet in the state-dict layout of RealESRGAN_x4plus.pth."""
    from xpsr_core.degrade.compat import RRDBNet  # basicsr 1.4.2 needs its torchvision alias first

    torch.manual_seed(seed)
    network = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=4, scale=4)
    torch.save({"params_ema": network.state_dict()}, path)
    return path


def test_evaluate_scores_folder_results_against_bicubic(folder_pairs, tmp_path):
    import pandas as pd

    from stages import evaluate
    from xpsr_core.evaluation.baselines import bicubic_upscale
    from xpsr_core.metrics import psnr_y, ssim_y

    roots, names = folder_pairs
    out = tmp_path / "eval"
    report = evaluate.run(
        evaluate.EvaluateConfig(
            lr_dir=roots["lr"],
            hr_dir=roots["hr"],
            out=out,
            metrics=Y_METRICS + ["lpips", "fid"],
            metric_weights_dir=tmp_path / "no-weights",
            grid_images=2,
            methods=[
                {"name": "bicubic", "kind": "bicubic"},
                {"name": "Other", "kind": "folder", "path": str(roots["other"])},
                {"name": "realesrgan", "kind": "realesrgan", "path": str(tmp_path / "missing.pth")},
            ],
        )
    )
    table = pd.read_parquet(out / "per_image.parquet")
    assert sorted(table["method"].unique()) == ["Other", "bicubic"] and (table["status"] == "ok").all()
    for name in names:
        hr = np.asarray(Image.open(roots["hr"] / f"{name}.png").convert("RGB"))
        lr = np.asarray(Image.open(roots["lr"] / f"{name}.png").convert("RGB"))
        other = np.asarray(Image.open(roots["other"] / f"{name}.png").convert("RGB"))
        for method, sr in (("bicubic", bicubic_upscale(lr, 4)), ("Other", other)):
            row = table[(table["key"] == name) & (table["method"] == method)].iloc[0]
            assert row["psnr_y"] == pytest.approx(psnr_y(sr, hr, 4)) and row["ssim_y"] == pytest.approx(
                ssim_y(sr, hr, 4)
            )
        assert (out / "sr" / "Other" / f"{name}.png").is_file()
    numbers = json.loads((out / "metrics.json").read_text())
    for method in ("bicubic", "Other"):
        assert numbers[method]["psnr_y"] == pytest.approx(table[table["method"] == method]["psnr_y"].mean())
        assert "lpips" not in numbers[method] and "fid" not in numbers[method], "not computed is never a number"
    details = json.loads((out / "metric_details.json").read_text())
    assert details["crop_border"] == 4 and details["methods"]["Other"]["images"] == 3
    assert (
        details["methods"]["realesrgan"]["ran"] is False
        and "missing.pth is missing" in details["methods"]["realesrgan"]["reason"]
    )
    for name in ("lpips", "fid"):
        assert details["metrics"][name]["computed"] is False and "no-weights" in details["metrics"][name]["reason"]
    markdown = (out / "table.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["bicubic", "Other"]
    assert "n/c" in markdown
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == ["astronaut.png", "chelsea.png"]
    assert report["counts"] == {"bicubic": {"images": 3, "failed": 0}, "Other": {"images": 3, "failed": 0}}


def test_folder_method_reports_missing_results_per_pair(folder_pairs, tmp_path):
    import pandas as pd

    from stages import evaluate

    roots, _ = folder_pairs
    (roots["other"] / "chelsea.png").unlink()
    evaluate.run(
        evaluate.EvaluateConfig(
            lr_dir=roots["lr"],
            hr_dir=roots["hr"],
            out=tmp_path / "eval",
            metrics=Y_METRICS,
            methods=[{"name": "Other", "kind": "folder", "path": str(roots["other"])}],
        )
    )
    table = pd.read_parquet(tmp_path / "eval" / "per_image.parquet").set_index("key")
    assert table.loc["chelsea", "status"] == "error" and "no image for chelsea" in table.loc["chelsea", "error"]
    assert (table.drop("chelsea")["status"] == "ok").all()


@pytest.fixture(scope="module")
def xpsr_checkpoint(tiny_models, tmp_path_factory):
    """A tiny XPSR whose ControlNet and SFA are not at their zero initialisation (so prompts matter)."""
    from xpsr_core.models.xpsr import XPSRModel

    model = XPSRModel.from_base(tiny_models.sd, with_dfc=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.save_trainable(tmp_path_factory.mktemp("run") / "final")


def test_report_compares_bicubic_a_random_rrdbnet_and_tiny_xpsr(tiny_models, pair_shards, xpsr_checkpoint, tmp_path):
    import pandas as pd

    from stages import evaluate
    from xpsr_core.evaluation.report import rank_marks

    weights = _rrdbnet_weights(tmp_path / "RealESRGAN_x4plus.pth")
    out = tmp_path / "eval"
    report = evaluate.run(
        evaluate.EvaluateConfig(
            input_dir=pair_shards,
            out=out,
            base_model=str(tiny_models.sd),
            xpsr=str(xpsr_checkpoint),
            captions="given",
            content_caption="a photograph",
            quality_caption="blurry",
            steps=2,
            limit=3,
            grid_images=2,
            metrics=Y_METRICS,
            methods=[
                {"name": "bicubic", "kind": "bicubic"},
                {"name": "realesrgan", "kind": "realesrgan", "path": str(weights)},
                {"name": "xpsr", "kind": "xpsr"},
            ],
        )
    )
    assert report["counts"] == {m: {"images": 3, "failed": 0} for m in ("bicubic", "realesrgan", "xpsr")}
    table = pd.read_parquet(out / "per_image.parquet")
    means = table.groupby("method")["psnr_y"].mean()
    assert len(set(np.round(means.values, 6))) == 3, "each method gives its own values"
    numbers = json.loads((out / "metrics.json").read_text())
    for metric in Y_METRICS:
        values = {m: numbers[m][metric] for m in ("bicubic", "realesrgan", "xpsr")}
        marks = rank_marks(values, higher_is_better=True)
        ordered = sorted(values, key=values.get, reverse=True)
        assert marks[ordered[0]] == "best" and marks[ordered[1]] == "second" and marks[ordered[2]] == ""
        row = next(
            line for line in (out / "table.md").read_text().splitlines() if line.startswith(f"| {report_label(metric)}")
        )
        cells = dict(zip(["bicubic", "realesrgan", "xpsr"], [c.strip() for c in row.strip("|").split("|")[1:4]]))
        assert (
            cells[ordered[0]].startswith("**")
            and cells[ordered[1]].startswith("_")
            and not cells[ordered[2]].startswith(("*", "_"))
        )
    grid = Image.open(next((out / "grids").glob("*.png")))
    assert grid.size[0] >= 5 * 96, "LR | three methods | HR"


def report_label(metric: str) -> str:
    from xpsr_core.metrics import METRICS

    return METRICS[metric].label


def test_ablations_change_the_prompts_the_model_sees(tiny_models, pair_shards, xpsr_checkpoint, tmp_path, monkeypatch):
    from stages import evaluate
    from xpsr_core.infer.pipeline import XPSRPipeline

    seen: list[tuple[list[str], torch.Tensor]] = []
    encode = XPSRPipeline.encode_text

    def recording(self, texts):
        embeddings = encode(self, texts)
        seen.append((list(texts), embeddings.clone()))
        return embeddings

    monkeypatch.setattr(XPSRPipeline, "encode_text", recording)
    out = tmp_path / "eval"
    evaluate.run(evaluate.EvaluateConfig(
        input_dir=pair_shards, out=out, base_model=str(tiny_models.sd), xpsr=str(xpsr_checkpoint), captions="given",
        content_caption="a photograph of a cat", quality_caption="blurry and noisy", steps=1, limit=1, grid_images=1,
        metrics=Y_METRICS, methods=[{"name": "xpsr", "kind": "xpsr"}], ablations=True,
    ))
    calls = [c for c in seen if len(c[0]) >= 3]  # one sampling per method: [c_h, c_l, c_neg]
    assert len(calls) == 5
    by_method = dict(zip(["xpsr", "xpsr-no-high", "xpsr-no-low", "xpsr-no-prompts", "xpsr-no-negative"], calls))
    full_texts, full = by_method["xpsr"]
    assert full_texts[:2] == ["a photograph of a cat", "blurry and noisy"]
    pipe = XPSRPipeline.from_pretrained(base_model=str(tiny_models.sd), xpsr=str(xpsr_checkpoint))
    empty = encode(pipe, [""])[0]

    def same(a, b):
        return torch.allclose(a, b, atol=1e-6)

    _, no_high = by_method["xpsr-no-high"]
    assert same(no_high[0], empty) and not same(no_high[0], full[0]) and same(no_high[1], full[1])
    _, no_low = by_method["xpsr-no-low"]
    assert same(no_low[1], empty) and same(no_low[0], full[0]) and not same(no_low[1], full[1])
    _, no_prompts = by_method["xpsr-no-prompts"]
    assert same(no_prompts[0], empty) and same(no_prompts[1], empty)
    _, no_negative = by_method["xpsr-no-negative"]
    assert same(no_negative[2], empty) and not same(full[2], empty) and same(no_negative[0], full[0])
    outputs = {m: np.asarray(Image.open(next((out / "sr" / m).glob("*.png")))) for m in by_method}
    assert not np.array_equal(outputs["xpsr"], outputs["xpsr-no-high"]), "what the model is told changes its output"


def test_parse_method_forms():
    from xpsr_core.errors import UserError
    from xpsr_core.evaluation.methods import parse_method

    assert parse_method("bicubic").model_dump() == {
        "name": "bicubic",
        "kind": "bicubic",
        "path": None,
        "ablation": "none",
    }
    assert parse_method("realesrgan:w/x4.pth").path == "w/x4.pth"
    seesr = parse_method("SeeSR=folder:results/seesr")
    assert (seesr.name, seesr.kind, seesr.path) == ("SeeSR", "folder", "results/seesr")
    ablated = parse_method("xpsr-no-low")
    assert (ablated.name, ablated.kind, ablated.ablation) == ("xpsr-no-low", "xpsr", "no_low")
    for bad in ("sharp", "x=folder", "bad name=bicubic"):
        with pytest.raises(UserError):
            parse_method(bad)


def test_evaluate_cli_missing_checkpoint(tiny_models, pair_shards, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--input-dir", str(pair_shards), "--out", "eval", "--base-model",
                                      str(tiny_models.sd), "--xpsr", "nowhere/final", "--captions", "given"])
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code != 0 and "Traceback" not in text and "nowhere/final does not exist" in text


def test_evaluate_cli_methods_reach_the_config(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from stages import evaluate
    from stages.cli import app

    captured = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "run", captured.append)
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--method",
            "bicubic",
            "--method",
            "SeeSR=folder:elsewhere",
            "--ablations",
            "--metric",
            "psnr",
            "--crop-border",
            "0",
            "--steps",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    config = captured[0]
    assert [m.name for m in config.methods] == ["bicubic", "SeeSR"] and config.ablations
    assert config.metrics == ["psnr"] and config.crop_border == 0 and config.steps == 3
