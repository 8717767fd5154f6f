"""The ``xpsr`` command line: argument parsing, config resolution and error formatting only.

Every command resolves its stage config (params.yaml < CLI options), prints one start line (params
file, preset, device, config hash; ``--debug``: the whole config), and calls the stage's ``run``.
Heavy libraries (torch, transformers, diffusers) are imported inside commands so that ``xpsr --help``
stays instant; ``xpsr_core.quiet`` silences their noise before that.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from xpsr_core.quiet import quiet_third_party

quiet_third_party()  # before any command imports torch, transformers or diffusers

app = typer.Typer(
    name="xpsr",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="XPSR: build super-resolution training data, caption it, train and run XPSR.",
)

_state = {"debug": False}

ParamsOption = typer.Option(None, "--params", help="Params file (default: ./params.yaml when present).")
SetOption = typer.Option(None, "--set", help="Override any config field: --set name=value (repeatable).")
OverwriteOption = typer.Option(False, "--overwrite", help="Replace outputs made with a different config.")


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


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_command(function: Callable) -> Callable:
    """Turn errors a user can cause into a one-paragraph message and a non-zero exit."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from xpsr_core.errors import UserError

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


# every command's params-file section (the one its _resolve call names); any other top-level name is an error
SECTIONS = ("demo_data", "models", "shard", "degrade", "caption", "embed", "train", "sr", "evaluate",
            "import_official", "testset_synthetic", "testset_paired")
# the sections whose stage records its whole config in OUT/config.json (when OUT is a folder)
RECORDED_SECTIONS = frozenset(SECTIONS) - {"train", "import_official"}
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: the GPU when there is one, else the CPU)"


def start_line(section: str, resolution) -> str:
    """'sr: params params.yaml, preset official, device cpu (auto), config 3f2a... (full config: OUT/config.json)'."""
    from xpsr_core.dist import rank_device

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


def _resolve(config_cls, section: str, params: Optional[Path], options: dict, sets: Optional[List[str]]):
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


