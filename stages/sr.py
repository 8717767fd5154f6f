"""Stage sr: super-resolve images with a trained XPSR model.

Inputs: an image file, a folder (recursive) or a glob. Captions come from the captioner (the
paper's two instructions on the LR image), from a caption manifest (Parquet file or folder of
them, matched by source path, file name, stem or key), or are given once for every image.
For each input ``REL.ext`` the output folder gets ``REL.png`` and ``REL.json`` (settings,
captions, seed, sizes, timing); the JSON is written last, so a rerun skips finished images.

Sampling settings layer as: defaults < a ``pipeline`` folder's recorded recipe < ``preset`` <
explicit values. Each image draws from its own generator seeded by (seed, name), or, with
``generator_scope: run`` (the authors' script), from one generator shared by all images in input
order; then each sidecar records the generator's state after its image, so a resumed run
continues the same stream and writes the same bytes.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from xpsr_core.config import StageConfig, runtime_field
from xpsr_core.encoding import NEGATIVE_PROMPT
from xpsr_core.errors import UserError

STAGE = "sr"


SAMPLING_FIELDS = (
    "scale", "steps", "scheduler", "guidance_scale", "negative_prompt", "cfg_batched", "controlnet_negative",
    "conditioning_scale", "color_fix", "tile_size", "tile_overlap", "vae_tile_size", "vae_tile_overlap", "seed",
    "added_prompt", "negative_quality_prompt", "start_latent", "added_noise_level", "resize", "process_size",
    "pad_multiple", "latent_tile_threshold", "vae_decode_tile_size", "generator_scope", "generator_device",
)  # the config fields that are SRSettings fields


class SRModelConfig(StageConfig):
    """Model, caption and sampling settings shared by `xpsr sr` and `xpsr evaluate`.

    Sampling values resolve in layers, lowest first: the field defaults; a saved pipeline
    folder's recorded defaults (``pipeline``); the named ``preset``; every value given explicitly
    (params file, CLI options, ``--set``, keyword arguments).
    """

    preset: Optional[Literal["default", "paper", "official"]] = Field(
        None, description="Named inference recipe (xpsr_core.infer.presets); explicit values override it.")

    base_model: str = Field("models/tiny/sd15", description="Frozen SD-1.5 folder or hub id.")
    xpsr: Optional[str] = Field("models/xpsr/final", description="Trained XPSR folder (XPSRModel.save_trainable layout, or a run folder with final/).")
    pipeline: Optional[str] = Field(None, description="A saved XPSR pipeline folder (replaces base_model and xpsr).")
    captions: Literal["captioner", "manifest", "given"] = Field("captioner", description="Where the captions come from.")
    captioner: str = Field("models/tiny/captioner", description="Captioner folder or hub id (llava-hf layout).")
    caption_max_new_tokens: int = Field(128, ge=1, le=4096)
    caption_batch_size: int = runtime_field(4, "Images per captioner generate() call.", ge=1)
    manifest: Optional[Path] = Field(None, description="Caption manifest: a .parquet file or a folder of them.")
    content_caption: str = Field("", description="High-level caption c_h for every image (captions=given).")
    quality_caption: str = Field("", description="Low-level caption c_l for every image (captions=given).")
    scale: int = Field(4, ge=1, le=16)
    steps: int = Field(20, ge=1, le=1000)
    scheduler: Literal["ddpm", "ddim", "dpm-solver", "unipc", "euler"] = "ddpm"
    guidance_scale: float = Field(5.5, ge=0)
    negative_prompt: str = NEGATIVE_PROMPT
    cfg_batched: bool = runtime_field(True, "Run both guidance branches as one batch (same result, faster).")
    controlnet_negative: bool = Field(True, description="The ControlNet also sees the negative prompt in the negative branch.")
    conditioning_scale: float = Field(1.0, ge=0)
    color_fix: Literal["adain", "wavelet", "adain-official", "none"] = "adain"
    tile_size: Optional[int] = Field(None, ge=64, description="Latent tile in output pixels (default: the UNet's native size).")
    tile_overlap: Optional[int] = Field(None, ge=0, description="Latent tile overlap in pixels (default: tile_size / 4).")
    vae_tile_size: Optional[int] = Field(None, ge=64, description="VAE tile in pixels (default: the VAE's native size).")
    vae_tile_overlap: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(0, description="None: unseeded generators (torch's default seed).")
    added_prompt: str = Field("", description="Appended to every content caption c_h (official: the authors' quality words).")
    negative_quality_prompt: Optional[str] = Field(None, description="c_l of the negative guidance branch (None: the image's c_l).")
    start_latent: Literal["mean", "sample"] = Field("mean", description="Start from the LR latent's posterior mean or a sample.")
    added_noise_level: Optional[int] = Field(None, ge=0, description="Noise the start latent once more, to this timestep (official: 800).")
    resize: Literal["torch-bicubic", "pil-bicubic"] = Field("torch-bicubic", description="LR -> condition resize chain.")
    process_size: Optional[int] = Field(None, ge=8, description="Enlarge conditions with a shorter side to it; resize the output back.")
    pad_multiple: Optional[int] = Field(None, ge=1, description="Pad the condition to this multiple (default: the model's).")
    latent_tile_threshold: Optional[int] = Field(None, ge=8, description="Pixels: latents of area <= (this / 8)^2 are sampled whole.")
    vae_decode_tile_size: Optional[int] = Field(None, ge=64, description="VAE decoder tile in pixels (default: vae_tile_size).")
    generator_scope: Literal["image", "run"] = Field("image", description="One generator per image, or one for the whole run in input order.")
    generator_device: Literal["cpu", "device"] = Field("cpu", description="Draw random numbers on the CPU or on the model's device.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="float16/bfloat16 on a GPU.")
    device: str = runtime_field("cpu", "cpu, cuda or cuda:N")

    @model_validator(mode="before")
    @classmethod
    def _layer_sampling_values(cls, data: Any) -> Any:
        """Fill the sampling values not given explicitly from the preset, then the pipeline folder."""
        if not isinstance(data, dict) or not (data.get("preset") or data.get("pipeline")):
            return data
        from xpsr_core.infer.presets import PRESETS, layered_settings

        preset = data.get("preset") if data.get("preset") in PRESETS else None  # an unknown name fails field validation
        return layered_settings(dict(data), preset=preset, pipeline=data.get("pipeline"), fields=set(SAMPLING_FIELDS))

    def sr_settings(self, seed: Any = "config"):
        from xpsr_core.infer import SRSettings

        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        if seed != "config":
            values["seed"] = seed
        return SRSettings(**values)

    def image_seed(self, stem: str) -> Optional[int]:
        """The seed of one image's own generator (generator_scope=image): derived from seed and the image's name."""
        from xpsr_core.seeding import derive_seed

        return None if self.seed is None else derive_seed(self.seed, STAGE, stem)


class SRConfig(SRModelConfig):
    inputs: list[str] = runtime_field([], "Image files, folders or glob patterns.")
    out: Path = runtime_field(Path("outputs/sr"), "Folder for the SR PNGs and their JSON sidecars.")
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of images fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


# ---------------------------------------------------------------------------- inputs


def collect_inputs(specs: list[str]) -> list[tuple[Path, str]]:
    """(path, relative name) of every image named by files, folders or globs; names are unique."""
    from xpsr_core.io.images import IMAGE_SUFFIXES, find_images

    found: list[tuple[Path, str]] = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            found += [(p, p.relative_to(path).as_posix()) for p in find_images(path)]
        elif path.is_file():
            found.append((path, path.name))
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if matches:
                parts = Path(os.path.expanduser(spec)).parts
                fixed = [part for part in parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]]
                root = Path(*fixed) if fixed else Path(".")  # names are relative to the pattern's fixed prefix
                found += [(m, m.relative_to(root).as_posix()) for m in matches]
            else:
                raise UserError(f"The pattern {spec!r} matches no images.")
        else:
            raise UserError(f"Input {spec} is not an image file, a folder or a glob pattern that matches images.")
    if not found:
        raise UserError("No input images: the given folders hold no jpg, png, webp, tiff or bmp files.")
    names = [name for _, name in found]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"Several inputs map to the same output name ({', '.join(duplicates[:5])}); run them separately.")
    return found


def output_stem(name: str) -> str:
    return str(Path(name).with_suffix(""))


# ---------------------------------------------------------------------------- captions


class CaptionLookup:
    """Captions from Parquet manifests, looked up by source path, file name, stem or key."""

    def __init__(self, manifest: Path):
        import pyarrow.parquet as pq

        manifest = Path(manifest)
        files = sorted(manifest.glob("*.parquet")) if manifest.is_dir() else [manifest]
        if not files or not all(f.is_file() for f in files):
            raise UserError(f"Caption manifest {manifest} does not exist or holds no .parquet files.")
        self.table: dict[str, tuple[str, str]] = {}
        for file in files:
            try:
                rows = pq.read_table(file).to_pylist()
            except Exception as error:
                raise UserError(f"Cannot read the caption manifest {file}: {error}") from None
            for row in rows:
                if row.get("status", "ok") != "ok" or row.get("content_caption") is None:
                    continue
                pair = (row["content_caption"], row.get("quality_caption") or "")
                for name in (row.get("key"), row.get("source")):
                    if name:
                        self.table.setdefault(str(name), pair)
                        self.table.setdefault(Path(str(name)).name, pair)
                        self.table.setdefault(Path(str(name)).stem, pair)

    def get(self, *names: str) -> Optional[tuple[str, str]]:
        for name in names:
            for candidate in (name, Path(name).name, Path(name).stem):
                if candidate in self.table:
                    return self.table[candidate]
        return None


def caption_images(config: SRModelConfig, items: list[dict], progress=None) -> None:
    """Fill ``content``/``quality`` (or ``error``) of items holding a PIL ``image`` and a ``name``/``key``."""
    ready = [item for item in items if "image" in item and "error" not in item]
    if config.captions == "given":
        for item in ready:
            item["content"], item["quality"] = config.content_caption, config.quality_caption
        return
    if config.captions == "manifest":
        if config.manifest is None:
            raise UserError("captions=manifest needs a manifest path (--manifest FILE_OR_FOLDER).")
        lookup = CaptionLookup(config.manifest)
        for item in ready:
            found = lookup.get(*(n for n in (item.get("name"), item.get("key")) if n))
            if found is None:
                item["error"] = f"no ok caption for {item.get('name') or item.get('key')} in {config.manifest}"
            else:
                item["content"], item["quality"] = found
        return
    from xpsr_core.caption import Captioner, GenerationSettings
    from xpsr_core.caption.captioner import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION

    captioner = Captioner(config.captioner, dtype=config.dtype, device=config.device,
                          settings=GenerationSettings(max_new_tokens=config.caption_max_new_tokens))
    task = progress.add_task("captions", total=len(ready), rate="") if progress is not None else None
    for start in range(0, len(ready), config.caption_batch_size):
        batch = ready[start : start + config.caption_batch_size]
        texts = captioner.caption([item["image"] for item in batch], [CONTENT_INSTRUCTION, QUALITY_INSTRUCTION])
        for item, (content, quality) in zip(batch, texts):
            item["content"], item["quality"] = content, quality
        if progress is not None:
            progress.update(task, advance=len(batch))
    del captioner  # its weights go before the SR model loads
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- pipeline


def load_pipeline(config: SRModelConfig):
    import torch

    from xpsr_core.infer import XPSRPipeline

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {config.device} was asked for, but PyTorch sees no CUDA GPU. Use --device cpu.")
    if config.pipeline:
        return XPSRPipeline.from_pretrained(config.pipeline, dtype=config.dtype, device=config.device, settings=config.sr_settings())
    if not config.xpsr:
        raise UserError("No trained XPSR folder is configured: pass --xpsr DIR (a training run's final/ folder) or --pipeline DIR.")
    return XPSRPipeline.from_pretrained(base_model=config.base_model, xpsr=config.xpsr, dtype=config.dtype,
                                        device=config.device, settings=config.sr_settings())


def check_model_paths(config: SRModelConfig) -> None:
    """Fail before any work when a configured local model folder is missing."""
    from xpsr_core.models.loading import COMPONENTS, _check_local_folder, _looks_like_hub_id

    if config.pipeline:
        if not Path(config.pipeline).is_dir():
            raise UserError(f"The pipeline folder {config.pipeline} does not exist.")
        return
    base = Path(os.path.expanduser(config.base_model))
    if base.exists() or not _looks_like_hub_id(config.base_model):
        _check_local_folder(base, COMPONENTS)
    if config.xpsr and not Path(config.xpsr).exists():
        raise UserError(
            f"The XPSR checkpoint folder {config.xpsr} does not exist. Train one with `xpsr train` and point --xpsr at "
            "its run folder's final/ (or any folder written by XPSRModel.save_trainable)."
        )


def sidecar(result, extra: dict) -> dict:
    return {
        **extra,
        "content_caption": result.content_caption,
        "quality_caption": result.quality_caption,
        "seed": result.seed,
        "settings": result.settings,
        "latent_tiles": result.latent_tiles,
        "seconds": round(result.seconds, 3),
        **result.info,
    }


def generator_state(generator) -> str:
    """A torch.Generator's state as text (base64), for a sidecar."""
    import base64

    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(generator, text: str) -> None:
    import base64

    import torch

    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))


