"""Training on the tiny zoo: exact resume, frozen base, rotation, divergence, two ranks, overfitting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_config
from stages import train as train_stage
from xpsr_core.errors import UserError
from xpsr_core.train.loop import TrainingDiverged, list_checkpoints


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run_dir / "final").rglob("*.safetensors")):
        for name, value in load_file(file).items():
            tensors[f"{file.parent.name}/{name}"] = value
    return tensors


def test_resume_continues_bit_for_bit(tiny_models, train_shards, tmp_path):
    straight = train_stage.run(train_config(tiny_models, train_shards, tmp_path / "straight"))
    first = train_stage.run(train_config(tiny_models, train_shards, tmp_path / "resumed", max_train_steps=3))
    assert first["steps_this_run"] == 3
    second = train_stage.run(train_config(tiny_models, train_shards, tmp_path / "resumed", resume="latest"))
    assert second["resumed_from"] == 3 and second["steps_this_run"] == 3
    assert second["parameter_digest"] == straight["parameter_digest"]
    a, b = exported(tmp_path / "straight"), exported(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the data stream resumed where it stopped: the same keys were seen at the same steps
    assert (tmp_path / "straight/logs/keys.rank0.tsv").read_text() == (
        tmp_path / "resumed/logs/keys.rank0.tsv"
    ).read_text()
    log = (tmp_path / "resumed/train_log.tsv").read_text().splitlines()
    assert log[0].startswith("step\tloss_eps\tloss_dfc\tdfc_pixel_0") and len(log) == 7


def test_frozen_parameters_unchanged_and_trainable_ones_trained(tiny_models, train_shards, tmp_path):
    from diffusers import UNet2DConditionModel

    from xpsr_core.models import XPSRModel

    train_stage.run(train_config(tiny_models, train_shards, tmp_path / "run", max_train_steps=2))
    base_unet = UNet2DConditionModel.from_pretrained(tiny_models.sd, subfolder="unet")
    fresh = XPSRModel.build(base_unet)
    trained = XPSRModel.from_base(tiny_models.sd, trainable=tmp_path / "run/final", with_dfc=False)
    for name, param in base_unet.state_dict().items():
        assert torch.equal(param, trained.unet.state_dict()[name]), name
    changed = [
        n for n, p in trained.controlnet.state_dict().items() if not torch.equal(p, fresh.controlnet.state_dict()[n])
    ]
    assert changed, "training changed no ControlNet weight"
    # the export holds every trained part, so a fine-tune from it (--init) starts from trained DFC heads too
    with_heads = XPSRModel.from_base(tiny_models.sd, trainable=tmp_path / "run/final", with_dfc=True)
    assert with_heads.dfc_heads is not None and (tmp_path / "run/final/dfc_heads").is_dir()


def test_after_step_hook_runs_once_per_optimizer_step(tiny_models, train_shards, tmp_path):
    from xpsr_core.train.loop import Trainer

    seen = []
    config = train_config(tiny_models, train_shards, tmp_path / "run", max_train_steps=3, gradient_accumulation_steps=2)
    Trainer(config).train(after_step=seen.append)
    assert seen == [1, 2, 3]


def test_checkpoint_rotation_keeps_the_newest(tiny_models, train_shards, tmp_path):
    run_dir = tmp_path / "run"
    train_stage.run(
        train_config(
            tiny_models, train_shards, run_dir, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2
        )
    )
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(UserError, match="--resume latest"):
        train_stage.run(train_config(tiny_models, train_shards, run_dir, max_train_steps=4))


def test_nan_loss_stops_with_a_good_checkpoint(tiny_models, train_shards, tmp_path, monkeypatch):
    import xpsr_core.models.xpsr as models

    real = models.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, logs = real(*args, **kwargs)
        if calls["n"] == 3:
            return loss * float("nan"), {**logs, "loss": logs["loss"] * float("nan")}
        return loss, logs

    monkeypatch.setattr(models, "training_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train_stage.run(train_config(tiny_models, train_shards, tmp_path / "run", checkpointing_steps=100))
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["checkpoint-2"]
    for file in checkpoints[0].rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(file).values())


def test_two_ranks_train_on_disjoint_shards_with_identical_weights(tiny_models, train_shards, tmp_path):
    bin_dir = Path(sys.executable).parent
    run_dir = tmp_path / "run"
    command = [
        str(bin_dir / "torchrun"),
        "--nproc_per_node",
        "2",
        "--no-python",
        str(bin_dir / "xpsr"),
        "train",
        "--input-dir",
        str(train_shards),
        "--out",
        str(run_dir),
        "--base-model",
        str(tiny_models.sd),
        "--max-train-steps",
        "3",
        "--batch-size",
        "1",
        "--set",
        "shuffle_buffer=2",
        "--set",
        "tensorboard=false",
        "--set",
        "device=cpu",
        "--set",
        "metrics_file=null",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((run_dir / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 for r in reports)
    assert reports[0]["parameter_digest"] == reports[1]["parameter_digest"], "DDP keeps ranks in sync"
    shards_seen = []
    for rank in (0, 1):
        keys = {
            k
            for line in (run_dir / f"logs/keys.rank{rank}.tsv").read_text().splitlines()
            for k in line.split("\t")[2].split(",")
        }
        shards_seen.append({k[:5] for k in keys})
    assert shards_seen[0] and shards_seen[1] and not shards_seen[0] & shards_seen[1], shards_seen


def test_loss_falls_on_a_tiny_overfit_run(tiny_models, train_shards, tmp_path):
    import pandas as pd

    run_dir = tmp_path / "overfit"
    train_stage.run(
        train_config(
            tiny_models, train_shards, run_dir, max_train_steps=60, learning_rate=1e-3, checkpointing_steps=1000
        )
    )
    log = pd.read_csv(run_dir / "train_log.tsv", sep="\t")
    first, last = log["loss"].head(10).mean(), log["loss"].tail(10).mean()
    eps_first, eps_last = log["loss_eps"].head(10).mean(), log["loss_eps"].tail(10).mean()
    print(f"loss {first:.4f} -> {last:.4f}, eps loss {eps_first:.4f} -> {eps_last:.4f}")
    # measured on the tiny zoo (2026-11-26): loss 1.20 -> 0.73 and eps loss 1.09 -> 0.66 over 60 steps
    assert last < 0.85 * first
    assert eps_last < 0.9 * eps_first, "the diffusion loss itself falls, not only the DFC terms"


@pytest.mark.parametrize(
    "switches",
    [
        {"sfa_mode": "serial", "dfc_latent": False},
        {"sfa_mode": "high", "use_high_prompt": False, "conditional_attention": False},
        {"sfa_mode": "low", "dfc_pixel": False, "dfc_weight": 0.5},
    ],
)
def test_ablation_switches_reach_the_model_and_the_loss(tiny_models, train_shards, tmp_path, switches):
    run_dir = tmp_path / "ablation"
    train_stage.run(
        train_config(tiny_models, train_shards, run_dir, max_train_steps=2, checkpointing_steps=1000, **switches)
    )
    header = (run_dir / "train_log.tsv").read_text().splitlines()[0].split("\t")
    assert ("dfc_latent_0" in header) == switches.get("dfc_latent", True)
    assert ("dfc_pixel_0" in header) == switches.get("dfc_pixel", True)
    settings = json.loads((run_dir / "final/xpsr.json").read_text())["settings"]
    assert settings["sfa_mode"] == switches["sfa_mode"]
    assert settings["conditional_attention"] == switches.get("conditional_attention", True)
    assert (run_dir / "final/conditional_attention").is_dir() == switches.get("conditional_attention", True)


def test_validation_grids_are_written_and_do_not_perturb_training(tiny_models, train_shards, tmp_path):
    from PIL import Image

    plain = train_stage.run(
        train_config(tiny_models, train_shards, tmp_path / "plain", max_train_steps=2, checkpointing_steps=1000)
    )
    validated = train_stage.run(train_config(
        tiny_models, train_shards, tmp_path / "validated", max_train_steps=2, checkpointing_steps=1000,
        validation_steps=1, validation_samples=2, validation_inference_steps=2,
    ))
    grids = sorted((tmp_path / "validated/validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000001.png", "step-0000002.png"]
    width, height = Image.open(grids[0]).size
    assert 3 * 96 <= width < 3 * 96 + 16 and 2 * 96 <= height < 2 * 96 + 16, (
        "two rows of LR-upsampled | SR | HR at 96 px"
    )
    assert validated["parameter_digest"] == plain["parameter_digest"]


def test_bf16_mixed_precision_with_gradient_checkpointing_trains_in_fp32(tiny_models, train_shards, tmp_path):
    report = train_stage.run(train_config(
        tiny_models, train_shards, tmp_path / "bf16", max_train_steps=2, checkpointing_steps=1000,
        mixed_precision="bf16", gradient_checkpointing=True,
    ))
    assert report["final_loss"] is not None and report["final_loss"] == report["final_loss"]  # finite, not NaN
    exported = load_file(tmp_path / "bf16/final/controlnet/diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float32 for t in exported.values()), "trainable parts stay in float32"


def test_unquoted_yaml_no_means_no_mixed_precision(tmp_path):
    from xpsr_core.config import resolve_config

    params = __import__("yaml").safe_load("train:\n  mixed_precision: no\n")
    assert resolve_config(train_stage.TrainConfig, "train", params).mixed_precision == "no"


def test_fp16_on_the_cpu_is_refused_before_any_model_loads(tiny_models, train_shards, tmp_path):
    with pytest.raises(UserError, match="fp16 mixed precision needs a GPU"):
        train_stage.run(train_config(tiny_models, train_shards, tmp_path / "fp16", mixed_precision="fp16"))
    assert not list((tmp_path / "fp16").glob("checkpoint-*"))


def test_hr_condition_draw_rate_and_determinism():
    """The authors' recipe draws "HR as condition" per (seed, step, key) at the configured rate."""
    import math

    from xpsr_core.train.data import hr_condition_draw

    keys = [f"{shard:05d}{index:05d}" for shard in range(40) for index in range(50)]  # 2000 keys
    drawn = [hr_condition_draw(0, 7, key, 0.1) for key in keys]
    tolerance = 4 * math.sqrt(len(keys) * 0.1 * 0.9)  # 4 binomial standard deviations
    assert abs(sum(drawn) - 200) < tolerance, sum(drawn)
    assert drawn == [hr_condition_draw(0, 7, key, 0.1) for key in keys], "a pure function of (seed, step, key)"
    for other in (
        [hr_condition_draw(0, 8, key, 0.1) for key in keys],
        [hr_condition_draw(1, 7, key, 0.1) for key in keys],
    ):
        assert abs(sum(other) - 200) < tolerance
        both = sum(a and b for a, b in zip(drawn, other))
        assert both < 20 + 4 * math.sqrt(20), "another step or seed draws independently"
    one_key = sum(hr_condition_draw(0, step, "0000000000", 0.1) for step in range(2000))
    assert abs(one_key - 200) < tolerance, "a key is drawn at the rate over the steps too"
    assert not any(hr_condition_draw(0, 7, key, 0.0) for key in keys) and all(
        hr_condition_draw(0, 7, key, 1.0) for key in keys
    )


