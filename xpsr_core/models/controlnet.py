"""XPSR ControlNet: diffusers' ControlNet encoder blocks with Semantic-Fusion Attention.

The module tree follows diffusers' ``ControlNetModel`` for SD-1.x/2.x UNets (``conv_in``,
``time_proj``, ``time_embedding``, ``controlnet_cond_embedding``, ``down_blocks``,
``controlnet_down_blocks``, ``mid_block``, ``controlnet_mid_block``), built from diffusers'
blocks (``get_down_block``, ``UNetMidBlock2DCrossAttn``, ``ControlNetConditioningEmbedding``),
except that every cross-attention ``Transformer2DModel`` of the down and mid blocks is wrapped
in a :class:`~xpsr_core.models.sfa.SemanticFusionTransformer` (keys ``...attentions.N.high.*``,
``...attentions.N.low.*``, ``...attentions.N.fusion.*``). A plain diffusers ControlNet or UNet
state dict maps onto it with :meth:`XPSRControlNet.load_plain_state_dict`.

Besides the residuals, the forward can return the features the Degradation-Free Constraint
reads (``return_features=True``):

* ``pixel_features``: the three downsampled levels of the pyramid conditioning encoder
  (after each stride-2 conv + SiLU: H/2, H/4, H/8 of the HR-sized condition; 32, 96, 256
  channels with the default ``(16, 32, 96, 256)`` encoder).
* ``latent_features``: the output of the last layer (resnet + SFA) of each of the first three
  ControlNet down blocks, before their downsampler: latent scales h, h/2, h/4 (320, 640, 1280
  channels on SD-1.5).
* ``residual_features``: the 12 down residuals and the mid residual after their zero convs and
  before ``conditioning_scale``: what the authors' 13 latent DFC heads read.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.utils import BaseOutput
from torch import nn

from .sfa import FUSION_TYPES, LOW_LEVEL_KEY, SFA_MODES, SemanticFusionTransformer

DFC_LEVELS = 3
INITS = ("zero", "official")  # zero: step 0 equals plain ControlNet | official: the authors' initialisation


@dataclass
class XPSRControlNetOutput(BaseOutput):
    down_block_res_samples: tuple
    mid_block_res_sample: torch.Tensor
    pixel_features: Optional[tuple] = None
    latent_features: Optional[tuple] = None
    residual_features: Optional[tuple] = None


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def match_device_dtype(module: nn.Module, like: nn.Module) -> nn.Module:
    """Move ``module`` to ``like``'s device and dtype (no-op, and no diffusers cast warning, when equal)."""
    if module.device != like.device:
        module = module.to(like.device)
    if module.dtype != like.dtype:
        module = module.to(like.dtype)
    return module


def run_down_block(block, sample, emb, encoder_hidden_states, attention_mask=None, cross_attention_kwargs=None,
                   encoder_attention_mask=None):
    """One diffusers down block; only blocks with cross-attention receive the text context."""
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
    return block(hidden_states=sample, temb=emb)


