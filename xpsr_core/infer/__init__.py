"""Inference: the XPSR pipeline, tiled processing, colour correction and sample grids.

The names load on first use (most import torch); ``xpsr_core.infer.settings`` (:class:`SRSettings` and the
scheduler, colour-fix and resize names) and ``xpsr_core.infer.config`` import no torch.
"""

from .. import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("adain_color_fix", "adain_color_fix_uint8", "color_fix", "wavelet_color_fix"), ".color"),
    **dict.fromkeys(("make_grid", "stack_rows"), ".grid"),
    **dict.fromkeys(("SRResult", "XPSRPipeline", "make_scheduler", "validation_grid"), ".pipeline"),
    **dict.fromkeys(("COLOR_FIXES", "RESIZES", "SCHEDULERS", "SRSettings"), ".settings"),
    **dict.fromkeys(("PRESETS", "preset_settings", "preset_values"), ".presets"),
    **dict.fromkeys(("prepare_condition", "resize_output"), "..conditioning"),
    **dict.fromkeys(("gaussian_weights", "tile_boxes", "tile_starts", "tiled_apply", "weight_map"), ".tiling"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