def distinct_hr_quality(train_shards_hr: Path, out: Path) -> Path:
    """A copy of the shards whose hr_quality.npy differs from quality.npy for every key (the tiny captioners
    often write the same words for an LR image and its HR image, which would hide a swapped c_l)."""
    import shutil

    import numpy as np

    from xpsr_core.encoding import npy_bytes, npy_load
    from xpsr_core.io.shards import TarShardWriter, read_shard

    shutil.copytree(train_shards_hr, out)
    for tar in sorted(out.glob("*.tar")):
        samples = list(read_shard(tar))
        with TarShardWriter(tar) as writer:
            for sample in samples:
                key = sample.pop("__key__")
                sample["hr_quality.npy"] = npy_bytes(
                    (-npy_load(sample["quality.npy"]) + np.float16(0.5)).astype(np.float16)
                )
                writer.write(key, sample)
    return out


def test_hr_condition_feeds_the_hr_image_and_its_quality_caption(tiny_models, train_shards_hr, tmp_path, monkeypatch):
    import pandas as pd

    from xpsr_core.conditioning import upsample
    from xpsr_core.models import XPSRModel
    from xpsr_core.train.data import hr_condition_draw
    from xpsr_core.train.loop import Trainer

    seen, batches = [], []
    real_forward, real_loss = XPSRModel.forward, Trainer.loss

    def recording_forward(self, noisy, timesteps, c_h, c_l, condition, *args, **kwargs):
        seen.append({"c_l": c_l.detach().clone(), "condition": condition.detach().clone()})
        return real_forward(self, noisy, timesteps, c_h, c_l, condition, *args, **kwargs)

    def recording_loss(self, batch, step, micro):
        batches.append((batch, step))
        return real_loss(self, batch, step, micro)

    monkeypatch.setattr(XPSRModel, "forward", recording_forward)
    monkeypatch.setattr(Trainer, "loss", recording_loss)
    run_dir = tmp_path / "run"
    shards = distinct_hr_quality(train_shards_hr, tmp_path / "shards")
    train_stage.run(
        train_config(
            tiny_models, shards, run_dir, max_train_steps=4, checkpointing_steps=1000, hr_condition_probability=0.5
        )
    )
    assert len(seen) == len(batches) == 4
    drawn_count = swapped_caption = kept = 0
    for (batch, step), fed in zip(batches, seen):
        assert "hr_quality" in batch
        lr_condition = upsample(batch["lr"].float() / 255.0, 4)
        for i, key in enumerate(batch["keys"]):
            if hr_condition_draw(0, step, key, 0.5):
                drawn_count += 1
                assert torch.equal(fed["condition"][i], batch["hr"][i].float() / 255.0), (
                    "the HR image in [0, 1] at the HR size"
                )
                assert torch.equal(fed["c_l"][i], batch["hr_quality"][i].float()), "the HR image's quality caption"
                swapped_caption += not torch.equal(batch["hr_quality"][i], batch["quality"][i])
            else:
                kept += 1
                assert torch.equal(fed["condition"][i], lr_condition[i]) and torch.equal(
                    fed["c_l"][i], batch["quality"][i].float()
                )
    assert drawn_count and kept and swapped_caption, (drawn_count, kept, swapped_caption)
    log = pd.read_csv(run_dir / "train_log.tsv", sep="\t")
    shares = [
        sum(hr_condition_draw(0, step, k, 0.5) for k in batch["keys"]) / len(batch["keys"]) for batch, step in batches
    ]
    assert log["hr_condition_share"].tolist() == shares


