"""Captioning LR images with a multimodal LLM (LLaVA family through transformers).

The names load on first use; ``xpsr_core.caption.settings`` (the instructions, :class:`GenerationSettings`,
:class:`CaptionSettings`) imports no torch or transformers.
"""

from .. import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("CONTENT_INSTRUCTION", "QUALITY_INSTRUCTION", "GenerationSettings"), ".settings"),
    **dict.fromkeys(("Captioner", "clip_token_counter"), ".captioner"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
