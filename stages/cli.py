"""The ``xpsr`` command line: options derived from the stage configs, config resolution and error formatting.

Every command's options are generated from its stage config class's fields (:data:`COMMANDS`): the option is
the field name with dashes, its help the field's description, the default shown the field's default; bools are
``--x/--no-x`` flags and lists repeatable options, while nested settings (``degradation``) are reached through
``--set`` (or a shorthand listed in :data:`NESTED_OPTIONS`). A field added to a config class is an option of its
command with no edit here. What is not an option named after its field is listed once, below: positional
arguments, short names, nested shorthands and the old names kept for a release.

Every command resolves its stage config (params.yaml < CLI options < ``--set``), prints one start line (params
file, preset, device, config hash; ``--debug``: the whole config), and calls the stage's ``run``. A command's
module is imported when the command runs or shows its help, and stage configs import no torch, so ``xpsr
--help`` stays instant and a bad value fails before any model library loads.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, List, Literal, Optional, Union, get_args, get_origin

import typer
from typer.core import TyperGroup

from xpsr_core.dist import rank_device
from xpsr_core.errors import UserError
from xpsr_core.quiet import quiet_third_party

quiet_third_party()  # before any command imports torch, transformers or diffusers

HELP_WIDTH = 200  # help in a pipe or a log is not cut at 80 columns; on a terminal it fits the terminal
CONTEXT_SETTINGS = {"max_content_width": HELP_WIDTH, "terminal_width": None if sys.stdout.isatty() else HELP_WIDTH}


@dataclass(frozen=True)
class Command:
    """A command: its params-file section, the stage module and config class, the stage function it runs."""

    section: str
    stage: str  # module of stages/
    config: str  # its config class
    help: str
    run: str = "run"
    fixed: dict = field(default_factory=dict)  # config values the command itself sets (`models tiny`: kind)


# every command, by its words on the command line, in the order `xpsr --help` lists them
COMMANDS: dict[tuple[str, ...], Command] = {
    ("demo-data",): Command("demo_data", "demo_data", "DemoDataConfig",
                            "Write the real photographs that scikit-image ships into a raw-image folder."),
    ("shard",): Command("shard", "shard", "ShardConfig",
                        "Cut image folders into HR crops stored as webdataset shards, with an index row per file."),
    ("degrade",): Command("degrade", "degrade", "DegradeConfig",
                          "Synthesize LR images with the Real-ESRGAN second-order degradation into pair shards."),
    ("caption",): Command("caption", "caption", "CaptionConfig", "Caption every LR image with the paper's content "
                          "and quality instructions into Parquet manifests."),
    ("embed",): Command("embed", "embed", "EmbedConfig", "Join pairs and captions by key and pre-encode CLIP "
                        "embeddings (and HR latents) into training shards."),
    ("train",): Command("train", "train", "TrainConfig", "Train XPSR (ControlNet + SFA + Conditional Attention + "
                        "DFC); works under `accelerate launch`."),
    ("sr",): Command("sr", "sr", "SRConfig", "Super-resolve images with XPSR (captions from the captioner, a "
                     "manifest, or given); PNG + JSON per image."),
    ("evaluate",): Command("evaluate", "evaluate", "EvaluateConfig", "Compare methods on LR/HR pairs with the "
                           "paper's metrics: a Table 1 style table, per-image values, grids."),
    ("import-official",): Command("import_official", "import_official", "ImportOfficialConfig", "Convert the "
                                  "authors' released XPSR checkpoint into a pipeline folder that `xpsr sr` and "
                                  "`xpsr train` load."),
    ("models", "tiny"): Command("models", "models", "ModelsConfig", "A tiny random SD-1.5 (diffusers layout) and "
                                "LLaVA captioner (llava-hf layout) with real tokenizers.", fixed={"kind": "tiny"}),
    ("models", "sd15-shaped"): Command("models", "models", "ModelsConfig", "SD-1.5 and LLaVA-1.5-7B shapes with "
                                       "random fp16 weights (for GPU speed/memory benchmarks).",
                                       fixed={"kind": "sd15-shaped"}),
    ("testset", "synthetic"): Command("testset_synthetic", "testset", "SyntheticTestsetConfig", "Random HR crops "
                                      "degraded with the training degradation (the paper's DIV2K-val set) into "
                                      "pair shards.", run="run_synthetic"),
    ("testset", "paired"): Command("testset_paired", "testset", "PairedTestsetConfig", "Real LR/HR pairs (RealSR, "
                                   "DRealSR) matched by name and centre-cropped into pair shards.", run="run_paired"),
}
GROUPS = {
    "models": "Write the offline model zoo (random weights in the real folder layouts).",
    "testset": "Build the paper's test sets as pair shards for `xpsr evaluate --input-dir`.",
}

# ---- the one place for what is not an option named after its field ----
# positional arguments: section -> field
POSITIONAL = {"shard": "inputs", "caption": "images", "sr": "inputs", "import_official": "checkpoint"}
# further names of a field's option, in every command that has the field
SHORT_NAMES = {
    "workers": ("-j",),
    "content_caption": ("--content",),
    "quality_caption": ("--quality",),
    "methods": ("--method",),
    "metrics": ("--metric",),
    "hr_dirs": ("--hr-dir",),
}
# structured fields given as text on the command line, one value per use (their validators parse the text)
TEXT_OPTIONS = {"methods"}
# options for nested settings: section -> {option: dotted field path}
NESTED_OPTIONS = {"testset_synthetic": {"--scale": "degradation.scale"}}
# old option names, hidden and kept for one release with a deprecation line: section -> {old option: field}
DEPRECATED_OPTIONS = {
    "degrade": {"--in": "input_dir", "--usm/--no-usm": "usm_hr"},
    "caption": {"--in": "input_dir", "--model": "captioner"},
    "embed": {"--pairs": "input_dir", "--captions": "captions_dir", "--latents/--no-latents": "encode_latents"},
    "evaluate": {"--pairs": "input_dir"},
    "train": {"--data": "input_dir", "--lr": "learning_rate"},
}

# every command's params-file section; any other top-level name is an error
SECTIONS = tuple(dict.fromkeys(command.section for command in COMMANDS.values()))
# the sections whose stage records its whole config in OUT/config.json (when OUT is a folder)
RECORDED_SECTIONS = frozenset(SECTIONS) - {"train", "import_official"}

_state = {"debug": False}


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_command(function: Callable) -> Callable:
    """Turn errors a user can cause into a one-paragraph message and a non-zero exit."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as error:
            if _state["debug"]:
                raise
            _fail(str(error))
        except KeyboardInterrupt:
            _fail("interrupted. Finished shards are kept; rerun the same command to resume.", code=130)
        except OSError as error:
            if _state["debug"] or error.errno not in (
                errno.ENOSPC,
                errno.EACCES,
                errno.EROFS,
                errno.EDQUOT,
                errno.ENOENT,
            ):
                raise
            where = f" ({error.filename})" if error.filename else ""
            _fail(
                f"{error.strerror}{where}. Nothing half-written was left under a final name; "
                "fix the cause and rerun to resume."
            )

    return wrapper


