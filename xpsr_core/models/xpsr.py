"""The trainable XPSR model around a frozen SD-1.5 UNet: what training and inference call.

``XPSRModel`` holds

* ``unet``: the diffusers ``UNet2DConditionModel`` (frozen, weights untouched),
* ``controlnet``: :class:`XPSRControlNet` (trainable; SFA inside),
* ``conditional_attention``: :class:`XPSRConditionalAttention` (trainable; may be None),
* ``dfc_heads``: :class:`DFCHeads` (trainable, training only; may be None).

Trainable parts save as ``controlnet/``, ``conditional_attention/``, ``dfc_heads/`` (each a
diffusers ``save_pretrained`` folder with its config) plus ``xpsr.json``; see
:meth:`XPSRModel.save_trainable` / :meth:`XPSRModel.from_base` (``trainable=DIR``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..io.atomic import atomic_folder, share_per_umask
from ..io.model_files import loading_model
from .controlnet import XPSRControlNet
from .dfc import DFC_WEIGHT, DFCHeads, DFCLoss
from .loading import BaseSD, channels_last_on_cpu, load_base_sd
from .settings import XPSRSettings
from .unet import XPSRConditionalAttention, xpsr_unet_forward

TRAINABLE_FILE = "xpsr.json"
PARTS = ("controlnet", "conditional_attention", "dfc_heads")


def write_trainable_record(folder: Path, settings: XPSRSettings) -> Path:
    """``xpsr.json`` of a folder of trained parts (its settings and the part folders it holds); the folder's files
    get the umask's modes (safetensors writes 0600)."""
    values = asdict(settings)
    values["conditioning_embedding_out_channels"] = list(values["conditioning_embedding_out_channels"])
    meta = {"settings": values, "parts": [p for p in PARTS if (folder / p).is_dir()]}
    (folder / TRAINABLE_FILE).write_text(json.dumps(meta, indent=2))
    share_per_umask(folder)
    return folder


def check_trainable_folder(folder: Path) -> XPSRSettings:
    """The settings of an XPSR folder (``save_trainable`` layout), after checking them and that its parts are there."""
    meta_file = Path(folder) / TRAINABLE_FILE
    if not meta_file.is_file():
        raise UserError(
            f"{folder} is not an XPSR checkpoint folder: {TRAINABLE_FILE} is missing. Point at a folder written "
            "by XPSRModel.save_trainable (a training checkpoint's 'xpsr' folder)."
        )
    try:
        meta = json.loads(meta_file.read_text())
        settings = XPSRSettings.from_dict(meta.get("settings", {}))
        parts = {"controlnet", *meta.get("parts", ())} - {"dfc_heads"}  # the DFC heads are optional at inference
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{meta_file} is not a valid XPSR settings file ({error}).") from None
    for part in sorted(parts):
        if not (Path(folder) / part).is_dir():
            raise UserError(f"The XPSR folder {folder} has no {part}/ folder (its {TRAINABLE_FILE} needs one); "
                            "point at a complete folder written by XPSRModel.save_trainable.")
    return settings


def dfc_heads_for(controlnet: XPSRControlNet, settings: XPSRSettings, latent_channels: int) -> Optional[DFCHeads]:
    """Fresh DFC heads for ``controlnet`` as ``settings`` ask (None when both DFC switches are off)."""
    if not (settings.dfc_pixel or settings.dfc_latent):
        return None
    return DFCHeads.from_controlnet(controlnet, latent_channels=latent_channels, use_pixel=settings.dfc_pixel,
                                    use_latent=settings.dfc_latent, latent_source=settings.dfc_latent_heads,
                                    target_resize=settings.dfc_target_resize)


def controlnet_options(settings: XPSRSettings) -> dict:
    """The :class:`XPSRControlNet` constructor options ``settings`` choose (``config_from_unet`` adds the shapes)."""
    return dict(sfa_mode=settings.sfa_mode, fusion_heads=settings.fusion_heads, fusion_type=settings.fusion,
                conditioning_embedding_out_channels=settings.conditioning_embedding_out_channels)


def conditional_attention_options(settings: XPSRSettings) -> dict:
    """The :class:`XPSRConditionalAttention` options ``settings`` choose (``config_from_unet`` adds the shapes)."""
    return dict(layer_type=settings.conditional_attention_type, init=settings.init)


@dataclass
class XPSROutput:
    sample: torch.Tensor  # noise prediction
    dfc: Optional[DFCLoss] = None
    residuals: Optional[tuple] = field(default=None, repr=False)


