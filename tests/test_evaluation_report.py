"""The comparison report (Table 1 layout: metrics x methods, best bold, second italic) and the comparison grid."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import photo
from xpsr_core.errors import UserError
from xpsr_core.evaluation.report import MetricColumn, comparison_grid, format_value, rank_marks, write_report

METHODS = ["bicubic", "realesrgan", "xpsr"]
METRICS = [
    MetricColumn("psnr_y", "PSNR", True),
    MetricColumn("ssim_y", "SSIM", True),
    MetricColumn("lpips", "LPIPS", False),
    MetricColumn("fid", "FID", False),
]
VALUES = {
    "bicubic": {"psnr_y": 24.4213, "ssim_y": 0.61641, "lpips": 0.5123, "fid": None},
    "realesrgan": {"psnr_y": 24.30, "ssim_y": 0.63244, "lpips": 0.32671},
    "xpsr": {"psnr_y": 22.8, "ssim_y": None, "lpips": 0.32671},
}
PER_IMAGE = [
    {"key": "0000000000", "method": "bicubic", "psnr_y": 24.0, "ssim_y": 0.6, "lpips": 0.5, "status": "ok",
     "error": "", "seconds": 0.01},
    {"key": "0000000000", "method": "xpsr", "lpips": 0.3, "psnr_y": 22.5, "status": "ok", "error": "",
     "seconds": 2.5, "content_caption": "an astronaut"},
    {"key": "0000000001", "method": "xpsr", "psnr_y": None, "status": "error", "error": "HR is 8x8", "seconds": None},
]
NOT_COMPUTED = {"fid": "no Inception weights at models/metrics/fid.pth;\nset metric_weights.fid"}


@pytest.fixture
def report(tmp_path):
    paths = write_report(tmp_path / "report", METHODS, METRICS, VALUES, PER_IMAGE, NOT_COMPUTED, title="DIV2K-Val x4")
    return tmp_path / "report", paths


def parse_markdown_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    header, _separator, *body = rows
    return header, {row[0]: row[1:] for row in body}


@pytest.mark.parametrize("higher_is_better, best, second", [(True, "b", "c"), (False, "a", "c")])
def test_marks_follow_the_direction(higher_is_better, best, second):
    marks = rank_marks({"a": 1.0, "b": 3.0, "c": 2.0}, higher_is_better)
    assert marks[best] == "best" and marks[second] == "second"
    assert list(marks.values()).count("") == 1


def test_marks_ties_missing_values_and_a_single_method():
    assert rank_marks({"a": 2, "b": 2, "c": 1, "d": 0}, True) == {"a": "best", "b": "best", "c": "second", "d": ""}
    assert rank_marks({"a": 3, "b": 2, "c": 2}, True) == {"a": "best", "b": "second", "c": "second"}
    assert rank_marks({"a": None, "b": math.nan, "c": 1.0, "d": 4.0}, False) == {
        "a": "", "b": "", "c": "best", "d": "second"}
    assert rank_marks({"a": 5.0}, True) == {"a": "best"}
    assert rank_marks({"a": 5.0, "b": None}, False) == {"a": "best", "b": ""}
    assert rank_marks({"a": None, "b": None}, True) == {"a": "", "b": ""}
    assert rank_marks({"a": math.inf, "b": 40.0}, True) == {"a": "best", "b": "second"}


def test_values_are_formatted_like_the_paper():
    assert format_value("psnr_y", 24.4213) == "24.42"
    assert format_value("fid", 141.254) == "141.25"
    assert format_value("ssim_y", 0.61641) == "0.6164"
    assert format_value("LPIPS", 0.32671) == "0.3267"
    assert format_value("clipiqa", 0.7) == "0.7000"
    assert format_value("brisque", 12345.678) == "12350"  # four significant digits
    assert format_value("brisque", 0.0012345) == "0.001234"
    assert format_value("brisque", 999.96) == "1000"
    assert format_value("psnr", None) == format_value("psnr", math.nan) == "n/c"


def test_markdown_marks_the_right_cells(report):
    text = report[1]["table.md"].read_text(encoding="utf-8")
    header, rows = parse_markdown_table(text)
    assert text.startswith("# DIV2K-Val x4\n")
    assert header == ["Metric", *METHODS]
    assert list(rows) == ["PSNR ↑", "SSIM ↑", "LPIPS ↓", "FID ↓"]
    assert rows["PSNR ↑"] == ["**24.42**", "_24.30_", "22.80"]
    assert rows["SSIM ↑"] == ["_0.6164_", "**0.6324**", "n/c"]
    assert rows["LPIPS ↓"] == ["_0.5123_", "**0.3267**", "**0.3267**"]  # a tie for best shares the mark
    assert rows["FID ↓"] == ["n/c", "n/c", "n/c"]
    assert "Best in **bold**, second best in _italics_" in text


def test_not_computed_cells_have_reasons(report):
    text = report[1]["table.md"].read_text(encoding="utf-8")
    notes = text.split("n/c: not computed.", 1)[1].strip().splitlines()
    # multi-line reasons become one line; a missing value without a given reason is still explained
    assert notes == ["- FID: no Inception weights at models/metrics/fid.pth; set metric_weights.fid",
                     "- SSIM: no value for xpsr"]


def test_table_csv_holds_plain_numbers(report):
    with open(report[1]["table.csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["metric", "label", "higher_is_better", *METHODS, "best", "second"]
    by_metric = {row["metric"]: row for row in rows}
    assert [row["metric"] for row in rows] == ["psnr_y", "ssim_y", "lpips", "fid"]
    psnr = by_metric["psnr_y"]
    assert (psnr["label"], psnr["higher_is_better"]) == ("PSNR", "True")
    assert [float(psnr[m]) for m in METHODS] == [24.4213, 24.30, 22.8]
    assert (psnr["best"], psnr["second"]) == ("bicubic", "realesrgan")
    assert (by_metric["lpips"]["best"], by_metric["lpips"]["second"]) == ("realesrgan;xpsr", "bicubic")
    assert by_metric["ssim_y"]["xpsr"] == ""
    assert [by_metric["fid"][m] for m in [*METHODS, "best", "second"]] == [""] * 5


def test_metrics_json_holds_numbers_only(report):
    metrics = json.loads(report[1]["metrics.json"].read_text())
    assert metrics == {
        "bicubic": {"psnr_y": 24.4213, "ssim_y": 0.61641, "lpips": 0.5123},
        "realesrgan": {"psnr_y": 24.30, "ssim_y": 0.63244, "lpips": 0.32671},
        "xpsr": {"psnr_y": 22.8, "lpips": 0.32671},
    }


def test_infinite_means_are_tabled_but_kept_out_of_json(tmp_path):
    paths = write_report(tmp_path, ["a", "b"], METRICS[:1], {"a": {"psnr_y": math.inf}, "b": {"psnr_y": 30.0}}, [], {})
    assert parse_markdown_table(paths["table.md"].read_text(encoding="utf-8"))[1]["PSNR ↑"] == ["**inf**", "_30.00_"]
    assert json.loads(paths["metrics.json"].read_text()) == {"b": {"psnr_y": 30.0}}


def test_per_image_files_have_stable_columns(report):
    out, paths = report
    table = pq.read_table(paths["per_image.parquet"])
    assert table.column_names == ["key", "method", "psnr_y", "ssim_y", "lpips", "status", "error", "seconds",
                                  "content_caption"]
    assert table.column("psnr_y").to_pylist() == [24.0, 22.5, None]
    assert table.column("ssim_y").to_pylist() == [0.6, None, None]
    assert table.column("error").to_pylist() == ["", "", "HR is 8x8"]
    with open(paths["per_image.csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["key", "method", "psnr_y", "ssim_y", "lpips", "status", "seconds"]
    assert [(r["key"], r["method"], r["status"]) for r in rows] == [
        ("0000000000", "bicubic", "ok"), ("0000000000", "xpsr", "ok"), ("0000000001", "xpsr", "error")]
    assert float(rows[1]["lpips"]) == 0.3 and rows[2]["psnr_y"] == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(paths)  # no temporaries left behind


def test_bad_report_input_raises_user_errors(tmp_path):
    with pytest.raises(UserError, match="not among the report's methods"):
        write_report(tmp_path, ["a"], METRICS, {"b": {"psnr_y": 1.0}}, [], {})
    with pytest.raises(UserError, match="not report columns"):
        write_report(tmp_path, ["a"], METRICS, {"a": {"psnr": 1.0}}, [], {})
    with pytest.raises(UserError, match="give a number"):
        write_report(tmp_path, ["a"], METRICS, {"a": {"psnr_y": "24.1"}}, [], {})
    with pytest.raises(UserError, match="distinct"):
        write_report(tmp_path, ["a", "a"], METRICS, {}, [], {})
    with pytest.raises(UserError, match="lacks 'key' or 'method'"):
        write_report(tmp_path, ["a"], METRICS, {}, [{"key": "0", "psnr_y": 1.0}], {})
    assert list(tmp_path.iterdir()) == []  # nothing is written before the input is known to be good


@pytest.fixture(scope="module")
def images():
    hr = photo("astronaut", (64, 48))
    lr = np.asarray(Image.fromarray(hr).resize((16, 12), Image.BICUBIC))
    return lr, [("bicubic", np.asarray(Image.fromarray(lr).resize((64, 48), Image.BICUBIC))),
                ("flipped", hr[::-1].copy())], hr


def test_grid_panels_hold_the_images(images):
    lr, outputs, hr = images
    label_height, gap = 16, 4
    grid = np.asarray(comparison_grid(lr, outputs, hr, zoom_box=(8, 4, 16, 12), label_height=label_height, gap=gap))
    # zoom factor min(64 // 16, 48 // 12) = 4: a 64 x 48 zoomed row under a 48-pixel row
    assert grid.shape == (label_height + 48 + gap + 48, 4 * 64 + 3 * gap, 3)
    lr_up = np.asarray(Image.fromarray(lr).resize((64, 48), Image.NEAREST))
    for index, panel in enumerate([lr_up, *(pixels for _, pixels in outputs), hr]):
        left = index * (64 + gap)
        np.testing.assert_array_equal(grid[label_height: label_height + 48, left: left + 64], panel)
        zoomed = grid[label_height + 48 + gap:, left: left + 64]
        np.testing.assert_array_equal(zoomed[:4, :4], np.broadcast_to(panel[4, 8], (4, 4, 3)))
        np.testing.assert_array_equal(zoomed[::4, ::4], panel[4:16, 8:24])
        strip = grid[:label_height, left: left + 64]
        assert strip.min() < 128  # the label's text is drawn on the white strip


def test_grid_default_zoom_is_the_centre_quarter(images):
    lr, outputs, hr = images
    grid = np.asarray(comparison_grid(lr, outputs[:1], hr, label_height=0, gap=0))
    assert grid.shape == (48 + 48, 3 * 64, 3)
    np.testing.assert_array_equal(grid[48::2, 128::2], hr[12:36, 16:48])


def test_grid_rejects_bad_sizes_and_boxes(images):
    lr, outputs, hr = images
    with pytest.raises(UserError, match="not the HR size"):
        comparison_grid(lr, [("small", lr)], hr)
    with pytest.raises(UserError, match="must lie inside"):
        comparison_grid(lr, outputs, hr, zoom_box=(60, 0, 16, 16))