def start_line(section: str, resolution) -> str:
    """'sr: params params.yaml, preset official, device cpu (auto), config 3f2a... (full config: OUT/config.json)'."""
    config = resolution.config
    parts = [f"params {resolution.params}" if resolution.params else "no params file"]
    if "preset" in type(config).model_fields:
        parts.append(f"preset {config.preset}" if config.preset else "no preset")
    if "device" in type(config).model_fields:
        device = rank_device(config.device)  # fails here, before any work, when a GPU is asked for and none is there
        parts.append(f"device {device}" + (f" ({config.device})" if device != config.device else ""))
    record = ""
    out = getattr(config, "out", None)
    if section in RECORDED_SECTIONS and out is not None and not Path(out).suffix:
        record = f" (full config: {Path(out) / 'config.json'})"
    return f"{section}: {', '.join(parts)}, config {config.output_hash()}{record}"


def resolve(config_cls, section: str, params: Optional[Path], options: dict, sets: Optional[List[str]]):
    """The stage config from the params file's section, then ``options`` (None: not given), then ``--set``; prints
    the start line and the notes on how the layers combined."""
    from xpsr_core.config import COMMAND_LINE, deep_merge, load_params, params_file, parse_overrides, resolve_layers

    assert section in SECTIONS, section
    path = params_file(params)
    section_values = dict(load_params(path, SECTIONS).get(section) or {})
    given = deep_merge({k: v for k, v in options.items() if v is not None}, parse_overrides(sets))
    given = {k: v for k, v in given.items() if v is not None}
    layers = [(str(path or "params file"), section_values), (COMMAND_LINE, given)]
    resolution = resolve_layers(config_cls, section, layers, params=path)
    from stages.common import console

    lines = [start_line(section, resolution), *(f"  {note}" for note in resolution.notes)]
    if _state["debug"]:
        lines.append(f"{section} config: " + json.dumps(resolution.config.resolved()))
    for line in lines:  # whole lines on a terminal too: the paths in them stay copyable
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return resolution.config


