"""The XPSR architecture switches (:class:`XPSRSettings`): the paper's ablations and the authors' released
architecture. No torch here, so training settings and saved-folder checks validate before any model loads.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..config import recipe_field
from ..text_conditioning import MaxCaptionTokens, max_caption_tokens_field


@pydantic_dataclass
class XPSRSettings:
    """Architecture switches (the paper's ablations, and the authors' released architecture) and the length of
    the text conditioning (``max_caption_tokens``).

    ``XPSRSettings.official()`` is the architecture of the authors' checkpoint. A pydantic dataclass: values are
    validated on construction, and ``dataclasses.asdict``/``replace`` work as on any dataclass.
    """

    sfa_mode: Literal["parallel", "serial", "high", "low"] = recipe_field(
        "parallel", description="parallel: the SFA (CA_h and CA_l side by side, fused by CA_f); serial: CA_l after "
        "CA_h; high / low: CA_h or CA_l alone (the paper's ablations).")
    conditional_attention: bool = recipe_field(
        True, description="Conditional Attention in the UNet decoder (off: the ControlNet residuals are only added).")
    dfc_pixel: bool = recipe_field(
        True, description="DFC heads mapping the conditioning encoder's levels to RGB, against the HR image.")
    dfc_latent: bool = recipe_field(
        True, description="DFC heads mapping ControlNet features to latents, against the HR latent.")
    conditioning_embedding_out_channels: tuple[int, ...] = Field(
        (16, 32, 96, 256), description="Channels of the ControlNet's conditioning embedding, per level.")
    fusion_heads: Optional[int] = Field(None, ge=1, description="Attention heads of CA_f (null: those of the "
                                        "transformer it wraps).")
    fusion: Literal["attention", "transformer"] = recipe_field(
        "attention", description="CA_f: attention (the paper) or a full transformer (the authors' code).")
    conditional_attention_type: Literal["attention", "transformer"] = recipe_field(
        "attention", description="Conditional Attention layers: attention (the paper) or full transformers (the "
        "authors' pixel attentions).")
    dfc_latent_heads: Literal["pyramid", "residuals"] = recipe_field(
        "pyramid", description="3 heads on the down-block outputs, or 13 on the post-zero-conv residuals (the "
        "authors').")
    dfc_target_resize: Literal["area", "bilinear"] = recipe_field(
        "area", description="How the DFC targets are resized to each level: area averaging, or bilinear (the "
        "authors').")
    init: Literal["zero", "official"] = recipe_field(
        "zero", description="zero: step 0 equals plain ControlNet + SD; official: the authors' initialisation.")
    # the text conditioning: embed, training and inference encode captions to this length
    max_caption_tokens: MaxCaptionTokens = max_caption_tokens_field()

    @classmethod
    def official(cls, **overrides) -> "XPSRSettings":
        values = dict(fusion="transformer", conditional_attention_type="transformer", dfc_latent_heads="residuals",
                      dfc_target_resize="bilinear", init="official")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, data: dict) -> "XPSRSettings":
        """Settings from a saved dict (keys of other versions are left out); a ValueError names each bad value."""
        try:
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except ValidationError as error:
            raise ValueError("; ".join(f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']} "
                                       f"(got {problem['input']!r})" for problem in error.errors())) from None
