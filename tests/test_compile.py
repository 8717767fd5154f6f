"""torch.compile in training on the tiny zoo: losses equal eager, no recompiles after the first step, no graph
breaks, plain checkpoints, DDP on two gloo ranks. Compiling costs about a minute per model on a small CPU, so the
runs share one inductor cache and stay a few steps long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from stages import train as train_stage
from xpsr_core.compiling import compiled_graph_count, graph_break_count, inductor_cache_dir
from xpsr_core.train.loop import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.compile]


@pytest.fixture(autouse=True)
def fresh_state():
    """Each run builds its own Accelerator (accelerate keeps one global state) and starts with dynamo's
    counters at zero."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()
    counters.clear()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """A fresh inductor cache, or the one XPSR_TEST_INDUCTOR_CACHE names (kept between test runs: warm compiles)."""
    kept = os.environ.get("XPSR_TEST_INDUCTOR_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("inductor")


def make_config(tiny_models, train_shards, out, **changes) -> train_stage.TrainConfig:
    values = dict(
        input_dir=train_shards, out=out, base_model=str(tiny_models.sd), batch_size=2, max_train_steps=5,
        checkpointing_steps=5, shuffle_buffer=4, tensorboard=False, metrics_file=None, device="cpu",
    )
    values.update(changes)
    return train_stage.TrainConfig(**values)


def run_counting(config: train_stage.TrainConfig) -> tuple[dict, list[dict], list[int]]:
    """Trains; returns the report, every step's log row and the compiled-graph count after each step."""
    trainer = Trainer(config, train_stage.prepare_run_dir)
    rows: list[dict] = []
    log_rows = trainer._log_rows
    trainer._log_rows = lambda new, path: (rows.extend(new), log_rows(new, path))
    graphs: list[int] = []
    report = trainer.train(after_step=lambda step: graphs.append(compiled_graph_count()))
    return report, rows, graphs


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{file.parent.name}/{name}": value for file in sorted((run_dir / "final").rglob("*.safetensors"))
            for name, value in load_file(file).items()}


def checkpoint_keys(run_dir: Path, step: int) -> set[str]:
    keys = set()
    for file in (run_dir / f"checkpoint-{step}").rglob("*.safetensors"):
        keys |= set(load_file(file))
    return keys


def test_regional_compile_trains_like_eager(tiny_models, train_shards, tmp_path, compile_cache):
    """fp32, gradient accumulation, validation during training: the same losses as eager within 1e-5 relative,
    graphs compiled in the first step only, no graph break, and the checkpoint and export of an eager run."""
    changes = dict(gradient_accumulation_steps=2, validation_steps=5, validation_samples=2,
                   validation_inference_steps=2)
    eager_report, eager_rows, _ = run_counting(make_config(tiny_models, train_shards, tmp_path / "eager", **changes))
    torch._dynamo.reset()
    counters.clear()
    report, rows, graphs = run_counting(make_config(
        tiny_models, train_shards, tmp_path / "regional", compile="regional", compile_cache=compile_cache, **changes))
    assert [r["step"] for r in rows] == [r["step"] for r in eager_rows] == [1, 2, 3, 4, 5]
    for compiled, plain in zip(rows, eager_rows):
        assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert compiled["loss_dfc"] == pytest.approx(plain["loss_dfc"], rel=1e-5)
    assert graphs[0] > 0 and graphs == [graphs[0]] * 5, "no recompiles after the first step"
    assert graph_break_count() == 0
    assert report["compile"]["mode"] == "regional" and report["compile"]["compile_seconds"] > 0
    assert report["compile"]["compiled_graphs"] == graphs[0]
    assert "compile" not in eager_report
    keys = checkpoint_keys(tmp_path / "regional", 5)
    assert keys == checkpoint_keys(tmp_path / "eager", 5) and not any("_orig_mod" in k for k in keys)
    assert (tmp_path / "regional/validation/step-0000005.png").is_file()
    assert any(compile_cache.rglob("*.py")), "kernels cached where compile_cache says"


def test_regional_compile_with_bf16_and_gradient_checkpointing(tiny_models, train_shards, tmp_path, compile_cache):
    config = make_config(tiny_models, train_shards, tmp_path / "run", compile="regional", compile_cache=compile_cache,
                         mixed_precision="bf16", gradient_checkpointing=True, max_train_steps=3, checkpointing_steps=3)
    report, rows, graphs = run_counting(config)
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3 and graph_break_count() == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_full_compile_trains_like_eager(tiny_models, train_shards, tmp_path, compile_cache):
    eager_report, eager_rows, _ = run_counting(make_config(tiny_models, train_shards, tmp_path / "eager",
                                                           max_train_steps=3, checkpointing_steps=3))
    torch._dynamo.reset()
    counters.clear()
    config = make_config(tiny_models, train_shards, tmp_path / "full", compile="full", compile_cache=compile_cache,
                         max_train_steps=3, checkpointing_steps=3)
    report, rows, graphs = run_counting(config)
    for compiled, plain in zip(rows, eager_rows, strict=True):
        assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3 and graph_break_count() == 0
    # AdamW moves a weight by up to about the learning rate per step whatever its gradient's size, so a weight
    # whose gradient is near zero may take another step from float rounding: weights agree to steps x lr
    for name, value in exported(tmp_path / "eager").items():
        assert torch.allclose(exported(tmp_path / "full")[name], value, rtol=1e-4,
                              atol=3 * config.learning_rate), name
    assert not any("_orig_mod" in k for k in checkpoint_keys(tmp_path / "full", 3))