@app.command("demo-data")
@user_command
def demo_data(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the sample photographs."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Write the real photographs that scikit-image ships into a raw-image folder."""
    from stages import demo_data as stage

    config = _resolve(stage.DemoDataConfig, "demo_data", params, {"out": out, "overwrite": overwrite or None}, sets)
    stage.run(config)


@app.command()
@user_command
def shard(
    inputs: Optional[List[str]] = typer.Argument(
        None, help="Image folders as PATH or NAME=PATH (NAME: dataset name; default: folder name)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the HR shards."),
    crop_size: Optional[int] = typer.Option(None, "--crop-size", help="HR crop size in pixels (512 in the paper)."),
    crop_mode: Optional[str] = typer.Option(None, "--crop-mode", help="random | grid"),
    crops_per_image: Optional[int] = typer.Option(None, "--crops-per-image", help="Random crops per image."),
    small_images: Optional[str] = typer.Option(None, "--small-images", help="pad | skip images smaller than the crop."),
    images_per_shard: Optional[int] = typer.Option(None, "--images-per-shard"),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Worker processes."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Cut image folders into HR crops stored as webdataset shards, with an index row per file."""
    from stages import shard as stage

    parsed = [stage.parse_input_spec(spec) for spec in inputs] if inputs else None
    options = dict(
        inputs=parsed, out=out, crop_size=crop_size, crop_mode=crop_mode, crops_per_image=crops_per_image,
        small_images=small_images, images_per_shard=images_per_shard, workers=workers, seed=seed,
        overwrite=overwrite or None,
    )
    config = _resolve(stage.ShardConfig, "shard", params, options, sets)
    stage.run(config)


@app.command()
@user_command
def degrade(
    input_dir: Optional[Path] = typer.Option(None, "--in", help="Folder of HR shards (output of `xpsr shard`)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the LR/HR pair shards."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    usm_hr: Optional[bool] = typer.Option(None, "--usm/--no-usm", help="USM-sharpen the HR target (default on)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Worker processes (CPU)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Synthesize LR images with the Real-ESRGAN second-order degradation into pair shards."""
    from stages import degrade as stage

    options = dict(
        input_dir=input_dir, out=out, device=device, batch_size=batch_size, usm_hr=usm_hr, workers=workers,
        seed=seed, overwrite=overwrite or None,
    )
    config = _resolve(stage.DegradeConfig, "degrade", params, options, sets)
    stage.run(config)


@app.command()
@user_command
def caption(
    images: Optional[Path] = typer.Argument(
        None, help="A folder of images to caption (default: the pair shards' LR images)."
    ),
    input_dir: Optional[Path] = typer.Option(None, "--in", help="Folder of pair shards (output of `xpsr degrade`)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Manifest folder, or a .parquet file when captioning a folder."
    ),
    model: Optional[str] = typer.Option(None, "--model", help="Captioner folder or hub id (llava-hf layout)."),
    quality_model: Optional[str] = typer.Option(
        None, "--quality-model", help="A second captioner for the quality captions (e.g. Q-Instruct)."
    ),
    caption_hr: Optional[bool] = typer.Option(
        None, "--caption-hr/--no-caption-hr", help="Also caption the HR images' quality (pair shards)."
    ),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="Base SD folder whose CLIP tokenizer counts tokens."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per generate() call."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Caption every LR image with the paper's content and quality instructions into Parquet manifests."""
    from stages import caption as stage

    options = dict(
        images=images, input_dir=input_dir, out=out, model=model, quality_model=quality_model, caption_hr=caption_hr,
        base_model=base_model, batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype, device=device,
        overwrite=overwrite or None,
    )
    config = _resolve(stage.CaptionConfig, "caption", params, options, sets)
    stage.run(config)


@app.command()
@user_command
def embed(
    pairs_dir: Optional[Path] = typer.Option(None, "--pairs", help="Folder of pair shards."),
    captions_dir: Optional[Path] = typer.Option(None, "--captions", help="Folder of caption manifests."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the training shards."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Base SD folder or hub id."),
    encode_latents: Optional[bool] = typer.Option(None, "--latents/--no-latents", help="Pre-encode HR VAE latents."),
    drop_missing: Optional[bool] = typer.Option(
        None, "--drop-missing", help="Leave out keys lacking an image or caption."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Join pairs and captions by key and pre-encode CLIP embeddings (and HR latents) into training shards."""
    from stages import embed as stage

    options = dict(
        pairs_dir=pairs_dir, captions_dir=captions_dir, out=out, base_model=base_model, encode_latents=encode_latents,
        drop_missing=drop_missing, batch_size=batch_size, device=device, overwrite=overwrite or None,
    )
    config = _resolve(stage.EmbedConfig, "embed", params, options, sets)
    stage.run(config)


@app.command()
@user_command
def train(
    train_dir: Optional[Path] = typer.Option(
        None, "--data", help="Folder of training shards (output of `xpsr embed`)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (checkpoints, logs, final export)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Frozen SD-1.5 folder or hub id."),
    max_train_steps: Optional[int] = typer.Option(None, "--max-train-steps"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per process."),
    learning_rate: Optional[float] = typer.Option(None, "--lr"),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no | fp16 | bf16"),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoint folder."),
    init: Optional[str] = typer.Option(
        None, "--init", help="zero | official | a folder to fine-tune (from `xpsr import-official` or `xpsr train`)."
    ),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Train XPSR (ControlNet + SFA + Conditional Attention + DFC); works under `accelerate launch`."""
    from stages import train as stage

    options = dict(
        train_dir=train_dir,
        out=out,
        base_model=base_model,
        max_train_steps=max_train_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        mixed_precision=mixed_precision,
        resume=resume,
        init=init,
        overwrite=overwrite or None,
    )
    config = _resolve(stage.TrainConfig, "train", params, options, sets)
    stage.run(config)


def _sr_option(field: str, kind, flag: str, help: Optional[str] = None) -> tuple:
    return field, kind, typer.Option(None, flag, help=help)


# the options `xpsr sr` and `xpsr evaluate` share: parameter name -> (config field, type, option)
SR_OPTIONS = {
    "base_model": _sr_option("base_model", Optional[str], "--base-model", "Frozen SD-1.5 folder or hub id."),
    "xpsr": _sr_option("xpsr", Optional[str], "--xpsr", "Trained XPSR folder (a run's final/, or a run folder)."),
    "pipeline": _sr_option(
        "pipeline", Optional[str], "--pipeline", "A saved XPSR pipeline folder (instead of --base-model/--xpsr)."
    ),
    "captions": _sr_option("captions", Optional[str], "--captions", "captioner | manifest | given"),
    "captioner": _sr_option("captioner", Optional[str], "--captioner", "Captioner folder or hub id (llava-hf layout)."),
    "manifest": _sr_option(
        "manifest", Optional[Path], "--manifest", "Caption manifest (.parquet file or folder) for --captions manifest."
    ),
    "content": _sr_option(
        "content_caption", Optional[str], "--content", "High-level caption for every image (means --captions given)."
    ),
    "quality": _sr_option(
        "quality_caption", Optional[str], "--quality", "Low-level caption for every image (means --captions given)."
    ),
    "scale": _sr_option("scale", Optional[int], "--scale", "Upscaling factor (4 in the paper)."),
    "steps": _sr_option("steps", Optional[int], "--steps", "Sampling steps (20 in the paper)."),
    "scheduler": _sr_option("scheduler", Optional[str], "--scheduler", "ddpm | ddim | dpm-solver | unipc | euler"),
    "guidance_scale": _sr_option(
        "guidance_scale", Optional[float], "--guidance-scale", "Classifier-free guidance scale (5.5 in the paper)."
    ),
    "negative_prompt": _sr_option(
        "negative_prompt", Optional[str], "--negative-prompt", "Replaces the content caption in the guidance branch."
    ),
    "color_fix": _sr_option("color_fix", Optional[str], "--color-fix", "adain | wavelet | adain-official | none"),
    "tile_size": _sr_option(
        "tile_size", Optional[int], "--tile-size", "Latent tile in output pixels (default: the model's native size)."
    ),
    "tile_overlap": _sr_option("tile_overlap", Optional[int], "--tile-overlap", "Latent tile overlap in pixels."),
    "vae_tile_size": _sr_option("vae_tile_size", Optional[int], "--vae-tile-size", "VAE tile in pixels."),
    "seed": _sr_option("seed", Optional[int], "--seed"),
    "dtype": _sr_option("dtype", Optional[str], "--dtype", "float32 | float16 | bfloat16 (half precision on a GPU)."),
    "device": _sr_option("device", Optional[str], "--device", DEVICE_HELP),
    "preset": _sr_option(
        "preset", Optional[str], "--preset",
        "default | paper | official (the authors' inference recipe); explicit values override it.",
    ),
    "added_prompt": _sr_option(
        "added_prompt", Optional[str], "--added-prompt", "Text appended to every content caption."
    ),
    "negative_quality_prompt": _sr_option(
        "negative_quality_prompt", Optional[str], "--negative-quality-prompt",
        "Low-level caption of the negative guidance branch.",
    ),
    "added_noise_level": _sr_option(
        "added_noise_level", Optional[int], "--added-noise-level",
        "Noise the start latent again, to this timestep (official: 800).",
    ),
    "process_size": _sr_option(
        "process_size", Optional[int], "--process-size",
        "Enlarge conditions whose short side is smaller (official: 512).",
    ),
}


def with_sr_options(command: Callable) -> Callable:
    """Give ``command`` the SR_OPTIONS; their values reach it as one dict ``sr_options`` keyed by config field."""
    import inspect

    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command).parameters.values()
           if p.name != "sr_options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (_, kind, option) in SR_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {field: kwargs.pop(name) for name, (field, _, _) in SR_OPTIONS.items()}
        return command(**kwargs, sr_options=values)

    wrapper.__signature__ = inspect.Signature([*own[:-3], *shared, *own[-3:]])  # params, --set, --overwrite last
    return wrapper


@app.command()
@user_command
@with_sr_options
def sr(
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files, folders or glob patterns (quote globs)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the SR PNGs and their JSON sidecars."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
    sr_options: Optional[dict] = None,
) -> None:
    """Super-resolve images with XPSR (captions from the captioner, a manifest, or given); PNG + JSON per image."""
    from stages import sr as stage

    options = dict(sr_options, inputs=inputs or None, out=out, overwrite=overwrite or None)
    config = _resolve(stage.SRConfig, "sr", params, options, sets)
    stage.run(config)


@app.command()
@user_command
@with_sr_options
def evaluate(
    pairs_dir: Optional[Path] = typer.Option(
        None, "--pairs", help="Pair shards (lr.png / hr.png per key: xpsr testset, xpsr degrade)."
    ),
    lr_dir: Optional[Path] = typer.Option(None, "--lr-dir", help="Folder of LR images (with --hr-dir)."),
    hr_dir: Optional[Path] = typer.Option(None, "--hr-dir", help="Folder of HR images matched by relative path."),
    methods: Optional[List[str]] = typer.Option(
        None,
        "--method",
        help="A compared method (repeatable): xpsr | bicubic | realesrgan[:WEIGHTS] | NAME=folder:DIR "
        "| xpsr-no-high | xpsr-no-low | xpsr-no-prompts | xpsr-no-negative; NAME=KIND names the column.",
    ),
    ablations: Optional[bool] = typer.Option(
        None, "--ablations/--no-ablations", help="Add the xpsr ablations (Tables 2, 5a)."
    ),
    metrics: Optional[List[str]] = typer.Option(
        None, "--metric", help="A metric to compute (repeatable; default: all)."
    ),
    metric_weights_dir: Optional[Path] = typer.Option(
        None, "--metric-weights-dir", help="The one folder of metric weights."
    ),
    crop_border: Optional[int] = typer.Option(
        None, "--crop-border", help="Border cropped before PSNR/SSIM (authors: 0)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for the table, per-image values, grids and SR images."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many pairs."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
    sr_options: Optional[dict] = None,
) -> None:
    """Compare methods on LR/HR pairs with the paper's metrics: a Table 1 style table, per-image values, grids."""
    from stages import evaluate as stage
    from xpsr_core.evaluation.methods import parse_method

    options = dict(sr_options, pairs_dir=pairs_dir, lr_dir=lr_dir, hr_dir=hr_dir, out=out, limit=limit,
                   methods=[parse_method(m).model_dump() for m in methods] if methods else None, ablations=ablations,
                   metrics=list(metrics) if metrics else None, metric_weights_dir=metric_weights_dir,
                   crop_border=crop_border, overwrite=overwrite or None)
    config = _resolve(stage.EvaluateConfig, "evaluate", params, options, sets)
    stage.run(config)


@app.command("import-official")
@user_command
def import_official(
    checkpoint: Path = typer.Argument(
        ..., help="The authors' checkpoint folder, holding unet/ and controlnet/ (e.g. checkpoint-300000)."
    ),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="The SD-1.5 folder the checkpoint was trained on."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Pipeline folder to write (for `xpsr sr --pipeline`)."),
    allow_base_mismatch: bool = typer.Option(
        False,
        "--allow-base-mismatch",
        help="Use the checkpoint's SD UNet tensors when they differ from the base model's.",
    ),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Convert the authors' released XPSR checkpoint into a pipeline folder that `xpsr sr` and `xpsr train` load."""
    from stages import import_official as stage

    options = dict(checkpoint=checkpoint, base_model=base_model, out=out,
                   allow_base_mismatch=allow_base_mismatch or None, overwrite=overwrite or None)
    config = _resolve(stage.ImportOfficialConfig, "import_official", params, options, sets)
    stage.run(config)


models_app = typer.Typer(
    no_args_is_help=True, help="Write the offline model zoo (random weights in the real folder layouts)."
)
app.add_typer(models_app, name="models")


def _models_command(
    kind: str,
    out: Optional[Path],
    seed: Optional[int],
    params: Optional[Path],
    sets: Optional[List[str]],
    overwrite: bool,
) -> None:
    from stages import models as stage

    options = dict(kind=kind, out=out, seed=seed, overwrite=overwrite or None)
    config = _resolve(stage.ModelsConfig, "models", params, options, sets)
    stage.run(config)


@models_app.command("tiny")
@user_command
def models_tiny(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for sd15/ and captioner/ (default models/tiny)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random weights."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """A tiny random SD-1.5 (diffusers layout) and LLaVA captioner (llava-hf layout) with real tokenizers."""
    _models_command("tiny", out, seed, params, sets, overwrite)


@models_app.command("sd15-shaped")
@user_command
def models_sd15_shaped(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for sd15/ and captioner/."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random weights."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """SD-1.5 and LLaVA-1.5-7B shapes with random fp16 weights (for GPU speed/memory benchmarks)."""
    _models_command("sd15-shaped", out, seed, params, sets, overwrite)


testset_app = typer.Typer(
    no_args_is_help=True, help="Build the paper's test sets as pair shards for `xpsr evaluate --pairs`.")
app.add_typer(testset_app, name="testset")


@testset_app.command("synthetic")
@user_command
def testset_synthetic(
    hr_dirs: Optional[List[Path]] = typer.Option(
        None, "--hr-dir", help="Folder of HR images, e.g. DIV2K_valid_HR (repeatable)."),
    count: Optional[int] = typer.Option(
        None, "--count", help="Random crops in the set (default 3000: the paper's 3K)."),
    hr_size: Optional[int] = typer.Option(None, "--hr-size", help="HR crop size (512 in the paper)."),
    scale: Optional[int] = typer.Option(None, "--scale", help="HR size / LR size (4 in the paper)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops degraded together."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the test-set pair shards."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Random HR crops degraded with the training degradation (the paper's DIV2K-val set) into pair shards."""
    from stages import testset as stage

    options = dict(
        hr_dirs=hr_dirs or None, count=count, hr_size=hr_size,
        degradation={"scale": scale} if scale is not None else None, seed=seed, device=device, batch_size=batch_size,
        out=out, overwrite=overwrite or None,
    )
    config = _resolve(stage.SyntheticTestsetConfig, "testset_synthetic", params, options, sets)
    stage.run_synthetic(config)


@testset_app.command("paired")
@user_command
def testset_paired(
    lr_dir: Optional[Path] = typer.Option(
        None, "--lr-dir", help="Folder of LR images (e.g. RealSR or DRealSR test LR)."),
    hr_dir: Optional[Path] = typer.Option(
        None, "--hr-dir", help="Folder of HR images matched to the LR by relative path."),
    lr_size: Optional[int] = typer.Option(None, "--lr-size", help="LR centre-crop size (128 in the paper)."),
    scale: Optional[int] = typer.Option(None, "--scale", help="HR size / LR size (4 in the paper)."),
    lr_suffix: Optional[str] = typer.Option(
        None, "--lr-suffix", help="Removed from LR stems before matching (RealSR: _LR4)."),
    hr_suffix: Optional[str] = typer.Option(
        None, "--hr-suffix", help="Removed from HR stems before matching (RealSR: _HR)."),
    allow_unmatched: bool = typer.Option(
        False, "--allow-unmatched", help="Skip files without a partner instead of refusing."),
    skip_bad_pairs: bool = typer.Option(
        False, "--skip-bad-pairs", help="Skip pairs of wrong size, too small or unreadable instead of refusing."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the test-set pair shards."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[List[str]] = SetOption,
    overwrite: bool = OverwriteOption,
) -> None:
    """Real LR/HR pairs (RealSR, DRealSR) matched by name and centre-cropped into pair shards."""
    from stages import testset as stage

    options = dict(
        lr_dir=lr_dir, hr_dir=hr_dir, lr_size=lr_size, scale=scale, lr_suffix=lr_suffix, hr_suffix=hr_suffix,
        allow_unmatched=allow_unmatched or None, skip_bad_pairs=skip_bad_pairs or None, out=out,
        overwrite=overwrite or None,
    )
    config = _resolve(stage.PairedTestsetConfig, "testset_paired", params, options, sets)
    stage.run_paired(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
