"""Stage evaluate: several methods on the same LR/HR pairs, scored with the paper's metrics, side by side.

Pairs come from pair shards (``xpsr testset`` or ``xpsr degrade``) or from two folders matched by
relative path. Methods: XPSR (with the run's recipe), its inference-time ablations, bicubic,
Real-ESRGAN from local weights, and folders of SR images made elsewhere (``xpsr_core.evaluation``).
Metrics run through the authors' engine (pyiqa, weights from one local folder) beside our own
PSNR/SSIM on Y (``xpsr_core.metrics``).

Outputs in ``out``: ``table.md`` / ``table.csv`` (metrics x methods, Table 1's layout, best and second
best marked), ``metrics.json`` (``{method: {metric: value}}`` for ``dvc metrics show``),
``metric_details.json`` (every metric computed or not, and why), ``per_image.parquet`` / ``.csv``,
``grids/<key>.png`` (LR | each method | HR, with a zoomed crop) and the SR images under ``sr/<method>/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from stages.common import console, progress_bar, progress_task
from xpsr_core.config import runtime_field
from xpsr_core.dist import rank_device
from xpsr_core.errors import UserError
from xpsr_core.evaluation.methods import MethodSpec, ablation_methods, check_unique
from xpsr_core.evaluation.settings import EvaluationSettings
from xpsr_core.infer.config import SRModelConfig, check_model_paths, load_pipeline

STAGE = "evaluate"


class EvaluateConfig(SRModelConfig, EvaluationSettings):
    renamed_fields = {"pairs_dir": "input_dir"}

    input_dir: Optional[Path] = runtime_field(Path("data/shards/val_pairs"), "Pair shards (lr.png / hr.png per key: "
                                              "xpsr testset, xpsr degrade).")
    lr_dir: Optional[Path] = runtime_field(None, "Folder of LR images (with hr_dir, instead of pair shards).")
    hr_dir: Optional[Path] = runtime_field(None, "Folder of HR images matched to lr_dir by relative path.")
    out: Path = runtime_field(Path("metrics/eval"), "Folder for the report, per-image values, grids and SR images.")
    overwrite: bool = runtime_field(False, "Replace outputs made with a different config.")


def _methods(config: EvaluateConfig) -> list[MethodSpec]:
    methods = list(config.methods)
    if config.ablations:
        base = next((m for m in methods if m.kind == "xpsr" and m.ablation == "none"), None)
        if base is None:
            raise UserError("ablations need an xpsr method to ablate; add one to methods.")
        methods += ablation_methods(base.name)
    if not methods:
        raise UserError("No methods to evaluate: list at least one (e.g. --method xpsr --method bicubic).")
    check_unique(methods)
    return methods


def _pairs(config: EvaluateConfig):
    from xpsr_core.evaluation.pairs import check_scale, pairs_from_folders, pairs_from_shards

    if config.lr_dir is not None or config.hr_dir is not None:
        if config.lr_dir is None or config.hr_dir is None:
            raise UserError("Folder evaluation needs both --lr-dir and --hr-dir.")
        pairs = pairs_from_folders(config.lr_dir, config.hr_dir, config.limit)
    else:
        pairs = pairs_from_shards(config.input_dir, config.limit)
    if not pairs:
        raise UserError("No LR/HR pairs to evaluate.")
    check_scale(pairs, config.scale)
    return pairs


def _xpsr_inputs(config: EvaluateConfig, pairs, progress):
    """Caption the usable pairs' LR images, then load the pipeline (the captioner's memory goes first)."""
    from PIL import Image

    from xpsr_core.evaluation.compare import XPSRInputs
    from xpsr_core.infer.inputs import caption_images

    items = [{"key": p.key, "name": p.name, "image": Image.fromarray(p.lr)} for p in pairs if p.error is None]
    caption_images(config, items, progress_task(progress, "captions")[0])
    return XPSRInputs(
        pipe=load_pipeline(config),
        captions={i["key"]: (i["content"], i["quality"]) for i in items if "error" not in i},
        caption_errors={i["key"]: i["error"] for i in items if "error" in i},
        image_seed=config.image_seed,
        generator_scope=config.generator_scope,
    )


def run(config: EvaluateConfig) -> dict:
    from xpsr_core.evaluation.compare import evaluate_methods, write_evaluation
    from xpsr_core.io.images import readable_name
    from xpsr_core.io.outputs import mark_finished, prepare_output_dir
    from xpsr_core.metrics import prepare_metrics

    started = time.perf_counter()
    methods = _methods(config)
    pairs = _pairs(config)
    needs_xpsr = any(m.kind == "xpsr" for m in methods)
    if needs_xpsr:
        check_model_paths(config)
    out = prepare_output_dir(config.out, STAGE, config, overwrite=config.overwrite)
    crop = config.scale if config.crop_border is None else config.crop_border
    device = rank_device(config.device)
    metric_runs = prepare_metrics(config.metrics, config.metric_weights_dir, device, crop_border=crop)

    with progress_bar() as progress:
        usable = any(p.error is None for p in pairs)
        xpsr = _xpsr_inputs(config, pairs, progress) if needs_xpsr and usable else None
        pair_task = progress.add_task("evaluate", total=len(pairs), rate="")
        on_step, reset_steps = progress_task(progress, "steps") if xpsr is not None else (None, None)

        def on_pair(method: str, done: int, total: int) -> None:
            progress.update(pair_task, completed=done, total=total, description=f"evaluate {method}")
            if reset_steps is not None:
                reset_steps(f"steps {method}")

        evaluation = evaluate_methods(pairs, methods, metric_runs, scale=config.scale, out=out, xpsr=xpsr,
                                      device=device, grid_images=config.grid_images, on_pair=on_pair, on_step=on_step)
    title = f"{readable_name(Path(config.lr_dir or config.input_dir).name)}: {len(pairs)} pairs, x{config.scale}"
    report = write_evaluation(out, evaluation, metric_runs, title=title, crop_border=crop)
    report.update(stage=STAGE, out=str(out), seconds=round(time.perf_counter() - started, 3))
    _print_summary(console, report, evaluation)
    if not any(count["images"] for count in report["counts"].values()):
        reasons = [r["error"] for r in evaluation.rows[:3]] or [
            f"{k} not run: {v}" for k, v in evaluation.not_run.items()
        ]
        raise UserError("No pair could be evaluated: " + "; ".join(reasons))
    mark_finished(out)
    return report


def _print_summary(console, report: dict, evaluation) -> None:
    counts = report["counts"]
    console.print(f"[bold green]evaluate[/] done: {len(counts)} methods on {report['pairs']} pairs, "
                  f"{report['seconds']:.1f} s; table: {report['files']['table.md']}")
    for method, count in counts.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in evaluation.means[method].items() if v is not None)
        console.print(f"  {method}: {count['images']} scored, {count['failed']} failed; {shown}")
    for method, reason in evaluation.not_run.items():
        console.print(f"  {method}: not run ({reason})")
    for name, reason in evaluation.not_computed.items():
        console.print(f"  {name}: not computed ({reason})")
