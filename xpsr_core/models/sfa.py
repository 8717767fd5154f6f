"""Semantic-Fusion Attention (XPSR §3.4) around diffusers' ``Transformer2DModel`` blocks.

Each cross-attention transformer of the ControlNet becomes a :class:`SemanticFusionTransformer`:

* ``parallel`` (the paper's SFA, eq. 2):
  ``x_h = CA_h(x, c_h)``, ``x_l = CA_l(x, c_l)``, ``out = CA_f(Q=x_h, K/V=x_l)``.
  ``CA_h`` and ``CA_l`` are whole diffusers ``Transformer2DModel`` blocks (self-attention,
  cross-attention, feed-forward); ``CA_l`` starts as a copy of ``CA_h``. ``CA_f`` is
  :class:`FusionAttention`, a residual cross-attention from ``x_h`` tokens to ``x_l`` tokens whose
  output projection starts at zero, so at initialisation ``out == x_h`` (plain ControlNet).
  With ``fusion="transformer"`` (the authors' released code) ``CA_f`` is instead a whole
  ``Transformer2DModel`` built like ``CA_h`` but cross-attending to ``C`` channels, called as
  ``CA_f(x_h, encoder_hidden_states=tokens(x_l))`` (no norm on the ``x_l`` tokens); its residual
  ``proj_out`` is what starts at zero under the zero initialisation.
* ``serial`` (eq. 1): ``out = CA_l(CA_h(x, c_h), c_l)``, with ``CA_l``'s output projection zeroed
  at initialisation (so again ``out == x_h`` at step 0).
* ``high``: only ``CA_h(x, c_h)`` (plain ControlNet).
* ``low``: only ``CA_l(x, c_l)``.

The low-level prompt embedding ``c_l`` reaches these modules through diffusers'
``cross_attention_kwargs`` under :data:`LOW_LEVEL_KEY`; the wrapper removes it before calling the
inner transformers, so diffusers' attention processors never see it.

Every attention here runs through diffusers' ``AttnProcessor2_0``, i.e. PyTorch's
``scaled_dot_product_attention``: on GPU the fused (flash / memory-efficient) kernels are used and
no ``(H*W) x (H*W)`` score matrix is materialised for the fusion attention, whose K/V length is
the number of pixels of the level.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

LOW_LEVEL_KEY = "xpsr_low_level_hidden_states"
SFA_MODES = ("parallel", "serial", "high", "low")
FUSION_TYPES = ("attention", "transformer")  # CA_f: ours (the paper's eq. 2) | the authors' full transformer


def _zero_(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = like.shape
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class TokenCrossAttention(nn.Module):
    """Residual cross-attention between two feature maps, zero-initialised output projection.

    ``out = x + to_out(SDPA(norm_q(x) Wq, norm_kv(ctx) Wk, norm_kv(ctx) Wv))`` over the flattened
    pixels of ``x`` (queries) and ``ctx`` (keys/values). Used as the SFA fusion attention
    (``CA_f``) and as the UNet's Conditional Attention.
    """

    def __init__(self, channels: int, context_channels: int, heads: int, eps: float = 1e-5):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.norm_q = nn.LayerNorm(channels, eps=eps)
        self.norm_kv = nn.LayerNorm(context_channels, eps=eps)
        self.attn = Attention(
            query_dim=channels,
            cross_attention_dim=context_channels,
            heads=heads,
            dim_head=channels // heads,
            bias=False,
            out_bias=True,
            processor=AttnProcessor2_0(),
        )
        _zero_(self.attn.to_out[0])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = self.norm_q(to_tokens(x))
        keys = self.norm_kv(to_tokens(context).to(query.dtype))
        out = self.attn(query, encoder_hidden_states=keys)
        return x + _from_tokens(out, x)

    @property
    def output_projection(self) -> nn.Linear:
        return self.attn.to_out[0]


class FusionAttention(TokenCrossAttention):
    """``CA_f``: queries from the high-level branch output, keys/values from the low-level one."""

    def __init__(self, channels: int, heads: int, eps: float = 1e-5):
        super().__init__(channels, channels, heads, eps=eps)


def transformer_like(
    transformer: nn.Module, cross_attention_dim: int, num_attention_heads: Optional[int] = None
) -> nn.Module:
    """A fresh diffusers ``Transformer2DModel`` with ``transformer``'s hyper-parameters and another context width."""
    # private keys such as _use_default_values would make from_config drop the head layout
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config["cross_attention_dim"] = cross_attention_dim
    if num_attention_heads:
        config["attention_head_dim"] = config["in_channels"] // num_attention_heads
        config["num_attention_heads"] = num_attention_heads
    first = next(transformer.parameters())
    with torch.device(first.device):
        module = type(transformer).from_config(config)
    return module if module.dtype == first.dtype else module.to(dtype=first.dtype)


