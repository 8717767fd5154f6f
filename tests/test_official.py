"""The authors' checkpoint layout: the architecture options, export -> import round trip, and refusals."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xpsr_core.errors import UserError  # noqa: E402
from xpsr_core.models import XPSRModel, XPSRSettings, load_base_sd  # noqa: E402
from xpsr_core.models.official import export_official, import_official, load_tensors  # noqa: E402

BATCH, LATENT, HR = 2, 8, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet(tiny_models):
    return load_base_sd(tiny_models.sd, components=("unet",)).unet


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    return dict(
        noisy_latents=torch.randn(BATCH, 4, LATENT, LATENT + 4, generator=g),
        timesteps=torch.tensor([3, 901]),
        c_h=torch.randn(BATCH, 77, 32, generator=g),
        c_l=torch.randn(BATCH, 77, 32, generator=g),
        condition=torch.rand(BATCH, 3, HR, HR + 32, generator=g),
        hr_image=torch.rand(BATCH, 3, HR, HR + 32, generator=g) * 2 - 1,
        hr_latent=torch.randn(BATCH, 4, LATENT, LATENT + 4, generator=g),
    )


def perturbed_official_model(unet, seed: int = 11) -> XPSRModel:
    """The authors' architecture with every trainable tensor random (zero convs included)."""
    torch.manual_seed(seed)
    model = XPSRModel.build(unet, XPSRSettings.official()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def outputs(model, inputs):
    with torch.no_grad():
        out = model(inputs["noisy_latents"], inputs["timesteps"], inputs["c_h"], inputs["c_l"], inputs["condition"],
                    hr_image=inputs["hr_image"], hr_latent=inputs["hr_latent"], return_dfc=True)
        cn = model.controlnet(inputs["noisy_latents"], inputs["timesteps"], inputs["c_h"], inputs["condition"],
                              low_level_hidden_states=inputs["c_l"])
    return {"eps": out.sample, **{f"down_{i}": r for i, r in enumerate(cn.down_block_res_samples)},
            "mid": cn.mid_block_res_sample, **{f"dfc_{k}": v for k, v in out.dfc.predictions.items()}}


def test_official_architecture_has_the_authors_counts(unet):
    model = XPSRModel.build(unet, XPSRSettings.official())
    assert len(model.dfc_heads.latent_heads) == 13 and len(model.dfc_heads.pixel_heads) == 3
    assert len(model.conditional_attention.layers) == 12
    # the authors' initialisation: CA_f starts from CA_h wherever shapes agree, nothing new is zero
    sfa = next(iter(model.controlnet.sfa_modules().values()))
    assert torch.equal(sfa.fusion.proj_in.weight, sfa.high.proj_in.weight)
    assert sfa.fusion.proj_out.weight.abs().sum() > 0
    assert all(layer.proj_out.weight.abs().sum() > 0 for layer in model.conditional_attention.layers)


def test_export_then_import_gives_identical_outputs(unet, tiny_models, inputs, tmp_path):
    model = perturbed_official_model(unet)
    expected = outputs(model, inputs)
    export_official(model, tmp_path / "checkpoint-7")
    names = json.loads((tmp_path / "checkpoint-7/controlnet/config.json").read_text())
    assert names["use_lowlevel_prompt"] is True and names["use_rrdb"] is False
    controlnet_keys = load_tensors(tmp_path / "checkpoint-7/controlnet/diffusion_pytorch_model.safetensors")
    assert (
        any(".attentions_connect.0." in k for k in controlnet_keys)
        and "conv_degradation_mid.0.weight" in controlnet_keys
    )
    assert any(
        ".pixel_attentions." in k
        for k in load_tensors(tmp_path / "checkpoint-7/unet/diffusion_pytorch_model.safetensors")
    )

    messages = []
    summary = import_official(tmp_path / "checkpoint-7", tiny_models.sd, tmp_path / "imported", log=messages.append)
    assert summary.base_max_abs_diff == 0.0 and not summary.used_checkpoint_unet
    assert summary.mapped["dfc_heads"] == 32 and messages
    base = load_base_sd(tmp_path / "imported", components=("unet",))
    again = XPSRModel.load_trainable(tmp_path / "imported" / "xpsr", base.unet).eval()
    assert again.settings == model.settings
    got = outputs(again, inputs)
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def test_bin_weights_import_too(unet, tiny_models, tmp_path):
    model = perturbed_official_model(unet, seed=2)
    export_official(model, tmp_path / "ckpt", safe_serialization=False)
    assert (tmp_path / "ckpt/unet/diffusion_pytorch_model.bin").is_file()
    import_official(tmp_path / "ckpt", tiny_models.sd, tmp_path / "out")
    loaded = XPSRModel.load_trainable(tmp_path / "out" / "xpsr", unet)
    for (name, a), b in zip(model.controlnet.state_dict().items(), loaded.controlnet.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("official") / "checkpoint-1"
    export_official(perturbed_official_model(unet, seed=4), folder)
    return folder


def _edit_config(folder, part, **changes):
    path = folder / part / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, part, edit):
    from safetensors.torch import save_file

    path = folder / part / "diffusion_pytorch_model.safetensors"
    tensors = load_tensors(path)
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda f: _edit_config(f, "controlnet", use_rrdb=True), ["use_rrdb: true"]),
        (
            lambda f: _edit_config(f, "unet", up_use_lowlevel_prompt=[False, True, False, False]),
            ["up_use_lowlevel_prompt"],
        ),
        (lambda f: _edit_config(f, "unet", mid_use_lowlevel_prompt=True), ["mid_use_lowlevel_prompt"]),
        (lambda f: _edit_config(f, "controlnet", use_magic=1), ["use_magic"]),
        (lambda f: _edit_config(f, "controlnet", controlnet_conditioning_channel_order="bgr"), ["bgr"]),
        (lambda f: _edit_config(f, "unet", block_out_channels=[32, 64, 64, 64]), ["block_out_channels"]),
        (
            lambda f: _edit_tensors(f, "controlnet", lambda t: t.pop("conv_degradation.3.0.weight")),
            ["1 model tensors the checkpoint does not provide", "dfc_heads.latent_heads.3.weight"],
        ),
        (
            lambda f: _edit_tensors(f, "unet", lambda t: t.update({"up_blocks.1.extra.weight": torch.zeros(2)})),
            ["checkpoint tensors with no place", "unet/up_blocks.1.extra.weight"],
        ),
        (
            lambda f: _edit_tensors(f, "controlnet", lambda t: t.update({"conv_in.weight": torch.zeros(1, 1)})),
            ["shapes differ", "controlnet/conv_in.weight"],
        ),
        (lambda f: shutil.rmtree(f / "controlnet"), ["no controlnet/ folder"]),
        (
            lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage"),
            ["Could not load the weights", "diffusion_pytorch_model.safetensors", "truncated or corrupt"],
        ),
        (lambda f: (f / "unet" / "config.json").write_text("{"), ["not readable JSON"]),
    ],
)
def test_malformed_checkpoints_are_refused_by_name(exported, tiny_models, tmp_path, change, fragments):
    folder = tmp_path / "ckpt"
    shutil.copytree(exported, folder)
    change(folder)
    with pytest.raises(UserError) as error:
        import_official(folder, tiny_models.sd, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))
    assert not (tmp_path / "out").exists()


