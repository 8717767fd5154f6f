"""XPSR models: ControlNet with Semantic-Fusion Attention, Conditional Attention, DFC heads.

The names load on first use (most import torch and diffusers); ``xpsr_core.models.settings``
(:class:`XPSRSettings`) imports neither.
"""

from .. import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("XPSRControlNet", "XPSRControlNetOutput"), ".controlnet"),
    **dict.fromkeys(("DFC_WEIGHT", "DFCHeads", "DFCLoss"), ".dfc"),
    **dict.fromkeys(("COMPONENTS", "BaseSD", "load_base_sd"), ".loading"),
    **dict.fromkeys(("LOW_LEVEL_KEY", "SFA_MODES", "FusionAttention", "SemanticFusionTransformer",
                     "TokenCrossAttention"), ".sfa"),
    **dict.fromkeys(("XPSRConditionalAttention", "decoder_layout", "xpsr_unet_forward"), ".unet"),
    **dict.fromkeys(("XPSRModel", "XPSROutput", "training_loss"), ".xpsr"),
    "XPSRSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
