"""Stage configuration: one pydantic model per stage, resolved as params.yaml < CLI options.

A config knows which of its fields change what a stage writes; those enter the config hash
recorded beside the outputs, so a rerun with different settings is refused instead of mixing
outputs. Fields marked ``runtime`` (worker counts, progress, overwrite) do not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError

DEFAULT_PARAMS = Path("params.yaml")
RUNTIME = {"runtime": True}


def runtime_field(default: Any, description: str, **kwargs: Any) -> Any:
    """A setting that changes how a stage runs but never what it writes."""
    return Field(default, description=description, json_schema_extra=RUNTIME, **kwargs)


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def resolved(self) -> dict:
        """The config as JSON values; paths of non-UTF-8 bytes readable (\\xNN), so it can be printed and saved."""
        return _readable(self.model_dump(mode="json"))

    def output_settings(self) -> dict:
        runtime = {
            name
            for name, field in type(self).model_fields.items()
            if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("runtime")
        }
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


def load_params(path: Path | None) -> dict:
    """The whole params file as a dict; an absent default file means 'no params'."""
    if path is None:
        path = DEFAULT_PARAMS
        if not path.exists():
            return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Params file {path} does not exist. Pass --params PATH or run from the project folder.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"Params file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"Params file {path} must hold a mapping of stage sections, not {type(data).__name__}.")
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


def resolve_config(
    cls: type[Config],
    section: str,
    params: Mapping | None = None,
    overrides: Mapping | None = None,
) -> Config:
    """Build a stage config from params[section], then explicit overrides, and validate it."""
    values = dict((params or {}).get(section) or {})
    values = deep_merge(values, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or section}: {e['msg']}"
            + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
            for e in error.errors()
        )
        raise UserError(f"Invalid '{section}' configuration: {problems}.") from None
