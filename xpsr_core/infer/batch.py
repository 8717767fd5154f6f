"""Super-resolve a list of images into a folder: resume, decode, caption, sample, write a PNG and a JSON sidecar.

For each input ``(path, name)`` (``xpsr_core.infer.inputs.collect_inputs``) the folder gets ``STEM.png`` and
``STEM.json`` (STEM: the name without its suffix, or with it where inputs would share a stem, see
``inputs.output_stems``; settings, captions, seed, sizes, timing). The JSON is written last, so an image with both
files is finished and a rerun skips it. ``check_output_folder`` refuses a folder that overlaps the inputs, or would
have a file that xpsr did not write replaced.

Each image draws from its own generator seeded by (seed, name), or, with ``generator_scope: run``, from one
generator shared by all images in input order; then each sidecar records the generator's state after its image, and
a resumed run restores the states of the images it skips, so it continues the same stream and writes the same bytes.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import UserError
from ..io.atomic import atomic_path, atomic_write_json
from .config import SRModelConfig, load_pipeline


class BatchProgress:
    """What ``super_resolve_folder`` reports as it goes; every method does nothing unless a subclass overrides it.

    The folder's work runs inside ``with progress:`` once the inputs are decoded, so a subclass may open its
    display in ``__enter__`` and close it in ``__exit__``.
    """

    def __enter__(self) -> "BatchProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def captions_started(self) -> Optional[Callable[[int, int], None]]:
        """Captioning begins; returns the ``on_progress(done, total)`` that follows the captioner's batches."""
        return None

    def images_started(self, total: int) -> None:
        """The pipeline is loaded; ``total`` decoded images are next (sampled, or failed for want of a caption)."""

    def image_started(self, name: str) -> None:
        """Sampling of image ``name`` begins."""

    def step(self, done: int, total: int) -> None:
        """A sampling step of the current image is done."""

    def image_finished(self, name: str, done: int, error: Optional[str] = None) -> None:
        """Image ``name`` is written (``done`` images so far), or failed with ``error``."""

    def notice(self, name: str, text: str) -> None:
        """A one-line notice about image ``name`` (a caption longer than the model reads); printed to stderr."""
        print(f"{name}: {text}", file=sys.stderr, flush=True)


def sidecar(result, extra: dict) -> dict:
    """The JSON record of one SR result: ``extra`` (input, output, model...), captions, seed, settings, timing."""
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


def _finished_entry(out: Path, name: str, stem: str, run_scope: bool) -> Optional[dict]:
    """The entry of an image finished in ``out`` (PNG and JSON sidecar), or None when it must be (re)done.

    With a run generator an image counts as finished only when its sidecar holds the generator's state after it.
    """
    from .inputs import saved_generator_state

    if not ((out / f"{stem}.json").is_file() and (out / f"{stem}.png").is_file()):
        return None
    state = saved_generator_state(out / f"{stem}.json") if run_scope else None
    if run_scope and state is None:
        return None
    return {"name": name, "stem": stem, "done": True, "generator_state": state}


def _decoded_entry(path: Path, name: str, stem: str) -> dict:
    """An input to super-resolve: its PIL ``image``, or the ``status`` and ``error`` of a rejected file."""
    from PIL import Image

    from ..io import images as image_io

    item = {"path": path, "name": image_io.readable_name(name), "stem": stem}
    try:
        item["image"] = Image.fromarray(image_io.load_sr_input(path).pixels)
    except image_io.ImageRejected as rejected:
        item.update(status=rejected.status, error=f"{rejected.status}: {rejected.message}")
    return item


def _write_result(out: Path, item: dict, result, pipe, generator) -> None:
    """The SR PNG, then its sidecar (written last: it marks the image finished), each replaced atomically."""
    from PIL import Image

    from ..io.images import readable_name
    from .inputs import generator_state

    target = out / f"{item['stem']}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        Image.fromarray(result.image).save(tmp, format="PNG")
    extra = {"input": readable_name(str(item["path"])), "output": readable_name(f"{item['stem']}.png"),
             "model": pipe.source}
    if extra["input"] != str(item["path"]):  # a name that is not UTF-8: its exact bytes too
        extra["input_bytes"] = os.fsencode(item["path"]).hex()
    if generator is not None:
        extra["generator_state"] = generator_state(generator)
    atomic_write_json(out / f"{item['stem']}.json", sidecar(result, extra))


def _sample_entries(
    config: SRModelConfig, entries: list[dict], out: Path, failures: dict[str, str], progress: BatchProgress,
    compile_report: dict,
) -> int:
    """Load the pipeline and super-resolve the decoded, captioned entries in input order; the number written.
    With ``compile``, ``compile_report`` gets the mode, the compile seconds and the graphs compiled.

    A finished entry only restores the run generator's state after it; a caption failure joins ``failures``.
    """
    from .inputs import set_generator_state

    pipe = load_pipeline(config)
    generator = pipe.make_generator() if config.generator_scope == "run" else None
    progress.images_started(sum("image" in entry for entry in entries))
    done = 0
    for item in entries:
        if item.get("done"):
            if generator is not None:
                set_generator_state(generator, item["generator_state"])
        elif "image" not in item:  # rejected by the decoder: already a failure
            continue
        elif "error" in item:
            failures[item["name"]] = item["error"]
            progress.image_finished(item["name"], done, item["error"])
        else:
            progress.image_started(item["name"])
            for notice in pipe.truncation_notices(item["content"], item["quality"]):
                progress.notice(item["name"], notice)
            # a run generator carries on from the previous image; otherwise the image's own seed
            draw = {"generator": generator} if generator is not None else {"seed": config.image_seed(item["stem"])}
            result = pipe.upscale(item["image"], item["content"], item["quality"], step_callback=progress.step, **draw)
            _write_result(out, item, result, pipe, generator)
            done += 1
            progress.image_finished(item["name"], done)
    if pipe.compile_clock is not None:
        compile_report.update(mode=config.compile, **pipe.compile_clock.report())
        print(f"sr: torch.compile ({config.compile}) took {compile_report['compile_seconds']:.1f} s "
              f"({compile_report['compiled_graphs']} graphs)", flush=True)
    return done


