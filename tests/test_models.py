"""XPSR model: parity with diffusers at initialisation, SFA wiring, gradients, DFC, persistence, loading."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402

from xpsr_core.errors import UserError  # noqa: E402
from xpsr_core.models import (  # noqa: E402
    DFCHeads,
    SemanticFusionTransformer,
    XPSRModel,
    XPSRSettings,
    load_base_sd,
    training_loss,
    xpsr_unet_forward,
)
from xpsr_core.models import xpsr as xpsr_module  # noqa: E402

BATCH, LATENT, HR = 2, 8, 64
DIFFUSERS_ZERO_PARTS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet(tiny_models):
    return load_base_sd(tiny_models.sd, components=("unet",)).unet


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        noisy_latents=torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
        timesteps=torch.tensor([10, 700]),
        c_h=torch.randn(BATCH, 77, 32, generator=g),
        c_l=torch.randn(BATCH, 77, 32, generator=g),
        condition=torch.rand(BATCH, 3, HR, HR, generator=g),
        hr_image=torch.rand(BATCH, 3, HR, HR, generator=g) * 2 - 1,
        hr_latent=torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
    )


def _perturb_(params, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _diffusers_zero_params(module):
    return [p for name, p in module.named_parameters() if name.startswith(DIFFUSERS_ZERO_PARTS)]


def _new_zero_params(model: XPSRModel):
    params = [p for proj in model.controlnet.new_output_projections() for p in proj.parameters()]
    if model.conditional_attention is not None:
        params += [p for proj in model.conditional_attention.output_projections() for p in proj.parameters()]
    return params


def _reference(unet, model, inputs, controlnet):
    out = controlnet(
        inputs["noisy_latents"],
        inputs["timesteps"],
        encoder_hidden_states=inputs["c_h"],
        controlnet_cond=inputs["condition"],
        return_dict=False,
    )
    sample = unet(
        inputs["noisy_latents"], inputs["timesteps"], encoder_hidden_states=inputs["c_h"],
        down_block_additional_residuals=out[0], mid_block_additional_residual=out[1],
    ).sample
    return out[0], out[1], sample


def _xpsr(model, inputs, **kwargs):
    cn = model.controlnet(
        inputs["noisy_latents"],
        inputs["timesteps"],
        inputs["c_h"],
        inputs["condition"],
        low_level_hidden_states=inputs["c_l"],
    )
    sample = model(
        inputs["noisy_latents"], inputs["timesteps"], inputs["c_h"], inputs["c_l"], inputs["condition"], **kwargs
    ).sample
    return cn.down_block_res_samples, cn.mid_block_res_sample, sample


def _max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode,kind", [("parallel", "attention"), ("parallel", "transformer"), ("serial", "attention"),
                                       ("high", "attention")])
def test_fresh_xpsr_equals_diffusers_controlnet_and_unet(unet, inputs, mode, kind):
    torch.manual_seed(0)
    reference = ControlNetModel.from_unet(unet).eval()
    settings = XPSRSettings(sfa_mode=mode, fusion=kind, conditional_attention_type=kind)
    model = XPSRModel.build(unet, settings).eval()

    # Every weight diffusers copies from the UNet is copied identically (both SFA branches included).
    mine = model.controlnet.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("controlnet_cond_embedding") and not key.startswith("controlnet_cond_embedding.conv_out"):
            continue  # random init in both
        branch_key = re.sub(r"(attentions\.\d+)\.", r"\1.high.", key, count=1)
        assert torch.equal(mine[branch_key if branch_key in mine else key], value), key

    with torch.no_grad():
        # Freshly built as is: zero residuals, identical noise prediction.
        ref = _reference(unet, model, inputs, reference)
        got = _xpsr(model, inputs)
        assert _max_diff(ref[0], got[0]) <= 1e-5 and _max_diff(ref[1], got[1]) <= 1e-5
        assert _max_diff(ref[2], got[2]) <= 1e-5

        # Give diffusers' own zero-initialised parts the same non-zero values on both sides, so the
        # comparison exercises every path; XPSR's new projections are still zero.
        _perturb_(_diffusers_zero_params(reference), seed=3)
        model.controlnet.load_plain_state_dict(reference.state_dict(), strict_subset=True)
        ref = _reference(unet, model, inputs, reference)
        got = _xpsr(model, inputs)
    assert max(r.abs().max().item() for r in ref[0]) > 1e-2, (
        "residuals must be non-trivial for the test to mean anything"
    )
    assert _max_diff(ref[0], got[0]) <= 1e-5
    assert _max_diff(ref[1], got[1]) <= 1e-5
    assert _max_diff(ref[2], got[2]) <= 1e-5


def test_from_trained_diffusers_controlnet_keeps_its_behaviour(unet, inputs):
    from xpsr_core.models import XPSRControlNet

    torch.manual_seed(0)
    reference = ControlNetModel.from_unet(unet).eval()
    _perturb_(_diffusers_zero_params(reference), seed=3)
    controlnet = XPSRControlNet.from_controlnet(reference).eval()
    with torch.no_grad():
        ref = reference(
            inputs["noisy_latents"],
            inputs["timesteps"],
            encoder_hidden_states=inputs["c_h"],
            controlnet_cond=inputs["condition"],
            return_dict=False,
        )
        got = controlnet(
            inputs["noisy_latents"],
            inputs["timesteps"],
            inputs["c_h"],
            inputs["condition"],
            low_level_hidden_states=inputs["c_l"],
        )
    assert _max_diff(ref[0], got.down_block_res_samples) <= 1e-5
    assert _max_diff(ref[1], got.mid_block_res_sample) <= 1e-5


def test_perturbing_new_zero_projections_changes_outputs(unet, inputs):
    torch.manual_seed(0)
    reference = ControlNetModel.from_unet(unet).eval()
    _perturb_(_diffusers_zero_params(reference), seed=3)
    model = XPSRModel.build(unet).eval()
    model.controlnet.load_plain_state_dict(reference.state_dict(), strict_subset=True)
    with torch.no_grad():
        ref = _reference(unet, model, inputs, reference)
        # Conditional Attention only: residuals unchanged, noise prediction moves.
        _perturb_([p for proj in model.conditional_attention.output_projections() for p in proj.parameters()], seed=4)
        got = _xpsr(model, inputs)
        assert _max_diff(ref[0], got[0]) <= 1e-5
        assert _max_diff(ref[2], got[2]) > 1e-3
        # SFA fusion projections: the ControlNet residuals move too.
        _perturb_([p for proj in model.controlnet.new_output_projections() for p in proj.parameters()], seed=5)
        got = _xpsr(model, inputs)
    assert _max_diff(ref[0], got[0]) > 1e-3
    assert _max_diff(ref[1], got[1]) > 1e-3


# ------------------------------------------------------------------------------------- SFA wiring


def test_low_level_prompt_reaches_output_only_through_low_branch_and_fusion(unet, inputs):
    torch.manual_seed(0)
    model = XPSRModel.build(unet).eval()
    _perturb_(_diffusers_zero_params(model.controlnet), seed=3)
    first = model.controlnet.down_blocks[0].attentions[0]
    assert isinstance(first, SemanticFusionTransformer)
    other_c_l = torch.randn_like(inputs["c_l"])

    def residuals(c_l):
        seen = {}
        hooks = [
            getattr(first, name).register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, (o[0] if isinstance(o, tuple) else o).clone())
            )
            for name in ("high", "low", "fusion")
        ]
        with torch.no_grad():
            out = model.controlnet(
                inputs["noisy_latents"],
                inputs["timesteps"],
                inputs["c_h"],
                inputs["condition"],
                low_level_hidden_states=c_l,
            )
        for h in hooks:
            h.remove()
        return out, seen

    # Fusion projections at zero: c_l cannot change anything, so it has no path except the fusion.
    a, _ = residuals(inputs["c_l"])
    b, _ = residuals(other_c_l)
    assert all(torch.equal(x, y) for x, y in zip(a.down_block_res_samples, b.down_block_res_samples))

    _perturb_([p for proj in model.controlnet.new_output_projections() for p in proj.parameters()], seed=5)
    a, seen_a = residuals(inputs["c_l"])
    b, seen_b = residuals(other_c_l)
    assert torch.equal(seen_a["high"], seen_b["high"]), "the high-level branch must not see c_l"
    assert not torch.allclose(seen_a["low"], seen_b["low"]), "the low-level branch reads c_l"
    assert not torch.allclose(seen_a["fusion"], seen_b["fusion"]), "fusion mixes the low-level branch in"
    assert _max_diff(a.down_block_res_samples, b.down_block_res_samples) > 1e-4


def test_fusion_attention_matches_explicit_formula():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    transformer = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8, cross_attention_dim=12
    )
    sfa = SemanticFusionTransformer(transformer, mode="parallel").eval()
    _perturb_(sfa.fusion.output_projection.parameters(), seed=1)
    x = torch.randn(2, 16, 4, 3)
    c_h, c_l = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    with torch.no_grad():
        out = sfa(x, encoder_hidden_states=c_h, cross_attention_kwargs={"xpsr_low_level_hidden_states": c_l})[0]
        x_h = sfa.high(x, encoder_hidden_states=c_h, return_dict=False)[0]
        x_l = sfa.low(x, encoder_hidden_states=c_l, return_dict=False)[0]
        f = sfa.fusion
        q_tokens = f.norm_q(x_h.flatten(2).transpose(1, 2))  # (B, 12, 16)
        kv_tokens = f.norm_kv(x_l.flatten(2).transpose(1, 2))
        q, k, v = f.attn.to_q(q_tokens), f.attn.to_k(kv_tokens), f.attn.to_v(kv_tokens)
        heads, d = 2, 8
        split = lambda t: t.view(2, -1, heads, d).transpose(1, 2)  # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d**0.5, dim=-1)
        mixed = (weights @ split(v)).transpose(1, 2).reshape(2, -1, heads * d)
        expected = x_h + f.attn.to_out[0](mixed).transpose(1, 2).reshape(x_h.shape)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, x_h)


def test_added_attentions_use_pytorch_sdpa(unet):
    """Fusion and Conditional Attention have H*W keys: they must run through SDPA (fused kernels on GPU)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = XPSRModel.build(unet)
    added = [m.fusion.attn for m in model.controlnet.sfa_modules().values()]
    added += [layer.attn for layer in model.conditional_attention.layers]
    assert len(added) == 7 + 12  # 3 cross-attention down blocks x 2 + mid block; 4 up blocks x 3 layers
    assert all(isinstance(attn.processor, AttnProcessor2_0) for attn in added)


