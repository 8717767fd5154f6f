"""Score several methods on the same pairs: one SR image per (method, pair), every metric on each.

Methods run one after another over the pairs in key order, so a method with one generator for
the whole run (the authors' ``generator_scope: run``) draws exactly as their script does, and only
one baseline network is in memory at a time. Every SR image goes to ``out/sr/<method>/<key>.png``
(FID compares those folders with ``out/hr/``). A pair or method that cannot be scored keeps a row
or an entry with the reason; nothing is scored as 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..io import images as image_io
from ..io.atomic import atomic_path, atomic_write_json
from .methods import MethodSpec, ablated_prompts, unavailable_reason
from .pairs import Pair, match_images

DEFAULT_METRICS = ["psnr_y", "ssim_y", "psnr", "ssim", "lpips", "dists", "fid", "maniqa", "clipiqa", "musiq", "niqe"]

PairCallback = Callable[[str, int, int], None]  # (method, pairs done, pairs total)
StepCallback = Callable[[int, int], None]  # (steps done, steps total) of the current XPSR image


@dataclass
class XPSRInputs:
    """What the xpsr methods need: the loaded pipeline, each pair's captions and how each image draws."""

    pipe: object  # xpsr_core.infer.XPSRPipeline
    captions: dict[str, tuple[str, str]]  # key -> (c_h, c_l); a key without captions fails for xpsr methods
    caption_errors: dict[str, str] = field(default_factory=dict)
    image_seed: Callable[[str], Optional[int]] = lambda key: 0
    generator_scope: str = "image"


@dataclass
class Evaluation:
    methods: list[str]  # the methods that ran, in order
    rows: list[dict]  # one per (method, pair): key, method, metric values, status, error, seconds, captions
    means: dict[str, dict[str, Optional[float]]]  # method -> metric -> mean over the method's scored pairs
    not_run: dict[str, str]  # method -> why it did not run
    not_computed: dict[str, str]  # metric -> why it has no values
    non_finite: dict[
        str, dict[str, int]
    ]  # metric -> method -> values left out of the mean (inf PSNR of identical images)
    grid_sources: list[dict]  # first pairs: {"key", "lr", "hr", "outputs": [(method, sr)]}
    pairs: int = 0  # pairs given, usable or not
    seconds: float = 0.0


def _upscaler(method: MethodSpec, pairs: list[Pair], scale: int, device: str, xpsr: Optional[XPSRInputs],
              on_step: Optional[StepCallback]) -> Callable[[Pair], tuple[np.ndarray, dict]]:
    """A function (pair) -> (SR image, extra row values) for one method; ValueError for a pair it cannot serve."""
    if method.kind == "bicubic":
        from .baselines import bicubic_upscale

        return lambda pair: (bicubic_upscale(pair.lr, scale), {})
    if method.kind == "realesrgan":
        from .baselines import RealESRGANUpscaler

        network = RealESRGANUpscaler.from_file(method.path, device=device)
        if network.scale != scale:
            raise ValueError(f"{method.path} is a x{network.scale} model; the pairs are x{scale}")
        return lambda pair: (network(pair.lr), {})
    if method.kind == "folder":
        found = match_images(Path(method.path), pairs)

        def from_folder(pair: Pair):
            match = found[pair.key]
            if isinstance(match, str):
                raise ValueError(match)
            return image_io.load_image(match, image_io.DEFAULT_MAX_PIXELS).pixels, {}

        return from_folder
    pipe = xpsr.pipe
    generator = pipe.make_generator() if xpsr.generator_scope == "run" else None

    def sample(pair: Pair):
        if pair.key not in xpsr.captions:
            raise ValueError(xpsr.caption_errors.get(pair.key, f"no captions for {pair.key}"))
        content, quality, settings = ablated_prompts(method.ablation, *xpsr.captions[pair.key], pipe.settings)
        draw = {"generator": generator} if generator is not None else {"seed": xpsr.image_seed(pair.key)}
        result = pipe.upscale(pair.lr, content, quality, settings=settings, step_callback=on_step, **draw)
        return result.image, {"content_caption": content, "quality_caption": quality}

    return sample


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _score_pair(pair: Pair, sr: np.ndarray, metric_runs) -> dict:
    if sr.shape != pair.hr.shape:
        raise ValueError(f"SR shape {sr.shape} differs from HR shape {pair.hr.shape}")
    return {run.name: float(run.score(sr, pair.hr)) for run in metric_runs
            if run.computed and run.spec.kind != "distribution"}


def _run_method(method: MethodSpec, upscale, pairs: list[Pair], metric_runs, out: Path, grid_keys: set[str],
                grid_outputs: dict, on_pair: Optional[PairCallback]) -> list[dict]:
    rows = []
    for index, pair in enumerate(pairs):
        row = {"key": image_io.readable_name(pair.key), "method": method.name, "status": "ok", "error": "",
               "seconds": None}
        if pair.key_bytes is not None:  # a folder's file name, which may not be UTF-8: its exact bytes too
            row["key_bytes"] = pair.key_bytes
        if pair.error is not None:
            row.update(status="error", error=pair.error)
        else:
            started = time.perf_counter()
            try:
                sr, extra = upscale(pair)
                row.update(extra, seconds=round(time.perf_counter() - started, 3))
                row.update(_score_pair(pair, sr, metric_runs))
                _save_png(out / "sr" / method.name / f"{pair.key}.png", sr)
                if pair.key in grid_keys:
                    grid_outputs.setdefault(pair.key, []).append((method.name, sr))
            except (ValueError, image_io.ImageRejected) as error:
                row.update(status="error", error=str(getattr(error, "message", error)))
        rows.append(row)
        if on_pair is not None:
            on_pair(method.name, index + 1, len(pairs))
    return rows