def test_resume_with_hr_condition_continues_bit_for_bit(tiny_models, train_shards_hr, tmp_path):
    recipe = dict(hr_condition_probability=0.5, use_high_prompt=False)
    straight = train_stage.run(train_config(tiny_models, train_shards_hr, tmp_path / "straight", **recipe))
    train_stage.run(train_config(tiny_models, train_shards_hr, tmp_path / "resumed", max_train_steps=3, **recipe))
    second = train_stage.run(
        train_config(tiny_models, train_shards_hr, tmp_path / "resumed", resume="latest", **recipe)
    )
    assert second["resumed_from"] == 3 and second["parameter_digest"] == straight["parameter_digest"]
    a, b = exported(tmp_path / "straight"), exported(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import pandas as pd

    shares = [
        pd.read_csv(tmp_path / name / "train_log.tsv", sep="\t")["hr_condition_share"].tolist()
        for name in ("straight", "resumed")
    ]
    assert shares[0] == shares[1] and 0 < sum(shares[0]) < len(shares[0]), shares
    plain = train_stage.run(train_config(tiny_models, train_shards_hr, tmp_path / "plain", use_high_prompt=False))
    assert plain["parameter_digest"] != straight["parameter_digest"], "the recipe changes what the model learns from"


def test_hr_condition_needs_hr_quality_captions(tiny_models, train_shards, tmp_path):
    with pytest.raises(UserError, match="caption_hr=true"):
        train_stage.run(train_config(tiny_models, train_shards, tmp_path / "run", hr_condition_probability=0.1))
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_the_model_options_are_the_xpsr_settings_fields():
    from xpsr_core.config import resolve_config
    from xpsr_core.models import XPSRSettings
    from xpsr_core.train.settings import FIXED_ARCHITECTURE, ModelOptions

    assert set(ModelOptions.model_fields) == set(XPSRSettings.__dataclass_fields__) - set(FIXED_ARCHITECTURE)
    options = dict(sfa_mode="serial", conditional_attention=False, dfc_pixel=False, fusion="transformer",
                   conditional_attention_type="transformer", dfc_latent_heads="residuals", dfc_target_resize="bilinear",
                   init="official")
    assert train_stage.TrainConfig(**options).xpsr_settings() == XPSRSettings(**options)
    assert train_stage.TrainConfig(init="runs/a/final").init == "runs/a/final", "init also names a folder to fine-tune"
    with pytest.raises(UserError, match=r"train.*fusion: Input should be 'attention' or 'transformer' \(got 'mlp'\)"):
        resolve_config(train_stage.TrainConfig, "train", {"train": {"fusion": "mlp"}})
