"""The text conditioning's settings: the negative prompt and how many CLIP positions a caption fills.

No torch, numpy or transformers here, so every settings module can take these and fail fast on a bad value;
:mod:`.encoding` encodes prompts to this length.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

NEGATIVE_PROMPT = "blurry, dotted, noise, unclear, low-res, over-smoothed"

CLIP_WINDOW = 77  # CLIP's text positions: BOS, 75 caption tokens, EOS
WINDOW_TOKENS = CLIP_WINDOW - 2


def check_max_caption_tokens(value: int) -> int:
    if value < CLIP_WINDOW or value % CLIP_WINDOW:
        raise ValueError(f"max_caption_tokens must be {CLIP_WINDOW} or a multiple of it (154, 231, ...), got {value}")
    return value


MaxCaptionTokens = Annotated[int, AfterValidator(check_max_caption_tokens)]


def max_caption_tokens_field():
    """The one definition of the text conditioning's length, shared by the model, caption and embed settings."""
    return Field(
        CLIP_WINDOW,
        description="Length of the text conditioning in CLIP positions: 77 (one CLIP window, as the paper and the "
        "authors' checkpoint) or a multiple (154, 231, ...), which encodes captions in 75-token windows, each with "
        "its own BOS/EOS, concatenated; shorter captions are padded with the empty prompt's windows.")


def caption_capacity(max_tokens: int) -> int:
    """Caption tokens (BOS/EOS not counted) that reach the model at ``max_tokens``: 75 per window."""
    return max_tokens // CLIP_WINDOW * WINDOW_TOKENS


def caption_truncated(clip_tokens: int, max_tokens: int) -> bool:
    """Whether a caption of ``clip_tokens`` tokens (BOS/EOS included) loses tokens at ``max_tokens``."""
    return clip_tokens - 2 > caption_capacity(max_tokens)