def _distribution_scores(evaluation: Evaluation, pairs: list[Pair], metric_runs, out: Path) -> None:
    """FID-style metrics: each method's SR folder against the HR images of the pairs it scored."""
    runs = [run for run in metric_runs if run.computed and run.spec.kind == "distribution"]
    if not runs:
        return
    hr_folder = out / "hr"
    for pair in pairs:
        if pair.error is None:
            _save_png(hr_folder / f"{pair.key}.png", pair.hr)
    for run in runs:
        for method in evaluation.methods:
            try:
                evaluation.means[method][run.name] = float(run.score_folders(out / "sr" / method, hr_folder))
            except Exception as error:  # e.g. too few images for a covariance: reported, not fatal
                evaluation.means[method][run.name] = None
                evaluation.not_computed.setdefault(run.name, f"{method}: {type(error).__name__}: {error}")


def _means(evaluation: Evaluation, metric_runs) -> None:
    for method in evaluation.methods:
        ok = [row for row in evaluation.rows if row["method"] == method and row["status"] == "ok"]
        for run in metric_runs:
            if not run.computed or run.spec.kind == "distribution":
                continue
            values = [row[run.name] for row in ok if run.name in row]
            finite = [v for v in values if math.isfinite(v)]
            if len(finite) < len(values):
                evaluation.non_finite.setdefault(run.name, {})[method] = len(values) - len(finite)
            evaluation.means[method][run.name] = float(np.mean(finite)) if finite else None


def evaluate_methods(pairs: list[Pair], methods: list[MethodSpec], metric_runs, *, scale: int, out: Path,
                     xpsr: Optional[XPSRInputs] = None, device: str = "cpu", grid_images: int = 4,
                     on_pair: Optional[PairCallback] = None, on_step: Optional[StepCallback] = None) -> Evaluation:
    """Upscale every usable pair with every method and score it with every computed metric."""
    started = time.perf_counter()
    out = Path(out)
    evaluation = Evaluation(methods=[], rows=[], means={}, not_run={},
                            not_computed={run.name: run.reason for run in metric_runs if not run.computed},
                            non_finite={}, grid_sources=[], pairs=len(pairs))
    usable = [pair for pair in pairs if pair.error is None]
    grid_keys = {pair.key for pair in usable[:grid_images]}
    grid_outputs: dict[str, list] = {}
    for method in methods:
        reason = unavailable_reason(method)
        if reason is None and method.kind == "xpsr" and xpsr is None:
            reason = "no XPSR model is loaded"
        try:
            upscale = None if reason else _upscaler(method, pairs, scale, device, xpsr, on_step)
        except ValueError as error:
            reason = str(error)
        if reason:
            evaluation.not_run[method.name] = reason
            continue
        evaluation.methods.append(method.name)
        evaluation.means[method.name] = {}
        evaluation.rows += _run_method(method, upscale, pairs, metric_runs, out, grid_keys, grid_outputs, on_pair)
        del upscale  # a baseline network's memory goes before the next method's
    _means(evaluation, metric_runs)
    _distribution_scores(evaluation, pairs, metric_runs, out)
    evaluation.grid_sources = [{"key": p.key, "lr": p.lr, "hr": p.hr, "outputs": grid_outputs[p.key]}
                               for p in usable[:grid_images] if grid_outputs.get(p.key)]
    evaluation.seconds = time.perf_counter() - started
    return evaluation


def write_evaluation(out: Path, evaluation: Evaluation, metric_runs, title: str = "", crop_border: int = 0) -> dict:
    """The report files, the grids and ``metric_details.json``; returns the run's summary."""
    from .report import MetricColumn, comparison_grid, write_report

    out = Path(out)
    columns = [MetricColumn(run.name, run.spec.label, run.spec.higher_is_better) for run in metric_runs]
    files = write_report(out, evaluation.methods, columns, evaluation.means, evaluation.rows, evaluation.not_computed,
                         title=title)
    for source in evaluation.grid_sources:
        grid = comparison_grid(source["lr"], source["outputs"], source["hr"])
        target = out / "grids" / f"{source['key']}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            grid.save(tmp, format="PNG")
    counts = {}
    for method in evaluation.methods:
        statuses = [row["status"] for row in evaluation.rows if row["method"] == method]
        counts[method] = {"images": statuses.count("ok"), "failed": len(statuses) - statuses.count("ok")}
    details = {
        "crop_border": crop_border,
        "methods": {name: {"ran": True, **counts[name]} for name in evaluation.methods}
        | {name: {"ran": False, "reason": reason} for name, reason in evaluation.not_run.items()},
        "metrics": {
            run.name: {
                "label": run.spec.label,
                "kind": run.spec.kind,
                "higher_is_better": run.spec.higher_is_better,
                "computed": run.name not in evaluation.not_computed,
                **({"reason": evaluation.not_computed[run.name]} if run.name in evaluation.not_computed else {}),
                **(
                    {"non_finite_excluded": evaluation.non_finite[run.name]}
                    if run.name in evaluation.non_finite
                    else {}
                ),
            }
            for run in metric_runs
        },
    }
    atomic_write_json(out / "metric_details.json", details)
    return {"pairs": evaluation.pairs, "counts": counts, "means": evaluation.means, "not_run": evaluation.not_run,
            "not_computed": evaluation.not_computed, "files": {k: str(v) for k, v in files.items()},
            "grids": len(evaluation.grid_sources)}