def saved_generator_state(path: Path) -> Optional[str]:
    """The generator state recorded in a finished image's sidecar (None when absent or unreadable)."""
    import json

    try:
        state = json.loads(Path(path).read_text()).get("generator_state")
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, str) and state else None


def step_progress(progress, label: str):
    """A rich task for the steps of the current image and a callback that advances it."""
    task = progress.add_task(label, total=1, rate="")

    def callback(done: int, total: int) -> None:
        progress.update(task, total=total, completed=done)

    def reset(description: str) -> None:
        progress.update(task, description=description, completed=0)

    return callback, reset


def run(config: SRConfig) -> dict:
    from PIL import Image

    from stages.common import console, progress_bar
    from xpsr_core.io import images as image_io
    from xpsr_core.io.atomic import atomic_path, atomic_write_json
    from xpsr_core.io.outputs import prepare_output_dir

    started = time.perf_counter()
    if not config.inputs:
        raise UserError("No inputs: give image files, folders or glob patterns (xpsr sr INPUT... --out DIR).")
    inputs = collect_inputs(config.inputs)
    check_model_paths(config)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)

    # generator_scope=run: one generator serves the images in input order; a finished image's sidecar
    # records the generator's state after it, so a resumed run continues the same stream
    run_scope = config.generator_scope == "run"
    entries: list[dict] = []
    skipped = 0
    for path, name in inputs:
        stem = output_stem(name)
        if (out / f"{stem}.json").is_file() and (out / f"{stem}.png").is_file():
            state = saved_generator_state(out / f"{stem}.json") if run_scope else None
            if not run_scope or state is not None:
                skipped += 1
                entries.append({"name": name, "stem": stem, "done": True, "generator_state": state})
                continue
        item = {"path": path, "name": name, "stem": stem}
        try:
            item["image"] = Image.fromarray(image_io.load_image(path, image_io.DEFAULT_MAX_PIXELS).pixels)
        except image_io.ImageRejected as rejected:
            item.update(status=rejected.status, error=rejected.message)
        entries.append(item)
    items = [entry for entry in entries if not entry.get("done")]

    failures: dict[str, str] = {i["name"]: i["error"] for i in items if "error" in i}
    done = 0
    with progress_bar() as progress:
        todo = [i for i in items if "error" not in i]
        if todo:
            caption_images(config, todo, progress)
            pipe = load_pipeline(config)
            generator = pipe.make_generator() if run_scope else None
            images_task = progress.add_task("images", total=len(todo), rate="")
            on_step, reset = step_progress(progress, "steps")
            pending = {id(item) for item in todo}
            for item in entries:
                if item.get("done"):
                    if generator is not None:
                        set_generator_state(generator, item["generator_state"])
                    continue
                if id(item) not in pending:
                    continue
                if "error" in item:
                    failures[item["name"]] = item["error"]
                    progress.update(images_task, advance=1)
                    continue
                reset(f"steps {item['name']}")
                if generator is not None:
                    result = pipe.upscale(item["image"], item["content"], item["quality"], step_callback=on_step, generator=generator)
                else:
                    result = pipe.upscale(item["image"], item["content"], item["quality"], step_callback=on_step,
                                          seed=config.image_seed(item["stem"]))
                target = out / f"{item['stem']}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    Image.fromarray(result.image).save(tmp, format="PNG")
                extra = {"input": str(item["path"]), "output": f"{item['stem']}.png", "model": pipe.source}
                if generator is not None:
                    extra["generator_state"] = generator_state(generator)
                atomic_write_json(out / f"{item['stem']}.json", sidecar(result, extra))
                done += 1
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(images_task, advance=1, rate=f"{done / elapsed:.2f} images/s")
    seconds = time.perf_counter() - started
    report = {
        "stage": STAGE, "inputs": len(inputs), "done": done, "skipped": skipped, "failed": len(failures),
        "failures": failures, "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 4) if done else None,
        "out": str(out),
    }
    console.print(
        f"[bold green]sr[/] done: {done} images, {skipped} already done, {len(failures)} failed of {len(inputs)} inputs, "
        f"{seconds:.1f} s" + (f", {report['images_per_s']:.3f} images/s" if done else "")
    )
    for name, error in list(failures.items())[:10]:
        console.print(f"  failed: {name}: {error}")
    if inputs and len(failures) / len(inputs) > config.max_failure_ratio:
        from xpsr_core.errors import FailureRatioExceeded

        raise FailureRatioExceeded(
            f"{len(failures)} of {len(inputs)} images failed, more than the allowed share {config.max_failure_ratio:.0%} "
            "(first: " + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3]) + ")."
        )
    return report