@pytest.mark.parametrize("mode,ignores", [("high", "c_l"), ("low", "c_h"), ("serial", None)])
def test_ablation_modes_read_the_right_prompts(unet, inputs, mode, ignores):
    torch.manual_seed(0)
    model = XPSRModel.build(unet, XPSRSettings(sfa_mode=mode)).eval()
    _perturb_(_diffusers_zero_params(model.controlnet), seed=3)
    _perturb_([p for proj in model.controlnet.new_output_projections() for p in proj.parameters()], seed=5)

    def run(c_h, c_l):
        with torch.no_grad():
            return model.controlnet(
                inputs["noisy_latents"], inputs["timesteps"], c_h, inputs["condition"], low_level_hidden_states=c_l
            ).down_block_res_samples

    base = run(inputs["c_h"], inputs["c_l"])
    new_h = run(torch.randn_like(inputs["c_h"]), inputs["c_l"])
    new_l = run(inputs["c_h"], torch.randn_like(inputs["c_l"]))
    assert (_max_diff(base, new_l) == 0) == (ignores == "c_l")
    assert (_max_diff(base, new_h) == 0) == (ignores == "c_h")


# ------------------------------------------------------------------------------------- gradients


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(unet, inputs):
    torch.manual_seed(0)
    model = XPSRModel.build(unet)
    model.train()
    trainable = dict(
        (f"{part}.{name}", p)
        for part, module in model.trainable_modules().items()
        for name, p in module.named_parameters()
    )
    assert all(p.requires_grad for p in trainable.values())
    assert not any(p.requires_grad for p in model.frozen_parameters())

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_dfc=True)
        loss, _ = training_loss(out.sample, torch.randn_like(out.sample), out.dfc)
        loss.backward()

    # At step 0 every trainable parameter is in the graph (zero-initialised outputs give some zero grads).
    step()
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert all(p.grad is None for p in model.frozen_parameters())

    # Once the zero-initialised projections have moved (as after a few steps), every gradient is non-zero.
    with torch.no_grad():
        _perturb_(_diffusers_zero_params(model.controlnet) + _new_zero_params(model), seed=7, scale=0.05)
    step()
    dead = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert all(p.grad is None for p in model.frozen_parameters())