def super_resolve_folder(
    config: SRModelConfig,
    inputs: Sequence[tuple[Path, str]],
    out: Path,
    *,
    progress: Optional[BatchProgress] = None,
    started: Optional[float] = None,
) -> dict:
    """Super-resolve ``inputs`` ((path, relative name) pairs) into the folder ``out``, skipping finished images.

    Captions come as ``config.captions`` says (``caption_images``). Call ``check_model_paths(config)`` first to
    fail on a missing model folder before any decoding or captioning. ``started`` (a ``time.perf_counter()``
    value; default: now) is where the report's seconds count from. Returns the report: the number of inputs,
    images done, skipped (already finished) and failed, ``failures`` (name -> error), seconds, images per second
    and the folder.
    """
    from .inputs import caption_images, output_stems

    started = time.perf_counter() if started is None else started
    progress = progress or BatchProgress()
    out = Path(out)
    run_scope = config.generator_scope == "run"
    stems = output_stems([name for _, name in inputs])
    entries = [_finished_entry(out, name, stem, run_scope) or _decoded_entry(path, name, stem)
               for (path, name), stem in zip(inputs, stems)]
    skipped = sum(1 for entry in entries if entry.get("done"))
    failures: dict[str, str] = {entry["name"]: entry["error"] for entry in entries if "error" in entry}
    done = 0
    compiled: dict = {}
    with progress:
        todo = [entry for entry in entries if "image" in entry]
        if todo:
            caption_images(config, todo, progress.captions_started() if config.captions == "captioner" else None)
            done = _sample_entries(config, entries, out, failures, progress, compiled)
    seconds = time.perf_counter() - started
    report = {
        "inputs": len(inputs), "done": done, "skipped": skipped, "failed": len(failures), "failures": failures,
        "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 4) if done else None, "out": str(out),
    }
    return report | ({"compile": compiled} if compiled else {})


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies below it."""
    return path == folder or folder in path.parents


def _pattern_matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """A path's components against a glob's, ``**`` standing for any number of components."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_pattern_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _pattern_matches(parts[1:], pattern[1:])


def _overlap(out: Path, spec: str, planned: list[Path]) -> Optional[str]:
    """Why the output folder ``out`` cannot serve the input folder or pattern ``spec`` (None when it can)."""
    from .inputs import glob_root

    path = Path(os.path.realpath(os.path.expanduser(spec)))
    if Path(os.path.expanduser(spec)).is_dir():
        if _inside(out, path):
            return f"it is, or lies inside, the input folder {spec}: its outputs would become inputs"
        if _inside(path, out):
            return f"it holds the input folder {spec}"
        return None
    if glob.has_magic(spec) and not Path(os.path.expanduser(spec)).is_file():
        if _inside(Path(os.path.realpath(glob_root(spec))), out):
            return f"it holds the folder of the input pattern {spec}"
        pattern = Path(os.path.abspath(os.path.expanduser(spec))).parts
        hit = next((p for p in planned if _pattern_matches(p.parts, pattern)), None)
        if hit is not None:
            return f"the pattern {spec} would match its output {hit.name}"
    return None


def check_output_folder(out: Path, specs: Sequence[str], inputs: Sequence[tuple[Path, str]]) -> None:
    """Refuse an output folder that is, holds or lies inside an input folder, or whose outputs an input pattern
    would match, or where an output would replace a file xpsr did not write. Changes nothing."""
    from ..io.images import readable_name
    from ..io.outputs import Ownership, read_record
    from .inputs import output_stems

    real_out = Path(os.path.realpath(out))
    stems = output_stems([name for _, name in inputs])
    planned = [real_out / f"{stem}{suffix}" for stem in stems for suffix in (".png", ".json")]
    held = next((path for path, _ in inputs if _inside(Path(os.path.realpath(path)), real_out)), None)
    reasons = [_overlap(real_out, spec, planned) for spec in specs]
    reasons.append(f"it holds the input {readable_name(str(held))}" if held is not None else None)
    for why in reasons:
        if why is not None:
            raise UserError(f"Cannot write the SR outputs to {out}: {why}. Choose an output folder apart from the "
                            "inputs.")
    if not Path(out).is_dir():
        return
    ownership = Ownership(Path(out), "sr", read_record(Path(out)))
    targets = [f"{stem}{suffix}" for stem in stems for suffix in (".png", ".json")]
    foreign = [t for t in targets if (Path(out) / t).exists() and t not in ownership.owned_set]
    if foreign:
        raise UserError(
            f"{out} already holds {len(foreign)} files that xpsr did not write under the output names of these "
            f"inputs ({', '.join(readable_name(f) for f in foreign[:5])}); sr never replaces them. Move them away "
            "or choose another output folder."
        )
