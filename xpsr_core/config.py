"""Stage configuration: one pydantic model per stage, resolved in layers: params file < command line.

A config knows which of its fields change what a stage writes; those enter the config hash
recorded beside the outputs, so a rerun with different settings is refused instead of mixing
outputs. Fields marked ``runtime`` (worker counts, progress, overwrite, device) do not.

Nothing a user states is dropped: a params file's unknown section and a section's unknown key are
errors naming the closest known name, and a config class can check how its layers combine
(``StageConfig.merge_layers``: e.g. captions given on the command line over a params file's
captioner) and say so in notes the CLI prints.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Mapping, Optional, Sequence, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError

DEFAULT_PARAMS = Path("params.yaml")
COMMAND_LINE = "command line"  # the name of the top layer: CLI options and --set
RUNTIME = {"runtime": True}
RECIPE = {"recipe": True}

# Every setting is one field with a description and, beside plain output-shaping, up to two marks of its role:
# runtime (how a stage runs, never what it writes: outside the config hash) and recipe (what a run does, as
# opposed to where and how big it runs: carried by ``xpsr_core.recipes.overlay_recipe``).


def _marks(runtime: bool, recipe: bool) -> Optional[dict]:
    return {**(RUNTIME if runtime else {}), **(RECIPE if recipe else {})} or None


def runtime_field(default: Any, description: str, *, recipe: bool = False, **kwargs: Any) -> Any:
    """A setting that changes how a stage runs but never what it writes (``recipe``: also part of the recipe)."""
    return Field(default, description=description, json_schema_extra=_marks(True, recipe), **kwargs)


def recipe_field(default: Any, description: str, *, runtime: bool = False, **kwargs: Any) -> Any:
    """A setting of the recipe (what a run does: captions, architecture, objective, optimiser, sampling), which
    ``overlay_recipe`` carries from one params file onto another."""
    return Field(default, description=description, json_schema_extra=_marks(runtime, recipe=True), **kwargs)


def has_mark(info: Any, mark: str) -> bool:
    """Whether a pydantic field (``FieldInfo``) carries ``mark`` ("runtime" or "recipe")."""
    extra = getattr(info, "json_schema_extra", None)
    return isinstance(extra, dict) and bool(extra.get(mark))


def recipe_fields(*classes: type[BaseModel]) -> tuple[str, ...]:
    """The recipe fields of ``classes`` (pydantic models), in field order, each once."""
    names: dict[str, None] = {}
    for cls in classes:
        names.update((name, None) for name, info in cls.model_fields.items() if has_mark(info, "recipe"))
    return tuple(names)


DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def _check_device_name(value: str) -> str:
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError(f"device must be {DEVICE_CHOICES}")
    return value


# a torch device a stage runs on; "auto" is this rank's GPU when PyTorch sees one, else the CPU
# (``xpsr_core.dist.rank_device``, called where the device is used)
DeviceName = Annotated[str, AfterValidator(_check_device_name)]


def device_field(note: str = "") -> Any:
    """The ``device`` setting of every stage that runs torch: runtime (outside the config hash), default auto."""
    return runtime_field("auto", f"{DEVICE_CHOICES}: auto is this rank's GPU when there is one, else the CPU.{note}")


def closest(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the known name nearest ``name``, or '' when none is near."""
    match = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # old key -> new key of fields that were renamed: a params file or --set naming the old key fails naming the new
    renamed_fields: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for old, new in cls.renamed_fields.items():
                if old in data:
                    raise ValueError(f"'{old}' is now called '{new}': rename the key (--set {new}=...)")
        return data

    @classmethod
    def merge_layers(cls, layers: Sequence[tuple[str, Mapping]]) -> tuple[dict, list[str]]:
        """The values of ``layers`` ((name, values), lowest first) merged, each over the ones below, and notes
        on how they combined (none here; configs whose fields interact override this)."""
        merged: dict = {}
        for _, values in layers:
            merged = deep_merge(merged, values)
        return merged, []

    def resolved(self) -> dict:
        """The config as JSON values; paths of non-UTF-8 bytes readable (\\xNN), so it can be printed and saved."""
        return _readable(self.model_dump(mode="json"))

    def output_settings(self) -> dict:
        runtime = {name for name, field in type(self).model_fields.items() if has_mark(field, "runtime")}
        return {k: v for k, v in self.resolved().items() if k not in runtime}

    def output_hash(self) -> str:
        text = json.dumps(self.output_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _readable(value: Any) -> Any:
    from .io.images import readable_name

    if isinstance(value, str):
        return readable_name(value)
    if isinstance(value, dict):
        return {_readable(k): _readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return value


Config = TypeVar("Config", bound=StageConfig)


def params_file(path: Path | None) -> Optional[Path]:
    """The params file a command reads: ``path``, else ./params.yaml when present, else none."""
    if path is None:
        return DEFAULT_PARAMS if DEFAULT_PARAMS.exists() else None
    return Path(path)


def load_params(path: Path | None, sections: Optional[Iterable[str]] = None) -> dict:
    """The whole params file as a dict; an absent default file means 'no params'.

    ``sections``: the known top-level names; any other one is an error naming the closest known name.
    """
    path = params_file(path)
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"Params file {path} does not exist. Pass --params PATH or run from the project folder.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"Params file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"Params file {path} must hold a mapping of stage sections, not {type(data).__name__}.")
    if sections is not None:
        known = set(sections)
        for name in data:
            if name not in known:
                raise UserError(f"{path}: unknown section {str(name)!r}{closest(name, known)}; the sections are "
                                f"{', '.join(sorted(known))}.")
    return data


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ["a=1", "b.c=x"] into {"a": 1, "b": {"c": "x"}}; values are parsed as YAML scalars."""
    result: dict = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise UserError(f"Override {item!r} must look like name=value (for example crop_size=256).")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = result
        *parents, leaf = name.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return result


def deep_merge(base: dict, extra: Mapping) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Resolution:
    """A resolved stage config, where its values came from, and what the CLI should say about how they combined."""

    config: StageConfig
    params: Optional[Path] = None  # the params file read (None: none)
    notes: list[str] = field(default_factory=list)


def _fields_at(cls: type[BaseModel], loc: Sequence) -> set[str]:
    """The field names of the (nested) model at ``loc`` below ``cls`` (empty when it is not a model)."""
    model: Any = cls
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return set()
        model = info.annotation
    return set(getattr(model, "model_fields", {}))


def _problem(cls: type[BaseModel], section: str, error: dict) -> str:
    loc = error["loc"]
    text = f"{'.'.join(str(p) for p in loc) or section}: {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "extra_forbidden" and loc:
        return text + closest(loc[-1], _fields_at(cls, loc[:-1]))
    if "input" in error and not isinstance(error["input"], dict):
        text += f" (got {error['input']!r})"
    return text


def resolve_layers(cls: type[Config], section: str, layers: Sequence[tuple[str, Mapping]],
                   params: Optional[Path] = None) -> Resolution:
    """Build a stage config from ``layers`` ((name, values), lowest first: the params file's section, then the
    command line) with ``cls.merge_layers``, validate it, and keep the notes on how the layers combined."""
    values, notes = cls.merge_layers(layers)
    try:
        config = cls.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(_problem(cls, section, e) for e in error.errors())
        raise UserError(f"Invalid '{section}' configuration: {problems}.") from None
    return Resolution(config, params, notes)


def resolve_config(
    cls: type[Config],
    section: str,
    params: Mapping | None = None,
    overrides: Mapping | None = None,
    params_name: str = "params file",
) -> Config:
    """Build a stage config from params[section], then explicit overrides, and validate it."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}  # None: an option not given
    return resolve_layers(cls, section, [(params_name, dict((params or {}).get(section) or {})), (COMMAND_LINE, given)]
                          ).config
