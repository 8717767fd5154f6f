"""Stage sr: super-resolve images with a trained XPSR model.

Inputs: an image file, a folder (recursive) or a glob; captions from the captioner, a caption
manifest, or given once (``xpsr_core.infer.inputs``). For each input ``REL.ext`` the output folder
gets ``REL.png`` and ``REL.json`` (settings, captions, seed, sizes, timing); the JSON is written
last, so a rerun skips finished images.

Sampling settings layer as: defaults < a ``pipeline`` folder's recorded recipe < ``preset`` <
explicit values (``xpsr_core.infer.config``). Each image draws from its own generator seeded by
(seed, name), or, with ``generator_scope: run`` (the authors' script), from one generator shared by
all images in input order; then each sidecar records the generator's state after its image, so a
resumed run continues the same stream and writes the same bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

from xpsr_core.config import runtime_field
from xpsr_core.errors import UserError
from xpsr_core.infer.config import SRModelConfig

STAGE = "sr"


class SRConfig(SRModelConfig):
    inputs: list[str] = runtime_field([], "Image files, folders or glob patterns.")
    out: Path = runtime_field(Path("outputs/sr"), "Folder for the SR PNGs and their JSON sidecars.")
    max_failure_ratio: float = runtime_field(0.5, "Fail the run when more than this share of images fail.", ge=0, le=1)
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


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


def run(config: SRConfig) -> dict:
    from PIL import Image

    from stages.common import console, progress_bar, progress_task
    from xpsr_core.infer.config import check_model_paths, load_pipeline
    from xpsr_core.infer.inputs import (
        caption_images,
        collect_inputs,
        generator_state,
        output_stem,
        saved_generator_state,
        set_generator_state,
    )
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
            caption_images(config, todo, progress_task(progress, "captions")[0])
            pipe = load_pipeline(config)
            generator = pipe.make_generator() if run_scope else None
            images_task = progress.add_task("images", total=len(todo), rate="")
            on_step, reset = progress_task(progress, "steps")
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
                    result = pipe.upscale(
                        item["image"], item["content"], item["quality"], step_callback=on_step, generator=generator
                    )
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
        f"[bold green]sr[/] done: {done} images, {skipped} already done, "
        f"{len(failures)} failed of {len(inputs)} inputs, "
        f"{seconds:.1f} s" + (f", {report['images_per_s']:.3f} images/s" if done else "")
    )
    for name, error in list(failures.items())[:10]:
        console.print(f"  failed: {name}: {error}")
    if inputs and len(failures) / len(inputs) > config.max_failure_ratio:
        from xpsr_core.errors import FailureRatioExceeded

        raise FailureRatioExceeded(
            f"{len(failures)} of {len(inputs)} images failed, "
            f"more than the allowed share {config.max_failure_ratio:.0%} "
            "(first: " + "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3]) + ")."
        )
    return report