class XPSRModel(nn.Module):
    def __init__(
        self,
        unet,
        controlnet: XPSRControlNet,
        conditional_attention: Optional[XPSRConditionalAttention] = None,
        dfc_heads: Optional[DFCHeads] = None,
        settings: Optional[XPSRSettings] = None,
    ):
        super().__init__()
        for part in (unet, controlnet, conditional_attention, dfc_heads):
            if part is not None:
                channels_last_on_cpu(part)
        self.unet = unet
        self.unet.requires_grad_(False)
        self.controlnet = controlnet
        self.conditional_attention = conditional_attention
        self.dfc_heads = dfc_heads
        self.settings = settings or XPSRSettings(
            sfa_mode=controlnet.config.sfa_mode,
            conditional_attention=conditional_attention is not None,
            dfc_pixel=bool(dfc_heads is not None and len(dfc_heads.pixel_heads)),
            dfc_latent=bool(dfc_heads is not None and len(dfc_heads.latent_heads)),
            conditioning_embedding_out_channels=tuple(controlnet.config.conditioning_embedding_out_channels),
            fusion_heads=controlnet.config.fusion_heads,
            fusion=controlnet.config.fusion_type,
            conditional_attention_type=conditional_attention.config.layer_type
            if conditional_attention is not None
            else "attention",
            dfc_latent_heads=dfc_heads.config.latent_source if dfc_heads is not None else "pyramid",
            dfc_target_resize=dfc_heads.config.target_resize if dfc_heads is not None else "area",
        )

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls, unet, settings: Optional[XPSRSettings] = None, with_dfc: bool = True, latent_channels: Optional[int] = None
    ) -> "XPSRModel":
        """Fresh trainable parts initialised from ``unet`` (step 0 equals plain ControlNet + UNet)."""
        settings = settings or XPSRSettings()
        controlnet = XPSRControlNet.from_unet(unet, init=settings.init, **controlnet_options(settings))
        conditional = None
        if settings.conditional_attention:
            conditional = XPSRConditionalAttention.from_unet(unet, **conditional_attention_options(settings))
        heads = dfc_heads_for(controlnet, settings, latent_channels or unet.config.out_channels) if with_dfc else None
        return cls(unet, controlnet, conditional, heads, settings)

    @staticmethod
    def empty_parts(unet, settings: XPSRSettings, latent_channels: Optional[int] = None) -> dict[str, nn.Module]:
        """The trainable parts for ``unet`` on the meta device (by part name, absent ones left out): shapes
        without weights, to be filled with ``load_state_dict(..., assign=True)``, so no time or memory goes
        into an initialisation that is overwritten."""
        with torch.device("meta"):
            controlnet = XPSRControlNet(**XPSRControlNet.config_from_unet(unet, **controlnet_options(settings)))
            conditional = None
            if settings.conditional_attention:
                conditional = XPSRConditionalAttention(**XPSRConditionalAttention.config_from_unet(
                    unet, **conditional_attention_options(settings)))
            heads_module = dfc_heads_for(controlnet, settings, latent_channels or unet.config.out_channels)
        parts = {"controlnet": controlnet, "conditional_attention": conditional, "dfc_heads": heads_module}
        return {name: part for name, part in parts.items() if part is not None}

    @classmethod
    def from_base(
        cls,
        base: str | Path | BaseSD,
        settings: Optional[XPSRSettings] = None,
        trainable: Optional[str | Path] = None,
        with_dfc: bool = True,
        dtype: Any = None,
        device: Any = "cpu",
    ) -> "XPSRModel":
        """Build (or, with ``trainable=DIR``, load) XPSR on a base SD folder / hub id / loaded base.

        Folders and hub ids go through :func:`load_base_sd`, the one loader for tiny and real models.
        """
        if not isinstance(base, BaseSD):
            base = load_base_sd(base, dtype=dtype, device=device, components=("unet",))
        if trainable is not None:
            return cls.load_trainable(trainable, base.unet, with_dfc=with_dfc, dtype=dtype, device=device)
        model = cls.build(base.unet, settings, with_dfc=with_dfc)
        return model.to(device=device, dtype=dtype or base.unet.dtype)

    # ------------------------------------------------------------------ persistence

    def save_trainable(self, folder: str | Path) -> Path:
        """Write each trainable part with ``save_pretrained`` (safetensors + config) and ``xpsr.json``, the folder
        whole or not at all (filled under a temporary name, then renamed)."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            self.controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
            if self.conditional_attention is not None:
                self.conditional_attention.save_pretrained(tmp / "conditional_attention", safe_serialization=True)
            if self.dfc_heads is not None:
                self.dfc_heads.save_pretrained(tmp / "dfc_heads", safe_serialization=True)
            write_trainable_record(tmp, self.settings)
        return folder

    @classmethod
    def load_trainable(
        cls, folder: str | Path, unet, with_dfc: bool = True, dtype: Any = None, device: Any = "cpu"
    ) -> "XPSRModel":
        folder = Path(folder)
        settings = check_trainable_folder(folder)
        dtype = dtype or unet.dtype

        def load(part: str, model_cls):
            with loading_model(f"the XPSR {part}", folder / part,
                               "Replace it with a complete copy, or point at another checkpoint."):
                return model_cls.from_pretrained(folder / part, torch_dtype=dtype).to(device)

        controlnet = load("controlnet", XPSRControlNet)
        conditional = (
            load("conditional_attention", XPSRConditionalAttention) if settings.conditional_attention else None
        )
        heads = None
        if with_dfc and (folder / "dfc_heads").is_dir():
            heads = load("dfc_heads", DFCHeads)
        if unet.dtype != dtype or unet.device != torch.device(device):
            unet = unet.to(device=device, dtype=dtype)
        return cls(unet, controlnet, conditional, heads, settings)

    # ------------------------------------------------------------------ training helpers

    def trainable_modules(self) -> dict[str, nn.Module]:
        parts = {"controlnet": self.controlnet}
        if self.conditional_attention is not None:
            parts["conditional_attention"] = self.conditional_attention
        if self.dfc_heads is not None:
            parts["dfc_heads"] = self.dfc_heads
        return parts

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.trainable_modules().values():
            yield from module.parameters()

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.unet.parameters()

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()
        self.unet.enable_gradient_checkpointing()
        if self.conditional_attention is not None:
            self.conditional_attention.enable_gradient_checkpointing()

    def train(self, mode: bool = True) -> "XPSRModel":
        super().train(mode)
        self.unet.eval()  # frozen: dropout etc. stay in eval mode
        return self

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        c_h: torch.Tensor,
        c_l: Optional[torch.Tensor],
        condition: torch.Tensor,
        hr_image: Optional[torch.Tensor] = None,
        hr_latent: Optional[torch.Tensor] = None,
        return_dfc: bool = False,
        conditioning_scale: float = 1.0,
        controlnet_c_h: Optional[torch.Tensor] = None,
    ) -> XPSROutput:
        """Noise prediction (and the DFC loss when ``return_dfc``).

        ``condition``: LR upsampled to the HR size, in [0, 1]. ``c_h``/``c_l``: CLIP embeddings of
        the high/low-level captions. ``hr_image`` in [-1, 1] and ``hr_latent`` (scaled) are needed
        only for the DFC. ``controlnet_c_h`` lets classifier-free guidance give the ControlNet a
        different high-level embedding than the UNet (default: the same ``c_h``).
        """
        cn = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=c_h if controlnet_c_h is None else controlnet_c_h,
            controlnet_cond=condition,
            low_level_hidden_states=c_l,
            conditioning_scale=conditioning_scale,
            return_features=return_dfc,
        )
        sample = xpsr_unet_forward(
            self.unet,
            noisy_latents,
            timesteps,
            encoder_hidden_states=c_h,
            down_block_additional_residuals=cn.down_block_res_samples,
            mid_block_additional_residual=cn.mid_block_res_sample,
            conditional_attention=self.conditional_attention,
        )
        dfc = None
        if return_dfc:
            if self.dfc_heads is None:
                raise ValueError("this XPSR model was built without DFC heads")
            dfc = self.dfc_heads.loss(cn.pixel_features, self.dfc_heads.latent_inputs(cn), hr_image, hr_latent)
        return XPSROutput(sample=sample, dfc=dfc)


def training_loss(
    noise_pred: torch.Tensor, target: torch.Tensor, dfc: Optional[DFCLoss], dfc_weight: float = DFC_WEIGHT
):
    """``L = L_eps + dfc_weight * L_DFC`` (eq. 5) and, for logging, its terms as detached scalar tensors on the
    loss's device: reading them on the host waits for the device, so the caller chooses when (``.tolist()`` of
    a ``torch.stack`` of many steps' terms reads them all at once)."""
    diffusion = F.mse_loss(noise_pred.float(), target.float())
    loss = diffusion
    logs = {"loss_eps": diffusion.detach()}
    if dfc is not None:
        loss = loss + dfc_weight * dfc.total
        logs["loss_dfc"] = dfc.total.detach()
        logs.update({f"dfc_{k}": v.detach() for k, v in dfc.terms.items()})
    logs["loss"] = loss.detach()
    return loss, logs
