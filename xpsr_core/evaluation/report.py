"""The comparison report: several methods scored on the same pairs, in the layout of the paper's Table 1.

Rows are metrics labelled with the direction that is better (``PSNR ↑``, ``LPIPS ↓``), columns are
methods; per metric the best value is in bold and the second best in italics (the paper colours them red
and blue). Files written into the output folder, each atomically:

* ``table.md``: that table in Markdown, a legend line, and why any cell shows ``n/c`` (not computed);
* ``table.csv``: the same table as plain numbers, with the best and second-best methods named per row;
* ``metrics.json``: ``{method: {metric: mean}}``, finite numbers only (what ``dvc metrics show`` reads);
* ``per_image.parquet`` and ``per_image.csv`` (its numeric columns plus key, method and status).

:func:`comparison_grid` draws LR | method outputs | HR with a zoomed second row, for ``dvc plots show``.
"""

from __future__ import annotations

import csv
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from xpsr_core.errors import UserError
from xpsr_core.infer.grid import as_rgb_image, join_row, stack_rows
from xpsr_core.io.atomic import atomic_path, atomic_write_json

__all__ = [
    "MetricColumn",
    "comparison_grid",
    "format_value",
    "markdown_table",
    "rank_marks",
    "write_report",
]

BEST, SECOND = "best", "second"
NOT_COMPUTED = "n/c"
LEGEND = "Best in **bold**, second best in _italics_ (per metric; equal values share a mark)."
# decimals the paper's tables print; other metrics get 4 significant digits
DECIMALS = {"psnr": 2, "fid": 2, "musiq": 2, "niqe": 2,
            "ssim": 4, "lpips": 4, "dists": 4, "maniqa": 4, "clipiqa": 4, "clipqa": 4}