class SemanticFusionTransformer(nn.Module):
    """Drop-in replacement for a ``Transformer2DModel`` inside diffusers' down/mid blocks."""

    def __init__(self, transformer: nn.Module, mode: str = "parallel", fusion_heads: Optional[int] = None,
                 fusion: str = "attention"):
        super().__init__()
        if mode not in SFA_MODES:
            raise ValueError(f"sfa mode must be one of {SFA_MODES}, got {mode!r}")
        if fusion not in FUSION_TYPES:
            raise ValueError(f"fusion must be one of {FUSION_TYPES}, got {fusion!r}")
        self.mode = mode
        self.fusion_type = fusion
        channels = transformer.in_channels
        heads = fusion_heads or transformer.num_attention_heads
        if mode in ("parallel", "serial", "high"):
            self.high = transformer
        if mode in ("parallel", "serial"):
            self.low = copy.deepcopy(transformer)
        if mode == "low":
            self.low = transformer
        if mode == "parallel" and fusion == "attention":
            self.fusion = FusionAttention(channels, heads)
        if mode == "parallel" and fusion == "transformer":
            self.fusion = transformer_like(transformer, channels, fusion_heads)
            _zero_(self.fusion.proj_out)
        if mode == "serial":
            _zero_(self.low.proj_out)
        self.in_channels = channels
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing on the ControlNet

    @property
    def branches(self) -> tuple[str, ...]:
        return {"parallel": ("high", "low"), "serial": ("high", "low"), "high": ("high",), "low": ("low",)}[self.mode]

    def reset_new_outputs_(self) -> None:
        """Zero the projections that make this module equal the plain high-level transformer."""
        for projection in self.new_output_projections():
            _zero_(projection)

    def new_output_projections(self) -> list[nn.Module]:
        if self.mode == "parallel":
            return [self.fusion.proj_out if self.fusion_type == "transformer" else self.fusion.output_projection]
        if self.mode == "serial":
            return [self.low.proj_out]
        return []

    def fuse(self, x_high: torch.Tensor, x_low: torch.Tensor, cross_attention_kwargs=None) -> torch.Tensor:
        """``CA_f``: queries from the high-level branch, keys/values from the low-level branch's pixels."""
        if self.fusion_type == "transformer":
            return self.fusion(
                x_high,
                encoder_hidden_states=to_tokens(x_low),
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(self.fusion, x_high, x_low)
        return self.fusion(x_high, x_low)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        return_dict: bool = False,
        **unused: Any,
    ):
        kwargs = dict(cross_attention_kwargs or {})
        low_level = kwargs.pop(LOW_LEVEL_KEY, None)
        kwargs = kwargs or None
        if self.mode != "high" and low_level is None:
            raise ValueError(f"Semantic-Fusion Attention ({self.mode}) needs the low-level prompt embedding c_l")

        def run(branch: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return branch(
                x,
                encoder_hidden_states=context,
                cross_attention_kwargs=kwargs,
                attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=False,
            )[0]

        if self.mode == "parallel":
            x_high = run(self.high, hidden_states, encoder_hidden_states)
            x_low = run(self.low, hidden_states, low_level)
            out = self.fuse(x_high, x_low, kwargs)
        elif self.mode == "serial":
            out = run(self.low, run(self.high, hidden_states, encoder_hidden_states), low_level)
        elif self.mode == "high":
            out = run(self.high, hidden_states, encoder_hidden_states)
        else:
            out = run(self.low, hidden_states, low_level)
        return (out,)