# ---- options from fields ----

def _unwrap(annotation: Any) -> Any:
    """The annotation without Annotated[...] and Optional[...] (None for a union of several types)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(rest[0]) if len(rest) == 1 else None
    return annotation


def _scalar_type(annotation: Any) -> Optional[tuple[type, tuple]]:
    """The Python type of a single value as the command line reads it, and its choices (Literal); None when it is
    not a plain value."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        kinds = {type(v) for v in values}
        return (kinds.pop(), values) if len(kinds) == 1 and kinds <= {str, int} else None
    return (annotation, ()) if annotation in (bool, int, float, str, Path) else None


def option_kind(annotation: Any) -> Optional[tuple[type, tuple, bool]]:
    """(type, choices, repeatable) of a field's option; None: the field is reached through --set only."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (None,)
        scalar = _scalar_type(item)
        return None if scalar is None or scalar[0] is bool else (*scalar, True)
    scalar = _scalar_type(annotation)
    return None if scalar is None else (*scalar, False)


def _default_text(info) -> str:
    """The field default as help shows it ('' when there is none to show)."""
    from pydantic_core import PydanticUndefined

    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined or value is None or value == "" or value == []:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(getattr(v, "name", v)) for v in value)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _help(info, note: str = "") -> str:
    default = _default_text(info)
    return " ".join(p for p in (info.description or "", note, f"[default: {default}]" if default else "") if p)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass
class _Route:
    """Where a command parameter's value goes in the config: the field path, and the old name it deprecates."""

    path: tuple[str, ...]
    repeatable: bool = False
    deprecated: str = ""  # the old option name, when this is a hidden alias
    new: str = ""  # the option that replaces it


METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _parameter(name: str, decls: list[str], kind: tuple, help_text: str, hidden: bool = False):
    """An ``inspect.Parameter`` whose default is the typer option (the value None when not given)."""
    value_type, choices, repeatable = kind
    if value_type is bool:
        decls = decls if "/" in decls[0] else [f"{decls[0]}/--no-{decls[0][2:]}", *decls[1:]]
    metavar = "[" + "|".join(str(c) for c in choices) + "]" if choices else METAVARS.get(value_type)
    option = typer.Option(None, *decls, help=help_text, hidden=hidden, metavar=metavar, show_default=False)
    annotation = Optional[List[value_type]] if repeatable else Optional[value_type]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _field_info(config_cls, dotted: str):
    model, info = config_cls, None
    for part in dotted.split("."):
        info = model.model_fields[part]
        model = info.annotation
    return info


def derive_parameters(section: str, config_cls, fixed: dict) -> tuple[list, dict[str, _Route]]:
    """The command's parameters from ``config_cls``'s fields (and the listed positional, nested and old names),
    and where each one's value goes in the config."""
    parameters, routes = [], {}
    positional = POSITIONAL.get(section)
    for name, info in config_cls.model_fields.items():
        if name in fixed:
            continue  # set by the command itself
        kind = (str, (), True) if name in TEXT_OPTIONS else option_kind(info.annotation)
        if name == positional:
            repeatable = get_origin(_unwrap(info.annotation)) is list
            value_type = kind[0] if kind else str  # a structured value is given as its text (e.g. NAME=PATH)
            annotation = Optional[List[value_type]] if repeatable else Optional[value_type]
            argument = typer.Argument(None, help=_help(info), metavar=name.upper() + ("..." if repeatable else ""),
                                      show_default=False)
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=argument,
                                                annotation=annotation))
            routes[name] = _Route((name,), repeatable)
        elif kind is not None:  # else a nested setting: --set name.key=value
            parameters.append(_parameter(name, [option_name(name), *SHORT_NAMES.get(name, ())], kind, _help(info)))
            routes[name] = _Route((name,), kind[2])
    for index, (flag, dotted) in enumerate(NESTED_OPTIONS.get(section, {}).items()):
        info = _field_info(config_cls, dotted)
        kind = option_kind(info.annotation)
        parameters.append(_parameter(f"nested_{index}", [flag], kind, _help(info, f"(--set {dotted}=...)")))
        routes[f"nested_{index}"] = _Route(tuple(dotted.split(".")), kind[2])
    for index, (old, name) in enumerate(DEPRECATED_OPTIONS.get(section, {}).items()):
        kind = option_kind(config_cls.model_fields[name].annotation)
        parameters.append(_parameter(f"deprecated_{index}", [old], kind, "", hidden=True))
        routes[f"deprecated_{index}"] = _Route((name,), kind[2], deprecated=old.split("/")[0], new=option_name(name))
    parameters += [
        inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--params", help="Params file (default: ./params.yaml when present).")),
        inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[List[str]], default=typer.Option(
            None, "--set", metavar="NAME=VALUE", help="Override any config field, nested ones too: --set name=value, "
            "--set degradation.scale=2 (repeatable; the value is read as YAML).")),
    ]
    return parameters, routes