def test_gradient_checkpointing_gives_same_loss_and_gradients(unet, inputs):
    torch.manual_seed(0)
    model = XPSRModel.build(unet)
    _perturb_(_diffusers_zero_params(model.controlnet) + _new_zero_params(model), seed=7, scale=0.05)
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_dfc=True)
        loss, _ = training_loss(out.sample, torch.ones_like(out.sample), out.dfc)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.trainable_parameters()]

    loss_a, grads_a = grads()
    model.enable_gradient_checkpointing()
    loss_b, grads_b = grads()
    model.unet.disable_gradient_checkpointing()
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-5


# ------------------------------------------------------------------------------------- DFC


def test_dfc_loss_terms_are_nonzero_finite_and_fall_when_heads_train(unet, inputs):
    torch.manual_seed(0)
    model = XPSRModel.build(unet)
    out = model(**inputs, return_dfc=True)
    dfc = out.dfc
    assert sorted(dfc.terms) == ["latent_0", "latent_1", "latent_2", "pixel_0", "pixel_1", "pixel_2"]
    assert all(torch.isfinite(v) and v.item() > 0 for v in dfc.terms.values())
    assert torch.isfinite(dfc.total) and dfc.total.item() == pytest.approx(
        sum(v.item() for v in dfc.terms.values()), rel=1e-6
    )
    # Scales: pixel levels at HR/2, HR/4, HR/8; latent levels at h, h/2, h/4.
    assert [tuple(dfc.predictions[f"pixel_{i}"].shape[-2:]) for i in range(3)] == [
        (HR // 2,) * 2,
        (HR // 4,) * 2,
        (HR // 8,) * 2,
    ]
    assert [tuple(dfc.predictions[f"latent_{i}"].shape[-2:]) for i in range(3)] == [
        (LATENT,) * 2,
        (LATENT // 2,) * 2,
        (LATENT // 4,) * 2,
    ]
    assert [dfc.predictions[f"latent_{i}"].shape[1] for i in range(3)] == [4, 4, 4]

    # Without return_dfc nothing DFC-related is computed.
    with torch.no_grad():
        assert model(**inputs).dfc is None

    # Optimise only the heads on fixed features: the loss falls.
    with torch.no_grad():
        cn = model.controlnet(
            inputs["noisy_latents"],
            inputs["timesteps"],
            inputs["c_h"],
            inputs["condition"],
            inputs["c_l"],
            return_features=True,
        )
    heads = model.dfc_heads
    optimiser = torch.optim.Adam(heads.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = heads.loss(cn.pixel_features, cn.latent_features, inputs["hr_image"], inputs["hr_latent"]).total
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_dfc_switches_and_missing_targets(unet, inputs):
    model = XPSRModel.build(unet, XPSRSettings(dfc_latent=False, conditional_attention=False))
    assert model.conditional_attention is None
    out = model(**{**inputs, "hr_latent": None}, return_dfc=True)
    assert sorted(out.dfc.terms) == ["pixel_0", "pixel_1", "pixel_2"]
    with pytest.raises(ValueError, match="HR image"):
        model(**{**inputs, "hr_image": None}, return_dfc=True)


# ------------------------------------------------------------------------------------- persistence and loading


def test_save_then_load_gives_bit_identical_outputs(unet, inputs, tiny_models, tmp_path):
    torch.manual_seed(0)
    model = XPSRModel.build(unet, XPSRSettings(sfa_mode="serial"))
    _perturb_(_diffusers_zero_params(model.controlnet) + _new_zero_params(model), seed=11)
    model.eval()
    folder = model.save_trainable(tmp_path / "xpsr")
    for part in ("controlnet", "conditional_attention", "dfc_heads"):
        assert (folder / part / "config.json").is_file()
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "xpsr.json").read_text())["settings"]["sfa_mode"] == "serial"

    loaded = XPSRModel.from_base(tiny_models.sd, trainable=folder).eval()
    assert loaded.settings.sfa_mode == "serial" and isinstance(loaded.dfc_heads, DFCHeads)
    with torch.no_grad():
        a = model(**inputs, return_dfc=True)
        b = loaded(**inputs, return_dfc=True)
    assert torch.equal(a.sample, b.sample)
    assert torch.equal(a.dfc.total, b.dfc.total)
    for part, module in model.trainable_modules().items():
        other = loaded.trainable_modules()[part].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items()), part


def test_settings_are_validated_and_load_from_saved_dicts(unet, tmp_path):
    import dataclasses

    with pytest.raises(ValueError, match="sfa_mode"):
        XPSRSettings(sfa_mode="both")
    saved = dataclasses.asdict(XPSRSettings.official(fusion_heads=4)) | {
        "conditioning_embedding_out_channels": [8, 16, 32, 64], "option_of_another_version": 1}
    expected = XPSRSettings.official(fusion_heads=4, conditioning_embedding_out_channels=(8, 16, 32, 64))
    assert XPSRSettings.from_dict(saved) == expected
    (tmp_path / "xpsr.json").write_text(json.dumps({"settings": {"fusion": "mlp"}}))
    with pytest.raises(UserError, match=r"not a valid XPSR settings file \(fusion: Input should be 'attention' or "
                                        r"'transformer' \(got 'mlp'\)\)"):
        XPSRModel.load_trainable(tmp_path, unet)


def test_cpu_models_keep_conv_weights_channels_last_with_unchanged_outputs(unet, inputs, tiny_models):
    """On the CPU the loader and XPSRModel store 4-D weights channels-last (oneDNN's fast layout, see
    benchmarks/bench_layout.py); the outputs match those of PyTorch's default layout."""
    vae = load_base_sd(tiny_models.sd, components=("vae",)).vae
    model = XPSRModel.build(unet).eval()
    for module in (unet, vae, model.controlnet, model.dfc_heads):
        convs = [p for p in module.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)

    def outputs():
        with torch.no_grad():
            return vae.encode(inputs["hr_image"]).latent_dist.mean, model(**inputs, return_dfc=True)

    fast_latent, fast = outputs()
    for module in (vae, model):
        module.to(memory_format=torch.contiguous_format)
    plain_latent, plain = outputs()
    for module in (vae, model):
        module.to(memory_format=torch.channels_last)  # the shared unet fixture as the loader left it
    assert torch.allclose(fast_latent, plain_latent, atol=1e-5)
    assert torch.allclose(fast.sample, plain.sample, atol=1e-5)
    assert torch.allclose(fast.dfc.total, plain.dfc.total, atol=1e-5)


def test_tiny_folder_and_hub_id_go_through_the_same_loader(tiny_models, monkeypatch):
    calls, loads = [], []
    real_loader = xpsr_module.load_base_sd
    monkeypatch.setattr(xpsr_module, "load_base_sd", lambda *a, **k: (calls.append(a[0]), real_loader(*a, **k))[1])
    real_from_pretrained = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loads.append((str(args[0]), kwargs.get("subfolder")))
        return real_from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    model = XPSRModel.from_base(tiny_models.sd, with_dfc=False)
    assert calls == [tiny_models.sd]
    assert loads == [(str(tiny_models.sd), "unet")]
    assert model.dfc_heads is None and not any(p.requires_grad for p in model.unet.parameters())

    # A hub id takes the same path (offline here, so it ends in a clean UserError).
    with pytest.raises(UserError, match="base model"):
        XPSRModel.from_base("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert calls[-1] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert loads[-1] == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet")


def test_missing_or_malformed_model_folders_raise_user_errors(tiny_models, tmp_path):
    import shutil

    with pytest.raises(UserError, match="does not exist"):
        load_base_sd(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        load_base_sd(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models.sd, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="unet"):
        load_base_sd(broken, components=("unet",))
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="vae/"):
        load_base_sd(broken)
    with pytest.raises(UserError, match="xpsr.json"):
        XPSRModel.from_base(tiny_models.sd, trainable=tmp_path / "empty")


def test_unet_forward_without_controlnet_matches_diffusers(unet, inputs):
    with torch.no_grad():
        ref = unet(inputs["noisy_latents"], inputs["timesteps"], encoder_hidden_states=inputs["c_h"]).sample
        got = xpsr_unet_forward(unet, inputs["noisy_latents"], inputs["timesteps"], inputs["c_h"])
        # Odd latent sizes take diffusers' explicit upsample-size path.
        odd = inputs["noisy_latents"][..., :13, :11]
        ref_odd = unet(odd, inputs["timesteps"], encoder_hidden_states=inputs["c_h"]).sample
        got_odd = xpsr_unet_forward(unet, odd, inputs["timesteps"], inputs["c_h"])
    assert torch.equal(ref, got)
    assert torch.equal(ref_odd, got_odd)
