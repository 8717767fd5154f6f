"""XPSR models: ControlNet with Semantic-Fusion Attention, Conditional Attention, DFC heads.

Importing this package imports torch and diffusers; keep it out of CLI module level.
"""

from .controlnet import XPSRControlNet, XPSRControlNetOutput
from .dfc import DFC_WEIGHT, DFCHeads, DFCLoss
from .loading import COMPONENTS, BaseSD, load_base_sd
from .sfa import LOW_LEVEL_KEY, SFA_MODES, FusionAttention, SemanticFusionTransformer, TokenCrossAttention
from .unet import XPSRConditionalAttention, decoder_layout, xpsr_unet_forward
from .xpsr import XPSRModel, XPSROutput, XPSRSettings, training_loss

__all__ = [
    "BaseSD",
    "COMPONENTS",
    "DFCHeads",
    "DFCLoss",
    "DFC_WEIGHT",
    "FusionAttention",
    "LOW_LEVEL_KEY",
    "SFA_MODES",
    "SemanticFusionTransformer",
    "TokenCrossAttention",
    "XPSRConditionalAttention",
    "XPSRControlNet",
    "XPSRControlNetOutput",
    "XPSRModel",
    "XPSROutput",
    "XPSRSettings",
    "decoder_layout",
    "load_base_sd",
    "training_loss",
    "xpsr_unet_forward",
]
