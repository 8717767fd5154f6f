"""Conditional Attention in the UNet decoder, added without touching the frozen SD weights.

The diffusers ``UNet2DConditionModel`` is used as loaded (its weights keep their names, so real
SD-1.5 checkpoints load unchanged). The new modules live in a separate
:class:`XPSRConditionalAttention` model (own config, own ``save_pretrained`` folder) and
:func:`xpsr_unet_forward` runs the UNet with them: it calls the UNet's own embeddings, down
blocks and mid block unchanged, and walks the decoder layer by layer so that after each decoder
layer (resnet, then the block's cross-attention transformer when it has one) the hidden states
attend to the ControlNet residual that fed that layer's skip connection:

``h = h + to_out(SDPA(norm_q(h) Wq, norm_kv(r) Wk, norm_kv(r) Wv))`` with ``to_out`` zero at init,

one such layer for every decoder layer (``layers_per_block + 1`` per up block, all up blocks).
With ``layer_type="transformer"`` (the authors' ``pixel_attentions``) each layer is instead a whole
diffusers ``Transformer2DModel`` (in = the layer's channels, context = the skip's channels) called
as ``T(h, encoder_hidden_states=tokens(r))``; its ``proj_out`` is zero under the zero initialisation.
The UNet sees only the high-level prompt embedding c_h. With ``conditional_attention=None`` the
function computes exactly what diffusers' ``UNet2DConditionModel.forward`` computes with ControlNet
residuals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import Transformer2DModel
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .controlnet import match_device_dtype, run_down_block
from .sfa import TokenCrossAttention, to_tokens

LAYER_TYPES = ("attention", "transformer")


def _skip_channels(unet) -> list[int]:
    """Channels of the skip tensors in the order the UNet pushes them (conv_in first)."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels.extend(resnet.out_channels for resnet in block.resnets)
        if getattr(block, "downsamplers", None) is not None:
            channels.append(block.downsamplers[0].out_channels)
    return channels