def test_the_streamed_import_writes_what_save_pretrained_writes_and_shards_large_parts(exported, tiny_models, unet,
                                                                                     tmp_path):
    """Unsharded, each part's weights file is byte for byte the one save_pretrained writes of the model assembled
    from the checkpoint; with a small max_shard_size the parts come in shards with an index and load to the same
    tensors."""
    import_official(exported, tiny_models.sd, tmp_path / "whole")
    reference = XPSRModel.load_trainable(tmp_path / "whole" / "xpsr", unet)
    for name, module in reference.trainable_modules().items():
        module.save_pretrained(tmp_path / "reference" / name, safe_serialization=True)
        written = tmp_path / "whole" / "xpsr" / name / "diffusion_pytorch_model.safetensors"
        assert written.read_bytes() == (tmp_path / "reference" / name / written.name).read_bytes(), name
    import_official(exported, tiny_models.sd, tmp_path / "sharded", max_shard_size=200_000)
    index = tmp_path / "sharded/xpsr/controlnet/diffusion_pytorch_model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    sharded = XPSRModel.load_trainable(tmp_path / "sharded" / "xpsr", unet)
    for name, module in sharded.trainable_modules().items():
        expected = reference.trainable_modules()[name].state_dict()
        got = module.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name


def test_a_checkpoint_trained_on_another_base_is_refused_unless_allowed(exported, tiny_models, unet, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(exported, folder)
    _edit_tensors(folder, "unet", lambda t: t["conv_in.weight"].add_(0.25))
    with pytest.raises(UserError, match="largest absolute difference 0.25"):
        import_official(folder, tiny_models.sd, tmp_path / "out")
    summary = import_official(folder, tiny_models.sd, tmp_path / "out", allow_base_mismatch=True)
    assert summary.used_checkpoint_unet and summary.base_max_abs_diff == pytest.approx(0.25)
    written = load_base_sd(tmp_path / "out", components=("unet",)).unet
    assert torch.allclose(written.conv_in.weight, unet.conv_in.weight + 0.25)


def test_fine_tuning_an_imported_checkpoint_trains_and_its_checkpoint_exports_again(
    exported, tiny_models, train_shards, tmp_path
):
    import pandas as pd
    from accelerate.state import AcceleratorState

    from stages import train as train_stage
    from xpsr_core.train.loop import list_checkpoints

    import_official(exported, tiny_models.sd, tmp_path / "imported")
    AcceleratorState._reset_state(reset_partial_state=True)
    run_dir = tmp_path / "finetune"
    config = train_stage.TrainConfig(
        input_dir=train_shards,
        out=run_dir,
        base_model=str(tmp_path / "imported"),
        init=str(tmp_path / "imported"),
        batch_size=2,
        max_train_steps=30,
        learning_rate=1e-3,
        checkpointing_steps=30,
        shuffle_buffer=4,
        tensorboard=False,
        metrics_file=None,
        device="cpu",
        use_high_prompt=False,
    )
    train_stage.run(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    log = pd.read_csv(run_dir / "train_log.tsv", sep="\t")
    # the authors' objective: eps + 3 RGB + 13 latent terms
    assert (
        sum(c.startswith("dfc_latent_") for c in log.columns) == 13
        and sum(c.startswith("dfc_pixel_") for c in log.columns) == 3
    )
    assert log["loss"].tail(8).mean() < 0.9 * log["loss"].head(8).mean()

    checkpoint = list_checkpoints(run_dir)[-1] / "xpsr"
    unet = load_base_sd(tmp_path / "imported", components=("unet",)).unet
    trained = XPSRModel.load_trainable(checkpoint, unet).eval()
    assert trained.settings == XPSRModel.load_trainable(tmp_path / "imported" / "xpsr", unet).settings
    export_official(trained, tmp_path / "again")
    import_official(tmp_path / "again", tmp_path / "imported", tmp_path / "reimported")
    again = XPSRModel.load_trainable(tmp_path / "reimported" / "xpsr", unet)
    for name, value in trained.dfc_heads.state_dict().items():
        assert torch.equal(value, again.dfc_heads.state_dict()[name]), name


def test_import_official_command_writes_a_pipeline_folder_with_the_authors_recipe(
    exported, tiny_models, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app, ["import-official", str(exported), "--base-model", str(tiny_models.sd), "--out", "imported"]
    )
    assert result.exit_code == 0, result.output
    assert "import-official" in result.output and "done" in result.output
    saved = json.loads((tmp_path / "imported/xpsr_pipeline.json").read_text())
    assert saved["defaults"]["guidance_scale"] == 4.5 and saved["defaults"]["added_noise_level"] == 800
    report = json.loads((tmp_path / "imported/import_report.json").read_text())
    assert report["mapped"]["conditional_attention"] == len(
        XPSRModel.load_trainable(
            tmp_path / "imported/xpsr", load_base_sd(tiny_models.sd, components=("unet",)).unet
        ).conditional_attention.state_dict()
    )

    again = runner.invoke(
        app, ["import-official", str(exported), "--base-model", str(tiny_models.sd), "--out", "imported"]
    )
    assert again.exit_code != 0 and "already exists" in again.output and "Traceback" not in again.output
    missing = runner.invoke(app, ["import-official", str(tmp_path / "nowhere"), "--base-model", str(tiny_models.sd)])
    assert missing.exit_code != 0 and "does not exist" in missing.output and "Traceback" not in missing.output