def test_regional_compile_on_two_gloo_ranks(tiny_models, train_shards, tmp_path, compile_cache):
    bin_dir = Path(sys.executable).parent
    run_dir = tmp_path / "run"
    command = [
        str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--no-python", str(bin_dir / "xpsr"), "train",
        "--input-dir", str(train_shards), "--out", str(run_dir), "--base-model", str(tiny_models.sd),
        "--max-train-steps", "2", "--batch-size", "1",
        "--set", "shuffle_buffer=2", "--set", "tensorboard=false", "--set", "device=cpu", "--set", "metrics_file=null",
        "--set", "compile=regional", "--set", f"compile_cache={compile_cache}",
    ]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((run_dir / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["parameter_digest"] == reports[1]["parameter_digest"], "DDP keeps ranks in sync"
    assert all(r["compile"]["mode"] == "regional" for r in reports)
    assert "torch.compile (regional) took" in result.stdout + result.stderr


def test_inductor_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert inductor_cache_dir(None, tmp_path / "runs" / "a") == (tmp_path / "runs" / ".xpsr-cache" / "inductor")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inductor_cache_dir(None, tmp_path / "a") == tmp_path / "xdg" / "xpsr" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "env"))
    assert inductor_cache_dir(None, tmp_path / "a") == tmp_path / "env"
    assert inductor_cache_dir(tmp_path / "set", tmp_path / "a") == tmp_path / "set"


@pytest.fixture(scope="module")
def trained_parts(tiny_models, perturbed_xpsr, tmp_path_factory) -> Path:
    from xpsr_core.models.loading import load_base_sd

    model = perturbed_xpsr(load_base_sd(tiny_models.sd), seed=0)
    return model.save_trainable(tmp_path_factory.mktemp("xpsr") / "final")


def sr_config(tiny_models, trained_parts, image: Path, out: Path, **changes):
    from stages import sr

    values = dict(inputs=[str(image)], out=out, base_model=str(tiny_models.sd), xpsr=str(trained_parts),
                  captions="given", content_caption="a cat", quality_caption="sharp", steps=2, device="cpu",
                  tile_size=128, tile_overlap=32, vae_tile_size=128)
    return sr.SRConfig(**(values | changes))


def test_sr_compile_keeps_one_graph_per_model_over_the_tiles(tiny_models, trained_parts, tmp_path, compile_cache):
    """64 px -> 256 px in 128 px tiles: several latent and VAE tiles of one shape each, so the denoiser and the
    decoder compile once; the images equal eager within 1/255."""
    import numpy as np
    from PIL import Image

    from conftest import photo
    from stages import sr

    image = tmp_path / "cat.png"
    Image.fromarray(photo("chelsea", (64, 64))).save(image)
    eager = sr.run(sr_config(tiny_models, trained_parts, image, tmp_path / "eager"))
    compiled = sr.run(sr_config(tiny_models, trained_parts, image, tmp_path / "compiled", compile="default",
                                compile_cache=compile_cache))
    assert "compile" not in eager
    assert compiled["compile"]["mode"] == "default" and compiled["compile"]["compile_seconds"] > 0
    assert compiled["compile"]["compiled_graphs"] == 2, "denoiser and decoder, once each"
    assert graph_break_count() == 0
    sidecar = json.loads((tmp_path / "compiled/cat.json").read_text())
    assert sidecar["latent_tiles"] > 1
    a = np.asarray(Image.open(tmp_path / "eager/cat.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "compiled/cat.png"), dtype=np.int16)
    assert a.shape == b.shape == (256, 256, 3) and np.abs(a - b).max() <= 1


def test_cuda_graphs_are_refused_on_the_cpu(tiny_models, trained_parts, tmp_path):
    from xpsr_core.errors import UserError
    from xpsr_core.infer.config import load_pipeline

    config = sr_config(tiny_models, trained_parts, tmp_path / "x.png", tmp_path / "out", compile="reduce-overhead")
    with pytest.raises(UserError, match="reduce-overhead .CUDA graphs. needs a GPU"):
        load_pipeline(config)
