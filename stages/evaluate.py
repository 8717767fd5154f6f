"""Stage evaluate: super-resolve LR/HR pairs and score the results against the HR images.

Pairs come from pair shards (``lr.png``/``hr.png`` per key, e.g. a validation split) or from
two folders matched by relative path (extension ignored). With ``sr_dir`` the SR images are
read from a folder (matched the same way) instead of being generated.

Outputs in ``out``: ``per_image.parquet`` (one row per pair: metrics, captions, status),
``metrics.json`` (the numbers, for DVC), ``metric_details.json`` (every metric either
has a value or ``computed: false`` with the reason), ``grid.png`` (LR upsampled | SR | HR rows) and, with
``save_sr``, the SR images under ``sr/``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from stages.sr import SRModelConfig, caption_images, check_model_paths, load_pipeline
from xpsr_core.config import runtime_field
from xpsr_core.errors import UserError

STAGE = "evaluate"
DEFAULT_METRICS = ["lpips", "dists", "fid", "maniqa", "musiq", "clipiqa"]
DEFAULT_WEIGHTS = {
    "lpips": "models/metrics/lpips",
    "dists": "models/metrics/DISTS_weights.pt",
    "fid": "models/metrics/pt_inception-2015-12-05.pth",
    "maniqa": "models/metrics/ckpt_koniq10k.pt",
    "musiq": "models/metrics/musiq_koniq_ckpt.pth",
    "clipiqa": "models/metrics/clipiqa",
}


class EvaluateConfig(SRModelConfig):
    pairs_dir: Optional[Path] = runtime_field(Path("data/shards/val_pairs"), "Pair shards (lr.png / hr.png per key).")
    lr_dir: Optional[Path] = runtime_field(None, "Folder of LR images (with hr_dir, instead of pair shards).")
    hr_dir: Optional[Path] = runtime_field(None, "Folder of HR images matched to lr_dir by relative path.")
    sr_dir: Optional[Path] = runtime_field(None, "Score existing SR images from this folder instead of generating them.")
    out: Path = runtime_field(Path("metrics/eval"), "Folder for per_image.parquet, metrics.json and grid.png.")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate at most this many pairs (in key order).")
    crop_border: Optional[int] = Field(None, ge=0, description="Border cropped before PSNR/SSIM (default: the scale).")
    metrics: list[str] = Field(DEFAULT_METRICS, description="Optional weight-backed metrics to try.")
    metric_weights: dict[str, Optional[str]] = Field(DEFAULT_WEIGHTS, description="Local weights path per optional metric.")
    grid_images: int = Field(8, ge=0, description="Rows in grid.png.")
    save_sr: bool = runtime_field(True, "Also write the SR images to out/sr/.")
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


# ---------------------------------------------------------------------------- pairs


def load_pairs(config: EvaluateConfig) -> list[dict]:
    """[{key, name, lr, hr} or {key, name, error}] in key order (at most ``limit``)."""
    from xpsr_core.io import images as image_io

    pairs: list[dict] = []
    if config.lr_dir is not None or config.hr_dir is not None:
        if config.lr_dir is None or config.hr_dir is None:
            raise UserError("Folder evaluation needs both --lr-dir and --hr-dir.")
        for folder in (config.lr_dir, config.hr_dir):
            if not Path(folder).is_dir():
                raise UserError(f"Image folder {folder} does not exist or is not a folder.")
        hr_by_stem = {str(p.relative_to(config.hr_dir).with_suffix("")): p for p in image_io.find_images(config.hr_dir)}
        lr_files = image_io.find_images(config.lr_dir)
        if not lr_files:
            raise UserError(f"{config.lr_dir} holds no images.")
        for path in lr_files:
            stem = str(path.relative_to(config.lr_dir).with_suffix(""))
            pair = {"key": stem, "name": path.relative_to(config.lr_dir).as_posix()}
            if stem not in hr_by_stem:
                pair["error"] = f"no HR image for {stem} in {config.hr_dir}"
            else:
                try:
                    pair["lr"] = image_io.load_image(path, image_io.DEFAULT_MAX_PIXELS).pixels
                    pair["hr"] = image_io.load_image(hr_by_stem[stem], image_io.DEFAULT_MAX_PIXELS).pixels
                except image_io.ImageRejected as rejected:
                    pair["error"] = f"{rejected.status}: {rejected.message}"
            pairs.append(pair)
            if config.limit and len(pairs) >= config.limit:
                break
        return pairs
    from xpsr_core.io.shards import SIZES_FILE, read_shard, read_sizes, tar_path

    folder = Path(config.pairs_dir) if config.pairs_dir else None
    if folder is None or not (folder / SIZES_FILE).is_file():
        raise UserError(
            f"{folder} is not a finished pair-shard folder (no {SIZES_FILE}). Pass validation pair shards (--pairs) "
            "or an LR/HR folder pair (--lr-dir, --hr-dir)."
        )
    for shard in sorted(read_sizes(folder)):
        for sample in read_shard(tar_path(folder, shard)):
            pair = {"key": sample["__key__"], "name": sample["__key__"]}
            try:
                pair["lr"], pair["hr"] = image_io.decode_png(sample["lr.png"]), image_io.decode_png(sample["hr.png"])
            except Exception as error:
                pair["error"] = f"cannot decode the pair: {error}"
            pairs.append(pair)
            if config.limit and len(pairs) >= config.limit:
                return pairs
    return pairs


def _match_sr(config: EvaluateConfig, pairs: list[dict]) -> None:
    from xpsr_core.io import images as image_io

    if not Path(config.sr_dir).is_dir():
        raise UserError(f"SR folder {config.sr_dir} does not exist or is not a folder.")
    by_stem = {str(p.relative_to(config.sr_dir).with_suffix("")): p for p in image_io.find_images(config.sr_dir)}
    for pair in pairs:
        if "error" in pair:
            continue
        path = by_stem.get(pair["key"]) or by_stem.get(str(Path(pair["name"]).with_suffix("")))
        if path is None:
            pair["error"] = f"no SR image for {pair['key']} in {config.sr_dir}"
        else:
            pair["sr"] = image_io.load_image(path, image_io.DEFAULT_MAX_PIXELS).pixels


# ---------------------------------------------------------------------------- scoring


def _finite(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def aggregate(rows: list[dict], runs, fid_value: Optional[dict], config: EvaluateConfig, crop: int) -> dict:
    from xpsr_core.metrics import SPECS

    ok = [r for r in rows if r["status"] == "ok"]
    summary: dict = {"images": len(ok), "failed": len(rows) - len(ok), "scale": config.scale, "crop_border": crop}
    details: dict = {}

    def mean(name):
        values = [r[name] for r in ok if r.get(name) is not None]
        return float(np.mean(values)) if values else None

    for name, higher in (("psnr_y", True), ("ssim_y", True)):
        value = mean(name)
        infinite = sum(1 for r in ok if r.get(name) is None and r.get(f"{name}_inf"))
        details[name] = {"computed": value is not None, "value": value, "higher_is_better": higher}
        if infinite:
            details[name]["identical_images_excluded"] = infinite
        if value is not None:
            summary[name] = value
    for run in runs:
        spec = SPECS[run.name]
        if run.name == "fid":
            entry = fid_value or {"computed": False, "reason": run.reason}
        elif run.computed:
            value = mean(run.name)
            entry = {"computed": value is not None, "value": value} if value is not None else {"computed": False, "reason": "no image was scored"}
        else:
            entry = {"computed": False, "reason": run.reason}
        entry["higher_is_better"] = spec.higher_is_better
        details[run.name] = entry
        if entry.get("computed"):
            summary[run.name] = entry["value"]
    summary["not_computed"] = {k: v["reason"] for k, v in details.items() if not v.get("computed") and "reason" in v}
    summary["metrics"] = details
    return summary


def run(config: EvaluateConfig) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq
    from PIL import Image

    from stages.common import console, progress_bar
    from xpsr_core.infer.grid import make_grid, stack_rows
    from xpsr_core.infer.pipeline import to_tensor, to_uint8, upsample
    from xpsr_core.io.atomic import atomic_path, atomic_write_json
    from xpsr_core.io.outputs import prepare_output_dir
    from xpsr_core.metrics import SPECS, prepare_metrics, psnr_y, ssim_y
    from xpsr_core.metrics.optional import FULL_REFERENCE

    started = time.perf_counter()
    unknown = [m for m in config.metrics if m not in DEFAULT_WEIGHTS]
    if unknown:
        raise UserError(f"Unknown metrics {unknown}; choose from {', '.join(DEFAULT_WEIGHTS)}.")
    pairs = load_pairs(config)
    if not pairs:
        raise UserError("No LR/HR pairs to evaluate.")
    if config.sr_dir is None:
        check_model_paths(config)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    crop = config.scale if config.crop_border is None else config.crop_border
    runs = prepare_metrics(config.metrics, config.metric_weights, "cpu" if not config.device.startswith("cuda") else config.device)

    for pair in pairs:
        if "error" not in pair:
            lr, hr = pair["lr"], pair["hr"]
            if (hr.shape[0], hr.shape[1]) != (lr.shape[0] * config.scale, lr.shape[1] * config.scale):
                pair["error"] = f"HR is {hr.shape[1]}x{hr.shape[0]}, not {config.scale} x the LR's {lr.shape[1]}x{lr.shape[0]}"
    rows: list[dict] = []
    grid_rows = []
    sr_folder = out / "sr"
    with progress_bar() as progress:
        if config.sr_dir is not None:
            _match_sr(config, pairs)
            pipe = None
        else:
            todo = [p for p in pairs if "error" not in p]
            for pair in todo:
                pair["image"] = Image.fromarray(pair["lr"])
            if todo:
                caption_images(config, todo, progress)
            pipe = load_pipeline(config) if any("error" not in p for p in pairs) else None
        task = progress.add_task("evaluate", total=len(pairs), rate="")
        steps = progress.add_task("steps", total=1, rate="") if pipe is not None else None
        # generator_scope=run: one generator for every pair, in key order (the authors' test script)
        generator = pipe.make_generator() if pipe is not None and config.generator_scope == "run" else None
        for index, pair in enumerate(pairs):
            row = {"key": pair["key"], "name": pair["name"], "content_caption": pair.get("content"),
                   "quality_caption": pair.get("quality"), "seconds": None, "status": "ok", "error": ""}
            if "error" not in pair and pipe is not None:
                progress.update(steps, completed=0, description=f"steps {pair['name']}")
                draw = {"generator": generator} if generator is not None else {"seed": config.image_seed(pair["key"])}
                result = pipe.upscale(pair["lr"], pair["content"], pair["quality"], **draw,
                                      step_callback=lambda done, total: progress.update(steps, total=total, completed=done))
                pair["sr"] = result.image
                row["seconds"] = round(result.seconds, 3)
            if "error" in pair:
                row.update(status="error", error=pair["error"])
            else:
                sr, hr = pair["sr"], pair["hr"]
                if sr.shape != hr.shape:
                    row.update(status="error", error=f"SR shape {sr.shape} differs from HR shape {hr.shape}")
                else:
                    psnr = psnr_y(sr, hr, crop)
                    row["psnr_y"] = _finite(psnr)
                    row["psnr_y_inf"] = not math.isfinite(psnr)
                    row["ssim_y"] = ssim_y(sr, hr, crop)
                    for metric in runs:
                        if metric.computed and metric.name != "fid":
                            full_reference = SPECS[metric.name].kind == FULL_REFERENCE
                            row[metric.name] = float(metric.metric(sr, hr) if full_reference else metric.metric(sr))
                    if config.save_sr or any(m.computed and m.name == "fid" for m in runs):
                        target = sr_folder / f"{pair['key']}.png"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_path(target) as tmp:
                            Image.fromarray(sr).save(tmp, format="PNG")
                    if len(grid_rows) < config.grid_images:
                        lr_up = to_uint8(upsample(to_tensor(pair["lr"]), config.scale))
                        grid_rows.append(make_grid(lr_up, sr, hr))
            rows.append(row)
            progress.update(task, advance=1)

    fid_value = None
    fid_run = next((r for r in runs if r.name == "fid" and r.computed), None)
    if fid_run is not None:
        hr_folder = out / "hr"
        hr_folder.mkdir(exist_ok=True)
        for pair in pairs:
            if "hr" in pair and "sr" in pair:
                Image.fromarray(pair["hr"]).save(hr_folder / f"{pair['key']}.png")
        try:
            fid_value = {"computed": True, "value": fid_run.metric.folders(sr_folder, hr_folder)}
        except Exception as error:
            fid_value = {"computed": False, "reason": f"FID failed: {type(error).__name__}: {error}"}

    columns = ["key", "name", "psnr_y", "ssim_y"] + [r.name for r in runs if r.computed and r.name != "fid"]
    columns += ["content_caption", "quality_caption", "seconds", "status", "error"]
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    with atomic_path(out / "per_image.parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out / "per_image.csv") as tmp:  # the numeric columns, for `dvc plots`
        pa_csv.write_csv(table.select([c for c in columns if c not in ("content_caption", "quality_caption", "error")]), tmp)
    summary = aggregate(rows, runs, fid_value, config, crop)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    # metrics.json holds numbers only (what `dvc metrics show` tabulates); which metrics were
    # not computed, and why, goes beside it
    details = {k: summary[k] for k in ("metrics", "not_computed")}
    atomic_write_json(out / "metrics.json", {k: v for k, v in summary.items() if k not in details})
    atomic_write_json(out / "metric_details.json", details)
    if grid_rows:
        with atomic_path(out / "grid.png") as tmp:
            stack_rows(grid_rows).save(tmp, format="PNG")
    shown = ", ".join(f"{k}={summary[k]:.4f}" for k in ("psnr_y", "ssim_y") if summary.get(k) is not None)
    console.print(f"[bold green]evaluate[/] done: {summary['images']} pairs scored, {summary['failed']} failed; {shown}")
    for name, reason in summary["not_computed"].items():
        console.print(f"  {name}: not computed ({reason})")
    if summary["images"] == 0:
        raise UserError("No pair could be evaluated: " + "; ".join(r["error"] for r in rows[:3]))
    return {"stage": STAGE, "out": str(out), **summary}
