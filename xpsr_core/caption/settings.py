"""What captioning is asked and how: the paper's two instructions, the decoding (:class:`GenerationSettings`) and
the caption stage's settings (:class:`CaptionSettings`). No torch or transformers here (:mod:`.captioner` runs
the models), so both the captioner and the SR settings take the instructions from this module.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..config import DeviceName, device_field, recipe_field, runtime_field
from ..text_conditioning import MaxCaptionTokens, max_caption_tokens_field

CAPTION_KINDS = ("content", "quality")
HR_KIND = "hr_quality"  # the quality caption of the HR image (caption_hr)

# The paper's two instructions (section 3.3).
CONTENT_INSTRUCTION = "Please provide a descriptive summary of the content of this image"
QUALITY_INSTRUCTION = (
    "Please describe the quality of this image and evaluate it based on factors such as clarity, color, noise, "
    "and lighting"
)


class GenerationSettings(BaseModel):
    """How captions are decoded: the arguments of generate() (frozen, so loaded captioners can be cached by them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Most tokens generated per caption.")
    do_sample: bool = recipe_field(False, description="Sample the tokens (the caption stage seeds each caption by its "
                                   "key and kind); off: greedy decoding, so reruns are identical.")
    temperature: float = recipe_field(1.0, gt=0, description="Softmax temperature when sampling.")
    top_p: float = recipe_field(1.0, gt=0, le=1, description="Nucleus sampling: draw from the smallest set of tokens "
                                "whose probabilities reach top_p (1: all tokens).")
    num_beams: int = recipe_field(1, ge=1, description="Beam search width (1: no beam search).")
    repetition_penalty: float = recipe_field(1.0, gt=0, description="Penalty on tokens already generated (1: none; "
                                             "above 1 discourages repeats).")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


ENGINES = ("transformers", "openai")


class ServingSettings(BaseModel):
    """Where captions are generated: transformers in this process, or an OpenAI-compatible server."""

    engine: Literal["transformers", "openai"] = runtime_field(
        "transformers", "transformers: load the captioner in this process; openai: send each prompt to an "
        "OpenAI-compatible server (vLLM...) at `endpoint`.")
    endpoint: Optional[str] = runtime_field(
        None, "Base URL of the server's OpenAI API, e.g. http://127.0.0.1:8000/v1 (engine=openai).")
    api_model: Optional[str] = Field(
        None, description="The model name the server serves (engine=openai); null: the value of `captioner`, as "
        "vLLM names a model served with --model PATH.")
    quality_endpoint: Optional[str] = runtime_field(
        None, "Base URL of the server of `quality_model` (engine=openai); null: `endpoint`.")
    quality_api_model: Optional[str] = Field(
        None, description="The name the server gives `quality_model` (engine=openai); null: `quality_model`.")
    api_key_env: Optional[str] = runtime_field(
        None, "The NAME of an environment variable holding the server's API key (sent as a bearer token; the key "
        "itself is never written anywhere); null: no key.")
    concurrency: int = runtime_field(32, "Requests in flight to the server (engine=openai).", ge=1, le=4096)
    request_timeout: float = runtime_field(300.0, "Seconds to wait for one answer of the server.", gt=0)
    max_retries: int = runtime_field(
        5, "Retries of a request after a connection error, a timeout, 408, 429 or 5xx, with exponential backoff.",
        ge=0, le=100)

    @property
    def served(self) -> bool:
        return self.engine == "openai"


def prefixed_serving_fields(prefix: str) -> dict:
    """The content captioner's serving fields under ``prefix`` (``xpsr sr``: caption_engine, caption_endpoint...),
    as create_model takes them."""
    return {prefix + name: (info.annotation, info) for name, info in ServingSettings.model_fields.items()
            if not name.startswith("quality_")}


class CaptionSettings(ServingSettings, GenerationSettings):
    """The captioners, their instructions and generation settings (the fields of :class:`GenerationSettings`,
    flat beside these), where they run (:class:`ServingSettings`), and the tokenizer that counts caption tokens."""

    # fields may be assigned, as on every stage config; generation() is what caches are keyed by
    model_config = ConfigDict(extra="forbid", frozen=False)
    captioner: str = Field("models/tiny/captioner", description="Captioner folder or hub id (llava-hf layout or "
                           "any image-text-to-text model with a chat template).")
    quality_model: Optional[str] = recipe_field(
        None, description="A second captioner for the quality captions (e.g. a Q-Instruct LLaVA-1.5 fine-tune, as the "
        "authors train with); null: `captioner` writes both.")
    quality_trust_remote_code: bool = runtime_field(
        False, "Let the quality model's folder run its own Python code (passed to its from_pretrained only).",
        recipe=True)
    caption_hr: bool = recipe_field(
        False, description="Also caption each pair's HR image with the quality instruction (hr_quality_* columns) for "
        "training with the HR image as the condition (train.hr_condition_probability). Pair shards only.")
    base_model: str = Field("models/tiny/sd15",
                            description="Base SD folder whose CLIP tokenizer counts caption tokens.")
    # the limit the token counts are held against (clip_token_limit, *_truncated): the model's text conditioning
    max_caption_tokens: MaxCaptionTokens = max_caption_tokens_field()
    content_instruction: str = recipe_field(CONTENT_INSTRUCTION, description="The instruction of the content captions.")
    quality_instruction: str = recipe_field(QUALITY_INSTRUCTION, description="The instruction of the quality captions.")
    batch_size: int = Field(8, ge=1, le=1024, description="Images per generate() call (two prompts each).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="The captioners' weights and "
                                                             "activations (half precision on a GPU).")
    seed: int = Field(0, description="Seed of sampled captions (do_sample), drawn per image key and caption kind.")
    device: DeviceName = device_field(" Under torchrun each rank uses its LOCAL_RANK GPU.")

    def generation(self) -> GenerationSettings:
        """The generation fields alone: what a captioner is cached by and what every row records."""
        # validated already, as fields of this model
        return GenerationSettings.model_construct(**self.model_dump(include=set(GenerationSettings.model_fields)))

    @property
    def separate_quality(self) -> bool:
        return self.quality_model is not None

    def kinds(self, hr: bool) -> tuple[str, ...]:
        """The captions of a row: content and quality of the LR image, plus the HR image's quality with ``hr``."""
        return CAPTION_KINDS + ((HR_KIND,) if hr else ())
