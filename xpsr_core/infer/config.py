"""What an SR run needs, in one config: the model, where captions come from, every sampling value.

`xpsr sr` and `xpsr evaluate` extend :class:`SRModelConfig` with their inputs and outputs. Sampling
values resolve in layers, lowest first: the field defaults; a saved pipeline folder's recorded
defaults (``pipeline``); the named ``preset``; every value given explicitly (params file, CLI
options, ``--set``, keyword arguments). A params file's value that differs from the preset's is
reported in a note (``SRModelConfig.merge_layers``), so a ./params.yaml never changes a preset
silently.

Captions given as text (``content_caption``/``quality_caption``, ``--content``/``--quality``) mean
``captions: given`` unless a layer at least as high names another source, which is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, create_model, model_validator

from ..caption.settings import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, prefixed_serving_fields
from ..compiling import SR_COMPILE_MODES, compile_cache_field, inductor_cache_dir, use_inductor_cache
from ..config import COMMAND_LINE, DeviceName, StageConfig, device_field, recipe_field, runtime_field
from ..dist import rank_device
from ..errors import UserError
from ..io.pipeline_folder import XPSR_SUBFOLDER
from .presets import PRESETS, layered_settings, preset_values
from .settings import SRSettings

SEED_STAGE = "sr"  # the stage name in every image's derived seed (sr and evaluate draw alike)

SAMPLING_FIELDS = tuple(SRSettings.__pydantic_fields__)  # the config fields that are SRSettings fields
CAPTION_TEXTS = {"content_caption": "--content", "quality_caption": "--quality"}  # captions given as text


class SRModelBase(StageConfig):
    """The model, caption and runtime fields of :class:`SRModelConfig` (which adds the sampling fields)."""

    preset: Optional[Literal["default", "paper", "official"]] = recipe_field(
        None, description="Named inference recipe (xpsr_core.infer.presets); explicit values override it.")

    base_model: str = Field("models/tiny/sd15", description="Frozen SD-1.5 folder or hub id.")
    xpsr: Optional[str] = Field(
        "models/xpsr/final",
        description="Trained XPSR folder (XPSRModel.save_trainable layout, or a run folder with final/).")
    pipeline: Optional[str] = Field(None, description="A saved XPSR pipeline folder (replaces base_model and xpsr).")
    captions: Literal["captioner", "manifest", "given"] = Field(
        "captioner", description="Where the captions come from.")
    captioner: str = Field("models/tiny/captioner", description="Captioner folder or hub id (llava-hf layout).")
    content_instruction: str = recipe_field(CONTENT_INSTRUCTION, description="The captioner's instruction for c_h.")
    quality_instruction: str = recipe_field(QUALITY_INSTRUCTION, description="The captioner's instruction for c_l.")
    caption_max_new_tokens: int = Field(128, ge=1, le=4096, description="Most tokens the captioner generates per "
                                        "caption.")
    caption_batch_size: int = runtime_field(4, "Images per captioner generate() call.", ge=1)
    manifest: Optional[Path] = Field(None, description="Caption manifest: a .parquet file or a folder of them.")
    content_caption: str = Field("", description="High-level caption c_h for every image (captions=given).")
    quality_caption: str = Field("", description="Low-level caption c_l for every image (captions=given).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="float16/bfloat16 on a GPU.")
    device: DeviceName = device_field()
    compile: Literal[SR_COMPILE_MODES] = runtime_field(
        "none",
        "torch.compile of the denoiser (ControlNet + UNet, both guidance branches) and the VAE decoder, with static "
        "tile shapes: none (eager), default (inductor) or reduce-overhead (inductor with CUDA graphs; GPUs only). "
        "The first image pays the compile time.",
    )
    compile_cache: Optional[Path] = compile_cache_field()


# every sampling field exactly as SRSettings defines it: type, default, range, description, runtime mark
_SRModelWithSampling = create_model(
    "SRModelWithSampling", __base__=SRModelBase, __module__=__name__,
    **{name: (info.annotation, info) for name, info in SRSettings.__pydantic_fields__.items()},
    # where the captioner runs (captions=captioner): caption_engine, caption_endpoint, caption_api_model...
    **prefixed_serving_fields("caption_"),
)


class SRModelConfig(_SRModelWithSampling):
    """Model, caption and sampling settings shared by `xpsr sr` and `xpsr evaluate`.

    Sampling values resolve in layers, lowest first: the field defaults; a saved pipeline
    folder's recorded defaults (``pipeline``); the named ``preset``; every value given explicitly
    (params file, CLI options, ``--set``, keyword arguments).
    """

    @classmethod
    def merge_layers(cls, layers):
        """The layers merged (``StageConfig.merge_layers``); text captions imply ``captions: given``; notes name
        the params-file values that replace the preset's."""
        merged, notes = super().merge_layers(layers)
        texts = [i for i, (_, values) in enumerate(layers) if any(k in values for k in CAPTION_TEXTS)]
        if texts:
            sources = [i for i, (_, values) in enumerate(layers) if values.get("captions") is not None]
            if not sources or sources[-1] < texts[-1]:
                merged["captions"] = "given"
            elif merged.get("captions") != "given":
                name, values = layers[texts[-1]]
                stated = " and ".join(f"{key}/{flag}" for key, flag in CAPTION_TEXTS.items() if key in values)
                raise UserError(
                    f"{stated} ({name}) gives every image's captions, but captions: {merged['captions']} "
                    f"({layers[sources[-1]][0]}) takes them from the {merged['captions']}: drop one, "
                    "or use --captions given."
                )
        return merged, notes + cls._preset_notes(layers, merged.get("preset"))

    @staticmethod
    def _preset_notes(layers, preset: Any) -> list[str]:
        """A line per params-file layer stating sampling values that differ from ``preset``'s and that no higher
        layer replaces: the params file wins, as the documented precedence says."""
        if preset not in PRESETS:
            return []
        recipe, notes = preset_values(preset), []
        for index, (name, values) in enumerate(layers):
            above = {key for _, higher in layers[index + 1:] for key in higher}
            keys = [k for k in SAMPLING_FIELDS if k in values and k not in above and values[k] != recipe[k]]
            if keys and name != COMMAND_LINE:
                notes.append(f"{name} sets {', '.join(keys)}, which the preset {preset} also sets: {name} wins "
                             "(precedence: preset < params file < command line)")
        return notes

    @model_validator(mode="before")
    @classmethod
    def _text_captions_are_given(cls, data: Any) -> Any:
        """Built from Python (one layer): a caption text and no caption source means captions=given."""
        if isinstance(data, dict) and data.get("captions") is None and any(data.get(k) for k in CAPTION_TEXTS):
            return {**data, "captions": "given"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _layer_sampling_values(cls, data: Any) -> Any:
        """Fill the sampling values not given explicitly from the preset, then the pipeline folder."""
        if not isinstance(data, dict) or not (data.get("preset") or data.get("pipeline")):
            return data

        preset = data.get("preset") if data.get("preset") in PRESETS else None  # an unknown name fails field validation
        return layered_settings(dict(data), preset=preset, pipeline=data.get("pipeline"), fields=set(SAMPLING_FIELDS))

    def sr_settings(self, seed: Any = "config") -> SRSettings:
        """The sampling fields as :class:`SRSettings` (``seed``: another seed than the config's)."""
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        if seed != "config":
            values["seed"] = seed
        return SRSettings(**values)

    def image_seed(self, stem: str) -> Optional[int]:
        """The seed of one image's own generator (generator_scope=image): derived from seed and the image's name."""
        from ..seeding import derive_seed

        return None if self.seed is None else derive_seed(self.seed, SEED_STAGE, stem)


def load_pipeline(config: SRModelConfig):
    """The XPSR pipeline the config names, with its sampling values as the pipeline's settings."""
    from .pipeline import XPSRPipeline

    device = rank_device(config.device)  # auto: this rank's GPU when there is one, else the CPU
    if config.compile == "reduce-overhead" and not str(device).startswith("cuda"):
        raise UserError(f"compile=reduce-overhead (CUDA graphs) needs a GPU; {device} has none. On the CPU use "
                        "compile=default (or none).")
    if config.pipeline:
        pipe = XPSRPipeline.from_pretrained(
            config.pipeline, dtype=config.dtype, device=device, settings=config.sr_settings()
        )
    elif not config.xpsr:
        raise UserError(
            "No trained XPSR folder is configured: pass --xpsr DIR (a training run's final/ folder) or --pipeline DIR."
        )
    else:
        pipe = XPSRPipeline.from_pretrained(base_model=config.base_model, xpsr=config.xpsr, dtype=config.dtype,
                                            device=device, settings=config.sr_settings())
    if config.compile != "none":
        use_inductor_cache(inductor_cache_dir(config.compile_cache, Path(getattr(config, "out", "outputs/sr"))))
        pipe.compile(config.compile)
    return pipe


def check_model_paths(config: SRModelConfig) -> None:
    """Fail before any work when a configured local model folder is missing."""
    from ..models.loading import check_base_model

    if config.pipeline:
        if not Path(config.pipeline).is_dir():
            raise UserError(f"The pipeline folder {config.pipeline} does not exist.")
        from ..models.xpsr import check_trainable_folder

        check_base_model(config.pipeline)  # every SD component, then the XPSR parts, before any captioning
        check_trainable_folder(Path(config.pipeline) / XPSR_SUBFOLDER)
        return
    check_base_model(config.base_model)
    if config.xpsr and not Path(os.path.expanduser(config.xpsr)).exists():
        raise UserError(
            f"The XPSR checkpoint folder {config.xpsr} does not exist. Train one with `xpsr train` and point --xpsr at "
            "its run folder's final/ (or any folder written by XPSRModel.save_trainable)."
        )
