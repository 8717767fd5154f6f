"""Sampling settings defined once (SRSettings) and taken as they are by the sr/evaluate configs; the
captioner's instructions of `xpsr sr`; params files that state each shared value once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILES = ("params.yaml", "params-paper.yaml", "params-official.yaml")
BAD_VALUES = [{"steps": 0}, {"scale": 17}, {"scheduler": "bogus"}, {"color_fix": "sepia"}, {"process_size": 4},
              {"added_noise_level": -1}, {"tile_size": 32}, {"generator_scope": "batch"}, {"resize": "nearest"}]


def test_config_sampling_fields_are_the_settings_fields():
    from xpsr_core.infer import SRSettings
    from xpsr_core.infer.config import SAMPLING_FIELDS, SRModelConfig
    from xpsr_core.recipes import RECIPE_KEYS

    assert SAMPLING_FIELDS == tuple(field.name for field in dataclasses.fields(SRSettings))
    for name, info in SRSettings.__pydantic_fields__.items():
        field = SRModelConfig.model_fields[name]
        assert (field.annotation, field.default, field.metadata, field.description, field.json_schema_extra) == (
            info.annotation, info.default, info.metadata, info.description, info.json_schema_extra), name
        assert info.description, f"{name} has no description"
    assert SRModelConfig().sr_settings() == SRSettings()
    assert "cfg_batched" not in SRModelConfig().output_settings()  # a runtime setting: not in the config hash
    for section in ("sr", "evaluate"):
        assert set(SAMPLING_FIELDS) <= set(RECIPE_KEYS[section])


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda bad: next(iter(bad)))
def test_a_bad_sampling_value_fails_in_the_settings_and_in_the_config(bad):
    from stages.sr import SRConfig
    from xpsr_core.config import resolve_config
    from xpsr_core.errors import UserError
    from xpsr_core.infer import SRSettings

    with pytest.raises(ValidationError):
        SRSettings(**bad)
    with pytest.raises(ValidationError):
        dataclasses.replace(SRSettings(), **bad)
    name, value = next(iter(bad.items()))
    with pytest.raises(ValidationError):
        setattr(SRSettings(), name, value)
    with pytest.raises(UserError, match=f"Invalid 'sr' configuration: {name}: "):
        resolve_config(SRConfig, "sr", {"sr": bad})


def test_settings_reject_unknown_names():
    from xpsr_core.infer import SRSettings

    with pytest.raises(ValidationError, match="stepz"):
        SRSettings(stepz=3)


def test_a_pipeline_folder_with_bad_recorded_defaults_is_a_user_error(tiny_models, tmp_path):
    from xpsr_core.errors import UserError
    from xpsr_core.infer import XPSRPipeline
    from xpsr_core.io.pipeline_folder import PIPELINE_FILE
    from xpsr_core.models.loading import load_base_sd
    from xpsr_core.models.xpsr import XPSRModel

    base = load_base_sd(tiny_models.sd)
    folder = XPSRPipeline.from_model(XPSRModel.from_base(base, with_dfc=False), base).save_pretrained(tmp_path / "pipe")
    record = json.loads((folder / PIPELINE_FILE).read_text())
    record["defaults"]["steps"] = 0
    (folder / PIPELINE_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match="records invalid sampling defaults.*steps"):
        XPSRPipeline.from_pretrained(folder)


def test_the_sr_captioner_answers_the_configured_instructions(monkeypatch):
    from PIL import Image

    import xpsr_core.caption.captioner
    from xpsr_core.caption.settings import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION
    from xpsr_core.infer.config import SRModelConfig
    from xpsr_core.infer.inputs import caption_images

    asked = []

    class EchoCaptioner:
        def __init__(self, model, **_):
            pass

        def caption(self, images, instructions):
            asked.append(list(instructions))
            return [[f"answer to {text}" for text in instructions] for _ in images]

    monkeypatch.setattr(xpsr_core.caption.captioner, "Captioner", EchoCaptioner)
    image = Image.new("RGB", (8, 8))
    assert (SRModelConfig().content_instruction, SRModelConfig().quality_instruction) == (
        CONTENT_INSTRUCTION, QUALITY_INSTRUCTION)
    config = SRModelConfig(content_instruction="What is shown?", quality_instruction="How sharp is it?")
    items = [{"image": image, "name": "a.png"}, {"image": image, "name": "b.png"}]
    caption_images(config, items)
    assert asked == [["What is shown?", "How sharp is it?"]]
    assert [(item["content"], item["quality"]) for item in items] == [
        ("answer to What is shown?", "answer to How sharp is it?")] * 2


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_files_state_shared_values_once(name):
    from stages import evaluate, sr
    from xpsr_core.caption.settings import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION
    from xpsr_core.config import load_params, resolve_config

    params = load_params(ROOT / name)
    base_model = params["caption"]["base_model"]
    statements = [line.split("#")[0] for line in (ROOT / name).read_text().splitlines()]
    assert sum(base_model in line for line in statements) == 1, "base_model is stated more than once"
    captioner = params["caption"]["captioner"]
    assert sum(captioner in line for line in statements) == 1, "the captioner is stated more than once"
    assert all(section["base_model"] == base_model for section in params.values() if "base_model" in section)
    shared = (set(params["sr"]) & set(params["evaluate"])) - {"out"}
    assert {"base_model", "captioner", "captions", "dtype", "device"} <= shared
    assert all(params["sr"][key] == params["evaluate"][key] for key in shared)
    assert params["sr"]["captioner"] == params["caption"]["captioner"]
    # the caption stage's instructions are the ones sr and evaluate caption with
    expected = (params["caption"].get("content_instruction", CONTENT_INSTRUCTION),
                params["caption"].get("quality_instruction", QUALITY_INSTRUCTION))
    for section, config in (("sr", sr.SRConfig), ("evaluate", evaluate.EvaluateConfig)):
        resolved = resolve_config(config, section, params)
        assert (resolved.content_instruction, resolved.quality_instruction) == expected, section