PER_IMAGE_LEADING = ("key", "method")
PER_IMAGE_CSV_TEXT = ("key", "method", "status")
TABLE_CSV_LEADING = ("metric", "label", "higher_is_better")
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class MetricColumn:
    """One row of the table: ``name`` keys the values (``psnr_y``), ``label`` is shown (``PSNR``)."""

    name: str
    label: str
    higher_is_better: bool

    @property
    def heading(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


def _has_value(value) -> bool:
    """A real number that is not NaN (infinity is a value: PSNR of identical images)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def format_value(metric_name: str, value: Optional[float]) -> str:
    """The value as the paper prints it: decimals by metric (``psnr_y`` counts as ``psnr``); ``n/c`` when absent."""
    if not _has_value(value):
        return NOT_COMPUTED
    value, name = float(value), metric_name.lower()
    decimals = DECIMALS.get(name, DECIMALS.get(name.split("_")[0]))
    if decimals is None:
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        # four significant digits in plain notation (12346 -> 12350, 0.0012345 -> 0.001234)
        value = round(value, 3 - math.floor(math.log10(abs(value))))
        decimals = 3 - math.floor(math.log10(abs(value)))  # again: rounding may carry (999.96 -> 1000)
    return f"{value:.{max(decimals, 0)}f}"


def rank_marks(values_for_metric: Mapping[str, Optional[float]], higher_is_better: bool) -> dict[str, str]:
    """``method -> "best" | "second" | ""`` for one metric.

    Ranks are dense: methods with equal values share a mark, and the next distinct value is second even
    after a tie for best. Methods without a value (None, NaN) are never marked; a single method is best.
    """
    present = {method: float(value) for method, value in values_for_metric.items() if _has_value(value)}
    ordered = sorted(set(present.values()), reverse=higher_is_better)
    marks = {method: "" for method in values_for_metric}
    for method, value in present.items():
        if value == ordered[0]:
            marks[method] = BEST
        elif value == ordered[1]:
            marks[method] = SECOND
    return marks


def _validate(methods: Sequence[str], metrics: Sequence[MetricColumn], values: Mapping[str, Mapping]) -> None:
    if not methods:
        raise UserError("A comparison report needs at least one method.")
    if any(not isinstance(m, str) or not m.strip() for m in methods) or len(set(methods)) != len(methods):
        raise UserError(f"Method names must be distinct, non-empty strings; got {list(methods)}.")
    reserved = sorted(set(methods) & {*TABLE_CSV_LEADING, BEST, SECOND})
    if reserved:
        raise UserError(f"Method names {reserved} clash with table.csv's own columns; rename them.")
    names = [metric.name for metric in metrics]
    if len(set(names)) != len(names):
        raise UserError(f"Metric names must be distinct; got {names}.")
    unknown_methods = sorted(set(values) - set(methods))
    if unknown_methods:
        raise UserError(f"Values given for methods {unknown_methods} that are not among the report's methods "
                        f"{list(methods)}.")
    for method, by_metric in values.items():
        unknown_metrics = sorted(set(by_metric) - set(names))
        if unknown_metrics:
            raise UserError(f"Values for {method} name metrics {unknown_metrics} that are not report columns {names}; "
                            "add a MetricColumn for each or leave them out.")
        for metric, value in by_metric.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise UserError(f"The value of {metric} for {method} is {value!r}; "
                                "give a number or None (not computed).")


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(methods: Sequence[str], metrics: Sequence[MetricColumn],
                   values: Mapping[str, Mapping[str, Optional[float]]], not_computed: Mapping[str, str],
                   title: str = "") -> str:
    """``table.md``'s text: the table, the legend, and a reason for every ``n/c`` cell."""
    _validate(methods, metrics, values)
    lines = [f"# {title}", ""] if title else []
    lines.append("| Metric | " + " | ".join(_markdown_cell(m) for m in methods) + " |")
    lines.append("|:---|" + "---:|" * len(methods))
    missing: dict[str, list[str]] = {}
    for metric in metrics:
        row = {method: values.get(method, {}).get(metric.name) for method in methods}
        marks = rank_marks(row, metric.higher_is_better)
        cells = []
        for method in methods:
            text = format_value(metric.name, row[method])
            if text == NOT_COMPUTED:
                missing.setdefault(metric.name, []).append(method)
            cells.append({BEST: f"**{text}**", SECOND: f"_{text}_"}.get(marks[method], text))
        lines.append(f"| {metric.heading} | " + " | ".join(cells) + " |")
    lines += ["", LEGEND]
    labels = {metric.name: metric.label for metric in metrics}
    reasons = [f"- {labels.get(name, name)}: {' '.join(str(reason).split())}" for name, reason in not_computed.items()]
    reasons += [f"- {labels[name]}: no value for {', '.join(without)}"
                for name, without in missing.items() if name not in not_computed]
    if reasons:
        lines += ["", f"{NOT_COMPUTED}: not computed.", "", *reasons]
    return "\n".join(lines) + "\n"


def _write_table_csv(path: Path, methods: Sequence[str], metrics: Sequence[MetricColumn],
                     values: Mapping[str, Mapping[str, Optional[float]]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TABLE_CSV_LEADING, *methods, BEST, SECOND])
        for metric in metrics:
            row = {method: values.get(method, {}).get(metric.name) for method in methods}
            marks = rank_marks(row, metric.higher_is_better)
            numbers_row = [float(row[m]) if _has_value(row[m]) else "" for m in methods]
            named = [";".join(m for m in methods if marks[m] == mark) for mark in (BEST, SECOND)]
            writer.writerow([metric.name, metric.label, metric.higher_is_better, *numbers_row, *named])


def _per_image_columns(rows: Sequence[Mapping], metrics: Sequence[MetricColumn]) -> list[str]:
    seen = dict.fromkeys(name for row in rows for name in row)
    metric_names = [metric.name for metric in metrics if metric.name in seen]
    rest = [name for name in seen if name not in PER_IMAGE_LEADING and name not in metric_names]
    return [*PER_IMAGE_LEADING, *metric_names, *rest]


def _per_image_table(rows: Sequence[Mapping], metrics: Sequence[MetricColumn]):
    """The per-image rows as an Arrow table, and the columns that ``per_image.csv`` keeps."""
    for index, row in enumerate(rows):
        if "key" not in row or "method" not in row:
            raise UserError(f"Per-image row {index} lacks 'key' or 'method' ({sorted(row)}); every row needs both.")
    if not rows:
        return pa.table({name: pa.array([], pa.string()) for name in PER_IMAGE_LEADING}), list(PER_IMAGE_LEADING)
    columns = _per_image_columns(rows, metrics)
    try:
        table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UserError(f"Per-image values of one column have mixed types ({error}); "
                        "give numbers for metrics.") from error
    metric_names = {metric.name for metric in metrics}
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    csv_columns = [field.name for field in table.schema if field.name in PER_IMAGE_CSV_TEXT
                   or field.name in metric_names or any(test(field.type) for test in numeric)]
    return table, csv_columns


def write_report(out: Path, methods: list[str], metrics: list[MetricColumn],
                 values: dict[str, dict[str, Optional[float]]], per_image: list[dict],
                 not_computed: dict[str, str], title: str = "") -> dict[str, Path]:
    """Write the comparison into ``out`` (created if needed); returns ``{file name: path}`` of what was written.

    ``values`` holds each method's mean per metric (None or a missing entry: not computed), ``per_image``
    one row per (key, method) with metric values and status columns, ``not_computed`` a one-line reason per
    metric that has no value. Non-finite means (PSNR of identical images) stay in the tables but not in
    ``metrics.json``, which holds only JSON numbers.
    """
    text = markdown_table(methods, metrics, values, not_computed, title)
    per_image_table, per_image_csv_columns = _per_image_table(per_image, metrics)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ("table.md", "table.csv", "metrics.json", "per_image.parquet", "per_image.csv")
    paths = {name: out / name for name in names}
    with atomic_path(paths["table.md"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    _write_table_csv(paths["table.csv"], methods, metrics, values)
    finite = {method: {name: float(value) for name, value in values.get(method, {}).items()
                       if _has_value(value) and math.isfinite(value)} for method in methods}
    atomic_write_json(paths["metrics.json"], {method: by_metric for method, by_metric in finite.items() if by_metric})
    with atomic_path(paths["per_image.parquet"]) as tmp:
        pq.write_table(per_image_table, tmp)
    with atomic_path(paths["per_image.csv"]) as tmp:
        pa_csv.write_csv(per_image_table.select(per_image_csv_columns), tmp)
    return paths


def _zoom_box(zoom_box: Optional[Sequence[int]], size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    if zoom_box is None:
        box_width, box_height = max(1, width // 2), max(1, height // 2)
        return (width - box_width) // 2, (height - box_height) // 2, box_width, box_height
    x, y, box_width, box_height = (int(v) for v in zoom_box)
    if box_width < 1 or box_height < 1 or x < 0 or y < 0 or x + box_width > width or y + box_height > height:
        raise UserError(f"zoom_box {tuple(zoom_box)} (x, y, width, height) must lie inside the "
                        f"{width}x{height} HR image.")
    return x, y, box_width, box_height


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with "..." until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def comparison_grid(lr: np.ndarray, outputs: list[tuple[str, np.ndarray]], hr: np.ndarray,
                    zoom_box: Optional[Sequence[int]] = None, label_height: int = 16, gap: int = 4) -> Image.Image:
    """``LR | output 1 | ... | HR`` labelled above, and below the same panels zoomed into ``zoom_box``.

    LR is nearest-upsampled to the HR size; every output must have the HR size. ``zoom_box`` is
    (x, y, width, height) in HR pixels (default: the centre quarter); its crops are enlarged by the largest
    whole factor that fits a panel, nearest-neighbour, and centred under their panels. Images are PIL images,
    uint8 H x W x 3 arrays or float arrays in [0, 1].
    """
    if label_height < 0 or gap < 0:
        raise UserError(f"label_height ({label_height}) and gap ({gap}) must be 0 or positive.")
    hr_image = as_rgb_image(hr)
    size = hr_image.size
    panels = [("LR", as_rgb_image(lr).resize(size, Image.Resampling.NEAREST))]
    for name, pixels in outputs:
        image = as_rgb_image(pixels)
        if image.size != size:
            raise UserError(f"The output of {name} is {image.size[0]}x{image.size[1]}, not the HR size "
                            f"{size[0]}x{size[1]}; every method must upscale to the HR size.")
        panels.append((name, image))
    panels.append(("HR", hr_image))

    top = join_row([image for _, image in panels], gap, BACKGROUND)
    labelled = Image.new("RGB", (top.width, label_height + top.height), BACKGROUND)
    labelled.paste(top, (0, label_height))
    if label_height:
        draw, font = ImageDraw.Draw(labelled), ImageFont.load_default()
        for index, (name, _) in enumerate(panels):
            text = _fit_text(draw, name, font, size[0] - 4)
            _, text_top, _, text_bottom = draw.textbbox((0, 0), text, font=font)
            draw.text((index * (size[0] + gap) + 2, (label_height - (text_bottom - text_top)) // 2 - text_top),
                      text, fill=(0, 0, 0), font=font)

    x, y, box_width, box_height = _zoom_box(zoom_box, size)
    factor = max(1, min(size[0] // box_width, size[1] // box_height))
    zoomed_size = (box_width * factor, box_height * factor)
    zoomed_panels = []
    for _, image in panels:
        zoomed = image.crop((x, y, x + box_width, y + box_height)).resize(zoomed_size, Image.Resampling.NEAREST)
        column = Image.new("RGB", (size[0], zoomed_size[1]), BACKGROUND)
        column.paste(zoomed, ((size[0] - zoomed_size[0]) // 2, 0))
        zoomed_panels.append(column)
    return stack_rows([labelled, join_row(zoomed_panels, gap, BACKGROUND)], gap, BACKGROUND)