def option_values(routes: dict[str, _Route], values: dict) -> dict:
    """The config values the command line gave (``values``: by parameter name), old names with a notice."""
    from stages.common import console

    given: dict = {}
    aliases = []
    for name, route in routes.items():
        value = values.get(name)
        if value is None or (route.repeatable and not value):
            continue
        value = list(value) if route.repeatable else value
        if route.deprecated:
            console.print(f"{route.deprecated} is deprecated and will be removed: use {route.new}", highlight=False,
                          markup=False, soft_wrap=True)
            aliases.append((route.path, value))
            continue
        _put(given, route.path, value)
    for path, value in aliases:  # the new name wins when both are given
        if _get(given, path) is None:
            _put(given, path, value)
    return given


def _put(target: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _get(target: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target


def build_command(words: tuple[str, ...]):
    """The command ``COMMANDS[words]``, its parameters derived from its config class."""
    spec = COMMANDS[words]
    stage = importlib.import_module(f"stages.{spec.stage}")
    config_cls = getattr(stage, spec.config)
    parameters, routes = derive_parameters(spec.section, config_cls, spec.fixed)

    def command(params: Optional[Path] = None, sets: Optional[List[str]] = None, **values) -> None:
        options = {**option_values(routes, values), **spec.fixed}
        config = resolve(config_cls, spec.section, params, options, list(sets or ()))
        getattr(stage, spec.run)(config)

    command.__signature__ = inspect.Signature(parameters)
    single = typer.Typer(rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False)
    single.command(name=words[-1], help=spec.help, context_settings=CONTEXT_SETTINGS)(user_command(command))
    return typer.main.get_command(single)


class DerivedGroup(TyperGroup):
    """A command group whose commands (``COMMANDS`` below ``path``) are built when first used: listing them for
    ``--help`` imports no stage module."""

    path: tuple[str, ...] = ()

    def _children(self) -> dict[str, str]:
        """Name -> one-line help of each command or group right below this group."""
        depth = len(self.path)
        children: dict[str, str] = {}
        for words, spec in COMMANDS.items():
            if words[:depth] == self.path and len(words) > depth:
                name = words[depth]
                children.setdefault(name, spec.help if len(words) == depth + 1 else GROUPS[name])
        return children

    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in self._children() if n not in self.commands)]

    def get_command(self, ctx, name: str):
        if name not in self.commands and name in self._children():
            words = (*self.path, name)
            if words in COMMANDS:
                self.commands[name] = build_command(words)
            else:
                group = DerivedGroup(name=name, help=GROUPS[name], no_args_is_help=True, rich_markup_mode=None,
                                     context_settings=CONTEXT_SETTINGS)
                group.path = words
                self.commands[name] = group
        return self.commands.get(name)

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, help_text.split(". ")[0].rstrip(".")) for name, help_text in self._children().items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="xpsr",
    cls=DerivedGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
    help="XPSR: build super-resolution training data, caption it, train and run XPSR.",
)


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (or set XPSR_DEBUG=1)."),
    progress_seconds: Optional[float] = typer.Option(
        None,
        "--progress-seconds",
        min=0,
        help=(
            "When output is not a terminal, print a progress line every N seconds "
            "(or set XPSR_PROGRESS_SECONDS; default 30)."
        ),
    ),
) -> None:
    _state["debug"] = debug or os.environ.get("XPSR_DEBUG", "") not in ("", "0")
    if progress_seconds is not None:
        os.environ["XPSR_PROGRESS_SECONDS"] = str(progress_seconds)


def command_words(section: str) -> list[tuple[str, ...]]:
    """The commands that resolve ``section`` (``models``: tiny and sd15-shaped)."""
    return [words for words, spec in COMMANDS.items() if spec.section == section]



if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
