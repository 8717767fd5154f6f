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

:data:`RECIPE_KEYS` says what counts as recipe, per params section: the fields marked recipe where they are
defined (``xpsr_core.config.recipe_field``). Sections it does not name (``demo_data``, ``models``, ``shard``,
``degrade``, ``embed``, ``import_official``) are run
settings only and stay as the target file has them.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from .caption.settings import CaptionSettings
from .config import deep_merge, recipe_fields
from .evaluation.settings import EvaluationSettings
from .infer.config import SRModelConfig
from .train.settings import TrainConfig


def _recipe_keys() -> dict[str, tuple[str, ...]]:
    """Per params section, the fields marked recipe (``xpsr_core.config.recipe_field``) of its settings classes.

    caption: which captioners answer which instructions with which decoding, and whether the HR images are
    captioned too (the content captioner's folder, base_model, max_new_tokens, batch size, dtype and device are
    the run's; quality_model names a folder, but whether there is a separate quality captioner at all is the
    recipe: point it at a local folder with ``overrides``). train: architecture, initialisation, conditioning,
    objective and optimiser (learning_rate is the run's: it is tuned to the run's batch size and length; the
    tiny default trains 100 steps at batch 2, the authors' 5e-5 is for 300k steps at batch 32). sr: the named
    preset, the captioner's instructions and every sampling value, the seed included (explicit values override
    a preset). evaluate: the same and the metric protocol (crop_border).
    """
    return {"caption": recipe_fields(CaptionSettings), "train": recipe_fields(TrainConfig),
            "sr": recipe_fields(SRModelConfig), "evaluate": recipe_fields(SRModelConfig, EvaluationSettings)}


RECIPE_KEYS: dict[str, tuple[str, ...]] = _recipe_keys()


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