def decoder_layout(unet) -> tuple[list[int], list[int], list[int], list[int]]:
    """(query channels, skip channels, heads, up-block index) for every decoder layer."""
    skips = _skip_channels(unet)
    blocks = len(unet.up_blocks)
    heads_cfg = unet.config.get("num_attention_heads") or unet.config.attention_head_dim
    heads_cfg = list(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else [heads_cfg] * blocks
    heads_rev = list(reversed(heads_cfg))
    query, context, heads, owner = [], [], [], []
    for i, block in enumerate(unet.up_blocks):
        for resnet in block.resnets:
            query.append(resnet.out_channels)
            context.append(skips.pop())
            heads.append(int(heads_rev[i]))
            owner.append(i)
    return query, context, heads, owner


class XPSRConditionalAttention(ModelMixin, ConfigMixin):
    """One cross-attention per UNet decoder layer (K/V: the ControlNet residual), zero output at init."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        query_channels: Sequence[int] = (),
        context_channels: Sequence[int] = (),
        heads: Sequence[int] = (),
        layer_type: str = "attention",
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        init: str = "zero",
    ):
        super().__init__()
        if not (len(query_channels) == len(context_channels) == len(heads)):
            raise ValueError("query_channels, context_channels and heads must have one entry per decoder layer")
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
        if layer_type == "transformer":
            self.layers = nn.ModuleList(
                Transformer2DModel(h, q // h, in_channels=q, cross_attention_dim=c, norm_num_groups=norm_num_groups,
                                   use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)
                for q, c, h in zip(query_channels, context_channels, heads)
            )
        else:
            self.layers = nn.ModuleList(
                TokenCrossAttention(q, c, h) for q, c, h in zip(query_channels, context_channels, heads)
            )
        for projection in self.output_projections():
            # zero: the UNet is SD-1.5 at step 0; official: the authors' default (random) initialisation
            if init == "zero":
                nn.init.zeros_(projection.weight)
                nn.init.zeros_(projection.bias)
            else:
                projection.reset_parameters()
        self.gradient_checkpointing = False

    @staticmethod
    def config_from_unet(unet, layer_type: str = "attention", init: str = "zero") -> dict:
        """The constructor arguments for ``unet``'s decoder."""
        query, context, heads, _ = decoder_layout(unet)
        config = unet.config
        return dict(query_channels=query, context_channels=context, heads=heads, layer_type=layer_type,
                    norm_num_groups=config.norm_num_groups, use_linear_projection=config.use_linear_projection,
                    upcast_attention=config.upcast_attention, init=init)

    @classmethod
    def from_unet(cls, unet, layer_type: str = "attention", init: str = "zero") -> "XPSRConditionalAttention":
        return match_device_dtype(cls(**cls.config_from_unet(unet, layer_type, init)), unet)

    def output_projections(self) -> list[nn.Module]:
        if self.config.layer_type == "transformer":
            return [layer.proj_out for layer in self.layers]
        return [layer.output_projection for layer in self.layers]

    def attend(self, index: int, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s hidden states attend to the ControlNet residual of its skip."""
        layer = self.layers[index]
        if self.config.layer_type == "transformer":
            # diffusers' transformer checkpoints its own blocks when gradient checkpointing is on
            return layer(
                hidden_states, encoder_hidden_states=to_tokens(residual).to(hidden_states.dtype), return_dict=False
            )[0]
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer, hidden_states, residual)
        return layer(hidden_states, residual)


@dataclass(frozen=True)
class _PassContext:
    """What every block of one UNet pass reads besides its hidden states."""

    emb: torch.Tensor
    encoder_hidden_states: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    encoder_attention_mask: Optional[torch.Tensor]
    cross_attention_kwargs: Optional[dict[str, Any]]


def _attention_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """diffusers' additive form of a 0/1 attention mask (0 where attended, -10000 where masked)."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def _check_conditional_attention(unet, conditional_attention: Optional[XPSRConditionalAttention],
                                 residuals: Optional[list]) -> None:
    if conditional_attention is not None and residuals is None:
        raise ValueError("Conditional Attention needs the ControlNet residuals")
    if conditional_attention is not None and len(conditional_attention.layers) != sum(
        len(b.resnets) for b in unet.up_blocks
    ):
        raise ValueError("Conditional Attention was built for a UNet with a different decoder")


def _run_encoder(unet, sample: torch.Tensor, context: _PassContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``conv_in`` and the down blocks: the encoder's output and the skips, in the order they are pushed."""
    sample = unet.conv_in(sample)
    skips = [sample]
    for block in unet.down_blocks:
        sample, res = run_down_block(block, sample, context.emb, context.encoder_hidden_states,
                                     context.attention_mask, context.cross_attention_kwargs,
                                     context.encoder_attention_mask)
        skips.extend(res)
    return sample, skips


def _run_mid_block(unet, sample: torch.Tensor, context: _PassContext) -> torch.Tensor:
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(
            sample,
            context.emb,
            encoder_hidden_states=context.encoder_hidden_states,
            attention_mask=context.attention_mask,
            cross_attention_kwargs=context.cross_attention_kwargs,
            encoder_attention_mask=context.encoder_attention_mask,
        )
    if unet.mid_block is not None:
        return unet.mid_block(sample, context.emb)
    return sample


def _run_up_block(block, sample: torch.Tensor, skips: list[torch.Tensor], residuals: Optional[list[torch.Tensor]],
                  conditional_attention: Optional[XPSRConditionalAttention], first_layer: int,
                  context: _PassContext, upsample_size) -> torch.Tensor:
    """One up block layer by layer: resnet, its transformer (if any), then the layer's Conditional Attention."""
    attentions = getattr(block, "attentions", None)
    checkpoint = torch.is_grad_enabled() and getattr(block, "gradient_checkpointing", False)
    for j, resnet in enumerate(block.resnets):
        sample = torch.cat([sample, skips[-1 - j]], dim=1)
        if checkpoint:
            sample = block._gradient_checkpointing_func(resnet, sample, context.emb)
        else:
            sample = resnet(sample, context.emb)
        if attentions is not None:
            sample = attentions[j](
                sample,
                encoder_hidden_states=context.encoder_hidden_states,
                cross_attention_kwargs=context.cross_attention_kwargs,
                attention_mask=context.attention_mask,
                encoder_attention_mask=context.encoder_attention_mask,
                return_dict=False,
            )[0]
        if conditional_attention is not None:
            sample = conditional_attention.attend(first_layer + j, sample, residuals[-1 - j])
    if getattr(block, "upsamplers", None) is not None:
        for upsampler in block.upsamplers:
            sample = upsampler(sample, upsample_size)
    return sample


def _run_decoder(unet, sample: torch.Tensor, skips: list[torch.Tensor], residuals: Optional[list[torch.Tensor]],
                 conditional_attention: Optional[XPSRConditionalAttention], context: _PassContext,
                 forward_upsample_size: bool) -> torch.Tensor:
    """The up blocks, each taking its skips (and ControlNet residuals) from the end of the lists."""
    layer_index = 0
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        is_final = i == len(unet.up_blocks) - 1
        count = len(block.resnets)
        block_skips, skips = skips[-count:], skips[:-count]
        block_residuals = None
        if residuals is not None:
            block_residuals, residuals = residuals[-count:], residuals[:-count]
        if not is_final and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        sample = _run_up_block(block, sample, block_skips, block_residuals, conditional_attention, layer_index,
                               context, upsample_size)
        layer_index += count
    return sample


def xpsr_unet_forward(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    down_block_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
    mid_block_additional_residual: Optional[torch.Tensor] = None,
    conditional_attention: Optional[XPSRConditionalAttention] = None,
    attention_mask: Optional[torch.Tensor] = None,
    encoder_attention_mask: Optional[torch.Tensor] = None,
    cross_attention_kwargs: Optional[dict[str, Any]] = None,
) -> torch.Tensor:
    """Noise prediction of a diffusers SD UNet with ControlNet residuals and Conditional Attention."""
    residuals = list(down_block_additional_residuals) if down_block_additional_residuals is not None else None
    _check_conditional_attention(unet, conditional_attention, residuals)

    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])
    attention_mask = _attention_bias(attention_mask, sample.dtype)
    encoder_attention_mask = _attention_bias(encoder_attention_mask, sample.dtype)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = _PassContext(emb, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)

    sample, skips = _run_encoder(unet, sample, context)
    if residuals is not None:
        if len(residuals) != len(skips):
            raise ValueError(f"expected {len(skips)} ControlNet residuals, got {len(residuals)}")
        skips = [s + r for s, r in zip(skips, residuals)]

    sample = _run_mid_block(unet, sample, context)
    if mid_block_additional_residual is not None:
        sample = sample + mid_block_additional_residual

    sample = _run_decoder(unet, sample, skips, residuals, conditional_attention, context, forward_upsample_size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)
