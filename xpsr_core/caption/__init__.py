"""Captioning LR images with a multimodal LLM (LLaVA family through transformers)."""

from .captioner import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, Captioner, GenerationSettings, clip_token_counter

__all__ = ["CONTENT_INSTRUCTION", "QUALITY_INSTRUCTION", "Captioner", "GenerationSettings", "clip_token_counter"]
