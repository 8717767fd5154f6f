"""Carry a recipe (what a run does) from one params file onto another (where and how big it runs).

A params file mixes two kinds of values: the *recipe* (which captions are written, the
architecture, objective and optimiser of training, the inference recipe) and the *run* (paths,
sizes, step counts, batch sizes, workers, devices, dtypes, mixed precision). ``params-official.yaml``
states the authors' recipe at the paper's scale on real models; ``params.yaml`` states the
embedded default's run on the tiny zoo. :func:`overlay_recipe` makes a params dict that runs the
first one's recipe at the second one's scale, e.g. the authors' recipe on the tiny zoo on a CPU::

    import yaml
    from xpsr_core.recipes import overlay_recipe

    default = yaml.safe_load(open("params.yaml"))
    official = yaml.safe_load(open("params-official.yaml"))
    params = overlay_recipe(default, official,
                            overrides={"caption": {"quality_model": "models/tiny/captioner"}})
    yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)

:data:`RECIPE_KEYS` is the one list of what counts as recipe, per params section. Sections it does
not name (``demo_data``, ``models``, ``shard``, ``degrade``, ``embed``, ``import_official``) are run
settings only and stay as the target file has them.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from .config import deep_merge
from .infer.config import SAMPLING_FIELDS

# the inference recipe beside the preset: the captioner's instructions and every sampling value (a
# preset sets all of them), the seed included
_INFERENCE_KEYS = ("content_instruction", "quality_instruction") + SAMPLING_FIELDS

RECIPE_KEYS: dict[str, tuple[str, ...]] = {
    # which captioners answer which instructions with which decoding, and whether the HR images are
    # captioned too. `model` (the content captioner's folder), base_model, max_new_tokens, batch
    # size, dtype and device are the run's. quality_model names a folder, but whether there is a
    # separate quality captioner at all is the recipe: point it at a local folder with `overrides`.
    "caption": (
        "quality_model", "quality_trust_remote_code", "caption_hr", "content_instruction", "quality_instruction",
        "do_sample", "temperature", "top_p", "num_beams", "repetition_penalty",
    ),
    # architecture, initialisation, conditioning, objective and optimiser. Kept from the run:
    # paths, batch size, gradient accumulation, step counts, mixed precision, gradient
    # checkpointing, data loading, checkpoint/validation/log cadence, device, seed, and
    # learning_rate, which is tuned to the run's batch size and length (the tiny default trains
    # 100 steps at batch 2; the authors' 5e-5 is for 300k steps at batch 32).
    "train": (
        "sfa_mode", "conditional_attention", "fusion", "conditional_attention_type", "dfc_pixel", "dfc_latent",
        "dfc_latent_heads", "dfc_target_resize", "dfc_weight", "init", "use_high_prompt", "hr_condition_probability",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler", "warmup_steps", "max_grad_norm",
        "online_encoding",
    ),
    # the named preset, the captioner's instructions and every sampling value (explicit values
    # override a preset). The model folders (base_model, xpsr, pipeline, captioner), captions
    # source, caption lengths, outputs, metrics, dtype and device are the run's.
    "sr": ("preset",) + _INFERENCE_KEYS,
    "evaluate": ("preset", "crop_border") + _INFERENCE_KEYS,  # crop_border: the metric protocol
}


def overlay_recipe(target: Mapping[str, Any], recipe: Mapping[str, Any],
                   recipe_keys: Optional[Mapping[str, tuple[str, ...]]] = None,
                   overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """``target`` params with ``recipe``'s values of every recipe key, then ``overrides`` on top.

    For each section in ``recipe_keys`` (default :data:`RECIPE_KEYS`) and each key in it: when
    ``recipe`` states the key, its value replaces the target's; when it does not, the key is removed
    from the target, so the stage's field default applies, as it would when running with the recipe's
    params file (a sampling value the target states would otherwise override the recipe's preset).
    Every other value stays the target's. ``overrides`` (``{section: {key: value}}``) is deep-merged
    last, e.g. to point a recipe's model folder at a local one. The inputs are not modified.
    """
    keys = RECIPE_KEYS if recipe_keys is None else recipe_keys
    result = copy.deepcopy(dict(target))
    for section, names in keys.items():
        source = recipe.get(section) or {}
        if section not in result and not any(name in source for name in names):
            continue
        values = dict(result.get(section) or {})
        for name in names:
            if name in source:
                values[name] = copy.deepcopy(source[name])
            else:
                values.pop(name, None)
        result[section] = values
    return deep_merge(result, overrides or {})
