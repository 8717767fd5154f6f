"""Inference: the XPSR pipeline, tiled processing, colour correction and sample grids."""

from ..conditioning import RESIZES, prepare_condition, resize_output
from .color import COLOR_FIXES, adain_color_fix, adain_color_fix_uint8, color_fix, wavelet_color_fix
from .grid import make_grid, stack_rows
from .pipeline import SCHEDULERS, SRResult, SRSettings, XPSRPipeline, make_scheduler, validation_grid
from .presets import PRESETS, preset_settings, preset_values
from .tiling import gaussian_weights, tile_boxes, tile_starts, tiled_apply, weight_map

__all__ = [
    "COLOR_FIXES", "PRESETS", "RESIZES", "SCHEDULERS", "SRResult", "SRSettings", "XPSRPipeline", "adain_color_fix",
    "adain_color_fix_uint8", "color_fix", "gaussian_weights", "make_grid", "make_scheduler", "prepare_condition",
    "preset_settings", "preset_values", "resize_output", "stack_rows", "tile_boxes", "tile_starts", "tiled_apply",
    "validation_grid", "weight_map", "wavelet_color_fix",
]