def _per_block(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _check_layout(sfa_mode: str, fusion_type: str, conditioning_embedding_out_channels: Sequence[int],
                  down_block_types: Sequence[str], block_out_channels: Sequence[int]) -> None:
    """Refuse constructor arguments that describe no XPSR ControlNet."""
    if sfa_mode not in SFA_MODES:
        raise ValueError(f"sfa_mode must be one of {SFA_MODES}, got {sfa_mode!r}")
    if fusion_type not in FUSION_TYPES:
        raise ValueError(f"fusion_type must be one of {FUSION_TYPES}, got {fusion_type!r}")
    if len(conditioning_embedding_out_channels) != DFC_LEVELS + 1:
        raise ValueError(
            "conditioning_embedding_out_channels needs 4 entries (input level + 3 downsampling levels)"
        )
    if len(block_out_channels) != len(down_block_types):
        raise ValueError("block_out_channels and down_block_types must have the same length")


def check_unet_supported(unet) -> None:
    """XPSR is defined on SD-1.x/2.x UNets; refuse configs whose extra embeddings it does not wire."""
    config = unet.config
    unsupported = {
        "class_embed_type": config.get("class_embed_type"),
        "num_class_embeds": config.get("num_class_embeds"),
        "addition_embed_type": config.get("addition_embed_type"),
        "encoder_hid_dim_type": config.get("encoder_hid_dim_type"),
        "encoder_hid_dim": config.get("encoder_hid_dim"),
    }
    found = {k: v for k, v in unsupported.items() if v is not None}
    if found:
        raise ValueError(f"XPSR supports Stable Diffusion 1.x/2.x UNets; this UNet sets {found}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"XPSR needs a cross-attention mid block, got {config.get('mid_block_type')}")


class XPSRControlNet(ModelMixin, ConfigMixin):
    """ControlNet whose cross-attention transformers are Semantic-Fusion Attention modules."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | Sequence[int] = 1,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: Optional[int | Sequence[int]] = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
        sfa_mode: str = "parallel",
        fusion_heads: Optional[int] = None,
        fusion_type: str = "attention",
    ):
        super().__init__()
        _check_layout(sfa_mode, fusion_type, conditioning_embedding_out_channels, down_block_types, block_out_channels)
        blocks = len(down_block_types)
        # diffusers' historical naming: attention_head_dim is the number of heads when num_attention_heads is unset
        heads = _per_block(num_attention_heads or attention_head_dim, blocks)
        transformer_layers = _per_block(transformer_layers_per_block, blocks)
        time_embed_dim = block_out_channels[0] * 4
        # the keyword arguments get_down_block and UNetMidBlock2DCrossAttn share
        shared = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      resnet_time_scale_shift=resnet_time_scale_shift)

        # built in diffusers' order: the state dict's key order and the initial random draws follow it
        self._add_input_layers(in_channels, conditioning_channels, flip_sin_to_cos, freq_shift, act_fn,
                               block_out_channels[0], time_embed_dim, conditioning_embedding_out_channels)
        self._add_down_blocks(down_block_types, block_out_channels, layers_per_block, downsample_padding, heads,
                              _per_block(attention_head_dim, blocks), _per_block(only_cross_attention, blocks),
                              transformer_layers, shared)
        self.mid_block = UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=transformer_layers[-1], in_channels=block_out_channels[-1],
            output_scale_factor=mid_block_scale_factor, num_attention_heads=heads[-1], **shared,
        )
        self.controlnet_mid_block = _zero_conv(block_out_channels[-1])
        self._wrap_transformers_in_sfa(sfa_mode, fusion_heads, fusion_type)
        self.latent_feature_blocks = [i for i in range(min(DFC_LEVELS, blocks))]

    def _add_input_layers(self, in_channels: int, conditioning_channels: int, flip_sin_to_cos: bool, freq_shift: int,
                          act_fn: str, channels: int, time_embed_dim: int,
                          conditioning_embedding_out_channels: Sequence[int]) -> None:
        """``conv_in``, the timestep projection and embedding, and the conditioning encoder."""
        self.conv_in = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(channels, time_embed_dim, act_fn=act_fn)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=channels,
            conditioning_channels=conditioning_channels,
            block_out_channels=tuple(conditioning_embedding_out_channels),
        )

    def _add_down_blocks(self, down_block_types: Sequence[str], block_out_channels: Sequence[int],
                         layers_per_block: int, downsample_padding: int, heads: list, head_dims: list,
                         cross_only: list, transformer_layers: list, shared: dict) -> None:
        """The down blocks, and a zero conv per residual they push (``conv_in``'s first)."""
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final = i == len(down_block_types) - 1
            block = get_down_block(
                block_type,
                num_layers=layers_per_block,
                transformer_layers_per_block=transformer_layers[i],
                in_channels=input_channel,
                out_channels=output_channel,
                add_downsample=not is_final,
                num_attention_heads=heads[i],
                attention_head_dim=head_dims[i] if head_dims[i] is not None else output_channel,
                downsample_padding=downsample_padding,
                only_cross_attention=cross_only[i],
                **shared,
            )
            self.down_blocks.append(block)
            for _ in range(layers_per_block + (0 if is_final else 1)):
                self.controlnet_down_blocks.append(_zero_conv(output_channel))

    def _wrap_transformers_in_sfa(self, sfa_mode: str, fusion_heads: Optional[int], fusion_type: str) -> None:
        """Replace every transformer of the down and mid blocks by an SFA module around it."""
        for block in list(self.down_blocks) + [self.mid_block]:
            attentions = getattr(block, "attentions", None)
            if attentions is None:
                continue
            for j in range(len(attentions)):
                attentions[j] = SemanticFusionTransformer(attentions[j], mode=sfa_mode, fusion_heads=fusion_heads,
                                                          fusion=fusion_type)

    # ------------------------------------------------------------------ construction

    @classmethod
    def config_from_unet(cls, unet, conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                         conditioning_channels: int = 3, **xpsr_options) -> dict:
        """The constructor arguments of an XPSR ControlNet for ``unet`` (its encoder's shapes)."""
        check_unet_supported(unet)
        c = unet.config
        return dict(
            in_channels=c.in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
            down_block_types=tuple(c.down_block_types),
            only_cross_attention=c.only_cross_attention,
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            downsample_padding=c.downsample_padding,
            mid_block_scale_factor=c.mid_block_scale_factor,
            act_fn=c.act_fn,
            norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps,
            cross_attention_dim=c.cross_attention_dim,
            transformer_layers_per_block=c.get("transformer_layers_per_block", 1),
            attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.get("num_attention_heads"),
            use_linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
            resnet_time_scale_shift=c.resnet_time_scale_shift,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            **xpsr_options,
        )

    @classmethod
    def from_unet(
        cls,
        unet,
        sfa_mode: str = "parallel",
        conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
        conditioning_channels: int = 3,
        fusion_heads: Optional[int] = None,
        load_weights_from_unet: bool = True,
        fusion_type: str = "attention",
        init: str = "zero",
    ) -> "XPSRControlNet":
        """Same initialisation as diffusers' ``ControlNetModel.from_unet``, plus SFA branches.

        Both branches of every SFA module get the UNet's transformer weights (the low-level
        branch is a copy of the high-level one). ``init="zero"``: the new output projections stay
        zero (step 0 equals plain ControlNet). ``init="official"`` (the authors' train.py): a
        transformer ``CA_f`` also starts from the UNet's transformer wherever the shapes agree
        (its cross-attention K/V, of another width, stay random) and nothing new is zeroed.
        """
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        controlnet = cls(**cls.config_from_unet(
            unet,
            sfa_mode=sfa_mode,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
            fusion_heads=fusion_heads,
            fusion_type=fusion_type,
        ))
        if load_weights_from_unet:
            plain = {}
            for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
                for key, value in getattr(unet, name).state_dict().items():
                    plain[f"{name}.{key}"] = value
            controlnet.load_plain_state_dict(plain, strict_subset=True)
        if init == "official":
            for module in controlnet.sfa_modules().values():
                for projection in module.new_output_projections():
                    projection.reset_parameters()
            controlnet.copy_high_into_fusion_()
        return match_device_dtype(controlnet, unet)

    @torch.no_grad()
    def copy_high_into_fusion_(self) -> None:
        """The authors' CA_f initialisation: every CA_h tensor whose shape CA_f shares is copied into it."""
        for module in self.sfa_modules().values():
            if module.mode != "parallel" or module.fusion_type != "transformer":
                continue
            fusion = module.fusion.state_dict()
            for key, value in module.high.state_dict().items():
                if key in fusion and fusion[key].shape == value.shape:
                    fusion[key].copy_(value)

    def sfa_modules(self) -> dict[str, SemanticFusionTransformer]:
        return {name: m for name, m in self.named_modules() if isinstance(m, SemanticFusionTransformer)}

    def load_plain_state_dict(self, state_dict: dict, strict_subset: bool = False) -> list[str]:
        """Load weights named like diffusers' ``ControlNetModel`` (plain transformers) into this model.

        Keys under a transformer that is now an SFA module are copied into each of its branches;
        the new output projections are re-zeroed afterwards. Returns the keys of this model that
        the state dict did not provide (the SFA-only parameters, normally). With
        ``strict_subset`` every given key must find a home.
        """
        sfa = self.sfa_modules()
        mapped = {}
        for key, value in state_dict.items():
            owner = next((p for p in sfa if key.startswith(p + ".")), None)
            if owner is None:
                mapped[key] = value
                continue
            rest = key[len(owner) + 1 :]
            for branch in sfa[owner].branches:
                mapped[f"{owner}.{branch}.{rest}"] = value
        result = self.load_state_dict(mapped, strict=False)
        if strict_subset and result.unexpected_keys:
            raise ValueError(f"unexpected weights for XPSRControlNet: {result.unexpected_keys[:5]} ...")
        for module in sfa.values():
            module.reset_new_outputs_()
        return list(result.missing_keys)

    @classmethod
    def from_controlnet(
        cls, controlnet, sfa_mode: str = "parallel", fusion_heads: Optional[int] = None
    ) -> "XPSRControlNet":
        """Start from a trained diffusers ``ControlNetModel`` (its transformers seed both SFA branches)."""
        c = controlnet.config
        model = cls(
            **{k: c[k] for k in cls._init_keys() if k in c and k not in ("sfa_mode", "fusion_heads", "fusion_type")},
            sfa_mode=sfa_mode,
            fusion_heads=fusion_heads,
        )
        model.load_plain_state_dict(controlnet.state_dict(), strict_subset=True)
        return match_device_dtype(model, controlnet)

    @classmethod
    def _init_keys(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def new_output_projections(self) -> list[nn.Module]:
        """The SFA projections that are zero at initialisation (fusion ``to_out``, serial ``proj_out``)."""
        return [proj for m in self.sfa_modules().values() for proj in m.new_output_projections()]

    # ------------------------------------------------------------------ forward

    def _time_embedding(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)
        return self.time_embedding(t_emb)

    def _condition_pyramid(self, condition: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run diffusers' conditioning embedding layer by layer, keeping each downsampled level."""
        encoder = self.controlnet_cond_embedding
        h = F.silu(encoder.conv_in(condition))
        levels = []
        for index, conv in enumerate(encoder.blocks):
            h = F.silu(conv(h))
            if index % 2 == 1:  # after each stride-2 conv
                levels.append(h)
        return encoder.conv_out(h), levels

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        low_level_hidden_states: Optional[torch.Tensor] = None,
        conditioning_scale: float = 1.0,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        return_features: bool = False,
        return_dict: bool = True,
    ):
        """Residuals for the UNet skips and mid block.

        ``encoder_hidden_states`` is c_h (high-level prompt embedding), ``low_level_hidden_states``
        c_l, ``controlnet_cond`` the LR image upsampled to the HR size, in [0, 1].
        """
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        emb = self._time_embedding(sample, timestep)
        sample = self.conv_in(sample)
        cond_embedding, pixel_levels = self._condition_pyramid(controlnet_cond.to(sample.dtype))
        sample = sample + cond_embedding

        kwargs = dict(cross_attention_kwargs or {})
        kwargs[LOW_LEVEL_KEY] = low_level_hidden_states

        res_samples_all = [sample]
        latent_levels = []
        for index, block in enumerate(self.down_blocks):
            sample, res = run_down_block(block, sample, emb, encoder_hidden_states, attention_mask, kwargs)
            res_samples_all.extend(res)
            if index in self.latent_feature_blocks:
                latent_levels.append(res[len(block.resnets) - 1])

        sample = self.mid_block(
            sample,
            emb,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=kwargs,
        )

        down = tuple(conv(r) for r, conv in zip(res_samples_all, self.controlnet_down_blocks))
        mid = self.controlnet_mid_block(sample)
        residual = (*down, mid) if return_features else None
        if conditioning_scale != 1.0:
            down = tuple(r * conditioning_scale for r in down)
            mid = mid * conditioning_scale
        pixel = tuple(pixel_levels) if return_features else None
        latent = tuple(latent_levels) if return_features else None
        if not return_dict:
            return (down, mid, pixel, latent, residual)
        return XPSRControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid, pixel_features=pixel,
                                    latent_features=latent, residual_features=residual)

    def feature_channels(self, latent_source: str = "pyramid") -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(pixel feature channels, latent feature channels) of the DFC levels.

        ``latent_source``: ``pyramid`` (the three down-block outputs) or ``residuals`` (every
        post-zero-conv residual, the mid one last).
        """
        pixel = tuple(self.config.conditioning_embedding_out_channels[1:])
        if latent_source == "residuals":
            latent = tuple(conv.out_channels for conv in self.controlnet_down_blocks) + (
                self.controlnet_mid_block.out_channels,
            )
        else:
            latent = tuple(self.config.block_out_channels[i] for i in self.latent_feature_blocks)
        return pixel, latent
