"""XPSR inference: LR image + captions -> SR image.

Sampling (paper section 3.6 / 4.1, DESIGN section 6):

1. The LR image is upsampled (bicubic) by the scale factor; this ``lr_up`` in [0, 1] is the
   ControlNet condition. It is padded (reflect) to a multiple of the VAE factor times the UNet's
   down-sampling factor and cropped back at the end. (:mod:`xpsr_core.conditioning` has the authors' PIL
   chain, with ``process_size``.)
2. Start point: the VAE encodes ``lr_up`` (the posterior mean, scaled by the VAE's scaling
   factor) and the scheduler adds noise for the *first* timestep of its schedule (the authors:
   a posterior sample, then ``add_noise`` once more at ``added_noise_level``). One generator
   makes every draw, in order: posterior sample, start noise, added noise, each step's noise.
3. Each step predicts the noise with classifier-free guidance: the positive branch sees the
   content caption c_h, the negative branch the negative prompt in place of c_h; the quality
   caption c_l is the same in both (or ``negative_quality_prompt`` in the negative branch, as the
   authors do). Both branches run as one batch of two, [negative, positive] (``cfg_batched``).
   The guided noise is ``eps_neg + scale * (eps_pos - eps_neg)`` (diffusers' convention, as in
   the authors' pipeline; the paper's eq. 6 writes the same family with ``scale - 1``).
4. Latents larger than the UNet's native size are processed in overlapping tiles blended with
   Gaussian weights; the VAE encoder/decoder are tiled the same way (:mod:`.tiling`).
5. The decoded image is colour-corrected to ``lr_up`` (AdaIN, wavelet or none), clamped and
   quantised to 8 bits (``adain-official``: quantised first, then the authors' 8-bit AdaIN).

:mod:`.presets` names complete settings: ``default``/``paper`` (the above) and ``official`` (the
authors' test script).

The scheduler is DDPM with 20 steps by default and swappable (ddim, dpm-solver, unipc, euler)
from the base model's scheduler config. :meth:`XPSRPipeline.from_pretrained` loads a folder
written by :meth:`XPSRPipeline.save_pretrained` (an SD folder plus ``xpsr/``) or a base SD folder
plus a trained XPSR folder; :meth:`XPSRPipeline.from_model` wraps models already in memory
(the training stage's validation).
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from pydantic import ValidationError

from ..compiling import CompileClock, raise_recompile_limit
from ..conditioning import prepare_condition, resize_output, to_uint8
from ..encoding import encode_prompts, truncation_notices
from ..errors import UserError
from ..io.pipeline_folder import PIPELINE_FILE, XPSR_SUBFOLDER, write_pipeline_folder
from ..models.loading import load_base_sd
from ..models.xpsr import TRAINABLE_FILE, XPSRModel
from .color import UINT8_COLOR_FIXES, adain_color_fix_uint8, color_fix
from .grid import make_grid, stack_rows
from .settings import SCHEDULERS, SRSettings
from .tiling import tile_boxes, tiled_apply

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class SRResult:
    image: np.ndarray  # H x W x 3 uint8, H = scale * LR height
    lr_up: np.ndarray  # the bicubic-upsampled LR (the condition), uint8
    content_caption: str
    quality_caption: str
    seed: Optional[int]
    settings: dict
    seconds: float
    latent_tiles: int
    info: dict = field(default_factory=dict)


def _dtype(value: Any) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value)]
    except KeyError:
        raise UserError(f"Unknown dtype {value!r}; choose from {', '.join(DTYPES)}.") from None


def make_scheduler(name: str, config) -> Any:
    if name not in SCHEDULERS:
        raise UserError(f"Unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}.")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def _randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device, then moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(device)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _sampling_info(prepared, settings: SRSettings, timesteps: torch.Tensor, lr_up: torch.Tensor,
                   texts: list[str]) -> dict:
    """The ``info`` of an :class:`SRResult`: start timestep, sizes (width, height) and the encoded prompts."""
    height, width = lr_up.shape[-2:]
    return {
        "start_timestep": int(timesteps[0]),
        "lr_size": [
            int(prepared.output_size[1] // settings.scale),
            int(prepared.output_size[0] // settings.scale),
        ],
        "sr_size": [int(prepared.output_size[1]), int(prepared.output_size[0])],
        "condition_size": [int(width), int(height)],
        "prompts": texts,
    }


class XPSRPipeline:
    """The XPSR model, VAE, text encoder, tokenizer and scheduler, with default :class:`SRSettings`."""

    def __init__(
        self,
        model,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        settings: Optional[SRSettings] = None,
        source: Optional[dict] = None,
    ):
        self.model = model
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.base_scheduler_config = scheduler.config
        self.settings = settings or SRSettings()
        self.source = source or {}
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(model.unet.config.down_block_types) - 1)
        self.native_size = int(model.unet.config.sample_size) * self.vae_factor
        self.vae_native_size = int(getattr(vae.config, "sample_size", self.native_size) or self.native_size)
        self._scheduler_cache: dict[str, Any] = {}
        self.compile_clock = None

    def compile(self, mode: str = "default") -> None:
        """Compiles the denoiser (ControlNet + UNet, called once per tile and step with both guidance branches as
        one batch) and the VAE decoder in place, for static shapes: equal tiles share one graph. ``mode``:
        default or reduce-overhead (CUDA graphs). The clock counts the compile time of the images that follow."""
        raise_recompile_limit()
        options = dict(dynamic=False, fullgraph=True, **({} if mode == "default" else {"mode": mode}))
        self.compile_clock = CompileClock()
        self.model.compile(**options)
        self.vae.decoder.compile(**options)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(cls, model, base, settings: Optional[SRSettings] = None) -> "XPSRPipeline":
        """Wrap an in-memory :class:`XPSRModel` and a :class:`BaseSD` (needs vae, text_encoder, tokenizer,
        scheduler)."""
        missing = [n for n in ("vae", "text_encoder", "tokenizer", "scheduler") if getattr(base, n, None) is None]
        if missing:
            raise ValueError(f"the base model lacks {', '.join(missing)}; load it with those components")
        return cls(
            model, base.vae, base.text_encoder, base.tokenizer, base.scheduler, settings, {"base_model": base.source}
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained: Optional[str | Path] = None,
        *,
        base_model: Optional[str | Path] = None,
        xpsr: Optional[str | Path] = None,
        dtype: Any = None,
        device: str = "cpu",
        settings: Optional[SRSettings] = None,
    ) -> "XPSRPipeline":
        """Load a saved pipeline folder, or a base SD folder/hub id plus trained XPSR parts.

        ``xpsr`` may be the folder written by ``XPSRModel.save_trainable`` or a training run
        folder holding one as ``final/``.
        """
        torch_dtype = _dtype(dtype)
        if torch_dtype == torch.float16 and not str(device).startswith("cuda"):
            raise UserError("float16 inference needs a CUDA GPU; use float32 (or bfloat16) on the CPU.")
        saved = {}
        if pretrained is not None:
            folder = Path(pretrained)
            if not (folder / PIPELINE_FILE).is_file():
                raise UserError(
                    f"{folder} is not a saved XPSR pipeline ({PIPELINE_FILE} is missing). Pass the base model and the "
                    "trained XPSR folder separately (--base-model, --xpsr), "
                    "or a folder written by XPSRPipeline.save_pretrained."
                )
            saved = json.loads((folder / PIPELINE_FILE).read_text())
            base_model = folder
            xpsr = folder / saved.get("xpsr", XPSR_SUBFOLDER)
        if base_model is None or xpsr is None:
            raise UserError("Both a base SD model and a trained XPSR folder are needed (or one saved pipeline folder).")
        xpsr = Path(xpsr)
        if not xpsr.exists():
            raise UserError(
                f"The XPSR checkpoint folder {xpsr} does not exist. Point --xpsr at a training run's final/ folder "
                "(or any folder written by XPSRModel.save_trainable)."
            )
        if not (xpsr / TRAINABLE_FILE).is_file() and (xpsr / "final" / TRAINABLE_FILE).is_file():
            xpsr = xpsr / "final"
        if settings is None and saved.get("defaults"):
            recorded = {k: v for k, v in saved["defaults"].items() if k in SRSettings.__dataclass_fields__}
            try:
                settings = SRSettings(**recorded)
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                raise UserError(f"{folder / PIPELINE_FILE} records invalid sampling defaults ({problems}); "
                                "correct them or pass the settings explicitly.") from None
        base = load_base_sd(base_model, dtype=torch_dtype, device=device)
        model = XPSRModel.load_trainable(xpsr, base.unet, with_dfc=False, dtype=torch_dtype, device=device)
        pipe = cls(model, base.vae, base.text_encoder, base.tokenizer, base.scheduler, settings,
                   {"base_model": str(base_model), "xpsr": str(xpsr), "dtype": str(torch_dtype).replace("torch.", "")})
        return pipe

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a self-contained pipeline folder (:func:`~xpsr_core.io.pipeline_folder.write_pipeline_folder`):
        the SD parts (diffusers layout), ``xpsr/`` and ``xpsr_pipeline.json`` with these settings as defaults."""
        components = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                      "scheduler": self._scheduler("ddpm")}
        return write_pipeline_folder(folder, self.model.save_trainable, asdict(self.settings), components=components,
                                     write_unet=lambda unet: self.model.unet.save_pretrained(unet,
                                                                                             safe_serialization=True))

    # ------------------------------------------------------------------ pieces

    @property
    def device(self) -> torch.device:
        return next(self.model.controlnet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.controlnet.parameters()).dtype

    def _scheduler(self, name: str):
        # a fresh object per run: multistep schedulers keep state between steps
        return make_scheduler(name, self.base_scheduler_config)

    @property
    def max_caption_tokens(self) -> int:
        """The text conditioning's length the model was trained with (its settings, recorded in its folder)."""
        return self.model.settings.max_caption_tokens

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, max_caption_tokens, D]: captions and the negative prompts alike, so guidance batches its branches."""
        embeddings = encode_prompts(self.text_encoder, self.tokenizer, texts, self.max_caption_tokens)
        return embeddings.to(self.device, self.dtype)

    def truncation_notices(self, content: str, quality: str, settings: Optional[SRSettings] = None) -> list[str]:
        """A line for each text of one image's sampling that is longer than the model reads (none: all of it)."""
        names = ("content caption", "quality caption", "negative prompt", "negative quality prompt")
        texts = dict(zip(names, self.prompts(content, quality, settings)))
        return truncation_notices(self.tokenizer, texts, self.max_caption_tokens)

    def _vae_tiles(self, settings: SRSettings, decoder: bool = False) -> tuple[int, int]:
        size = (settings.vae_decode_tile_size if decoder else None) or settings.vae_tile_size or self.vae_native_size
        size = max(self.vae_factor, size - size % self.vae_factor)
        overlap = settings.vae_tile_overlap if settings.vae_tile_overlap is not None else size // 4
        overlap -= overlap % self.vae_factor
        return size, overlap

    def _latent_tiles(self, settings: SRSettings) -> tuple[int, int]:
        multiple = self.vae_factor * self.unet_factor
        size = settings.tile_size or self.native_size
        size = max(multiple, size - size % multiple)
        overlap = settings.tile_overlap if settings.tile_overlap is not None else size // 4
        return size // self.vae_factor, overlap // self.vae_factor

    def _latent_tiling(self, settings: SRSettings, height: int, width: int) -> tuple[tuple[int, int], int]:
        """((tile height, tile width), overlap) in latent pixels for a latent of ``height`` x ``width``.

        With ``latent_tile_threshold`` (the authors' rule) a latent whose area is at most the
        threshold's square is sampled in one piece, whatever its aspect ratio.
        """
        tile, overlap = self._latent_tiles(settings)
        if settings.latent_tile_threshold is not None:
            limit = settings.latent_tile_threshold // self.vae_factor
            if height * width <= limit * limit:
                return (height, width), overlap
        return (tile, tile), overlap

    def make_generator(self, settings: Optional[SRSettings] = None, seed: Any = "settings") -> torch.Generator:
        """The generator of every random draw of one image (or, with ``generator_scope="run"``, of a whole run).

        Seeded with ``settings.seed`` (or ``seed``); ``None`` leaves it unseeded (torch's default
        initial seed). It lives on the CPU, or on the model's device with ``generator_device="device"``.
        """
        settings = settings or self.settings
        seed = settings.seed if seed == "settings" else seed
        device = self.device if settings.generator_device == "device" else torch.device("cpu")
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        return generator

    def vae_encode(self, image: torch.Tensor, settings: Optional[SRSettings] = None) -> torch.Tensor:
        """Scaled latent (posterior mean) of ``image`` in [-1, 1]; tiled above the VAE's tile size."""
        settings = settings or self.settings
        tile, overlap = self._vae_tiles(settings)
        scaling = float(self.vae.config.scaling_factor)

        def encode(x, _box):
            return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float() * scaling

        return tiled_apply(image, encode, tile, overlap, scale=1 / self.vae_factor)

    def vae_moments(self, image: torch.Tensor, settings: Optional[SRSettings] = None) -> torch.Tensor:
        """Posterior moments [B, 2C, h, w] (mean, then log-variance; unscaled, float32) of ``image`` in [-1, 1].

        Tiled above the VAE's tile size (the tiles' moments are blended), so one draw of the full
        latent's size samples it however it was encoded.
        """
        settings = settings or self.settings
        tile, overlap = self._vae_tiles(settings)

        def encode(x, _box):
            return self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters.float()

        return tiled_apply(image, encode, tile, overlap, scale=1 / self.vae_factor)

    def start_latents(self, condition: torch.Tensor, scheduler, timesteps: torch.Tensor, generator: torch.Generator,
                      settings: Optional[SRSettings] = None) -> torch.Tensor:
        """The noisy LR latent sampling starts from; every draw comes from ``generator``, in order.

        ``start_latent="mean"``: the posterior mean; ``"sample"``: a posterior sample (the first draw).
        Then noise to ``timesteps[0]`` (a draw) and, with ``added_noise_level``, ``add_noise`` once
        more at that timestep (another draw), as the authors' pipeline does. The steps draw next.
        """
        settings = settings or self.settings
        scaling = float(self.vae.config.scaling_factor)
        if settings.start_latent == "sample":
            posterior = DiagonalGaussianDistribution(self.vae_moments(condition * 2 - 1, settings))
            z_lr = posterior.sample(generator) * scaling
        else:
            z_lr = self.vae_encode(condition * 2 - 1, settings)
        noise = _randn(z_lr.shape, generator, z_lr.device)
        latents = scheduler.add_noise(z_lr, noise, timesteps[:1])
        if settings.added_noise_level is not None:
            level = int(settings.added_noise_level)
            train_steps = int(getattr(scheduler.config, "num_train_timesteps", 1000))
            if level >= train_steps:
                raise UserError(f"added_noise_level {level} is not a training timestep (0 ... {train_steps - 1}).")
            extra = _randn(z_lr.shape, generator, z_lr.device)
            try:
                latents = scheduler.add_noise(latents, extra, torch.tensor([level], device=latents.device))
            except (IndexError, ValueError, RuntimeError) as error:
                raise UserError(f"The {settings.scheduler} scheduler cannot add noise at timestep {level} ({error}); "
                                "use ddpm or ddim with added_noise_level.") from None
        return latents

    def vae_decode(self, latents: torch.Tensor, settings: Optional[SRSettings] = None) -> torch.Tensor:
        """Image in [-1, 1] of scaled ``latents``; tiled above the VAE's tile size."""
        settings = settings or self.settings
        tile, overlap = self._vae_tiles(settings, decoder=True)
        scaling = float(self.vae.config.scaling_factor)

        def decode(z, _box):
            return self.vae.decode((z / scaling).to(self.vae.dtype)).sample.float()

        return tiled_apply(latents, decode, tile // self.vae_factor, overlap // self.vae_factor, scale=self.vae_factor)

    def guided_noise(self, latents, timestep, condition, c_h, c_l, c_neg, settings: Optional[SRSettings] = None,
                     c_l_neg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier-free-guided noise prediction for one latent tile (float32).

        With ``cfg_batched`` both branches run as one batch of two, [negative, positive]; otherwise
        as two passes. ``c_l_neg`` is the negative branch's c_l (default: ``c_l``).
        """
        settings = settings or self.settings
        dtype = self.dtype
        x = latents.to(dtype)
        cond = condition.to(dtype)
        batch = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)

        def run(x_in, t_in, c_unet, c_low, cond_in, c_control=None):
            return self.model(x_in, t_in, c_unet, c_low, cond_in, conditioning_scale=settings.conditioning_scale,
                              controlnet_c_h=c_control).sample.float()

        if settings.guidance_scale <= 1.0 or c_neg is None:
            return run(x, t, c_h, c_l, cond)
        control = None if settings.controlnet_negative else c_h
        c_l_negative = c_l if c_l_neg is None else c_l_neg
        if settings.cfg_batched:
            c_control = None if control is None else torch.cat([c_h, c_h])
            out = run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c_neg, c_h]), torch.cat([c_l_negative, c_l]),
                      torch.cat([cond, cond]), c_control)
            negative, positive = out.chunk(2)
        else:
            positive = run(x, t, c_h, c_l, cond)
            negative = run(x, t, c_neg, c_l_negative, cond, control)
        return negative + settings.guidance_scale * (positive - negative)

    # ------------------------------------------------------------------ sampling

    @torch.inference_mode()
    def upscale(
        self,
        lr,
        content: str = "",
        quality: str = "",
        settings: Optional[SRSettings] = None,
        step_callback: Optional[StepCallback] = None,
        generator: Optional[torch.Generator] = None,
        **overrides,
    ) -> SRResult:
        """Super-resolve one LR image (PIL or uint8 array) with its content (c_h) and quality (c_l) captions.

        ``generator``: draw from this generator (and advance it) instead of a fresh one made from
        the settings' seed, e.g. one generator shared by the images of a run (``generator_scope="run"``).
        Runs the model in eval mode and restores its previous mode afterwards (safe to call from a
        training loop for validation images).
        """
        settings = replace(settings or self.settings, **overrides)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._upscale(lr, content, quality, settings, step_callback, generator)
        finally:
            if was_training:
                self.model.train()

    def prompts(self, content: str, quality: str, settings: Optional[SRSettings] = None) -> list[str]:
        """The texts one image's sampling encodes: c_h, c_l and, with guidance, the negative c_h (and c_l)."""
        settings = settings or self.settings
        c_h = f"{content.lstrip()} {settings.added_prompt}" if settings.added_prompt else content
        texts = [c_h, quality]
        if settings.guidance_scale > 1.0:
            texts.append(settings.negative_prompt)
            if settings.negative_quality_prompt is not None:
                texts.append(settings.negative_quality_prompt)
        return texts

    def _upscale(self, lr, content: str, quality: str, settings: SRSettings, step_callback: Optional[StepCallback],
                 generator: Optional[torch.Generator] = None) -> SRResult:
        started = time.perf_counter()
        device = self.device
        prepared = prepare_condition(
            lr, settings.scale, settings.resize, settings.process_size, self.vae_factor, device
        )
        lr_up = prepared.image.to(device)
        condition = _pad_to(lr_up, settings.pad_multiple or self.vae_factor * self.unet_factor)

        texts = self.prompts(content, quality, settings)
        prompts = self._prompt_embeddings(texts)

        scheduler = self._scheduler(settings.scheduler)
        scheduler.set_timesteps(settings.steps, device=device)
        timesteps = scheduler.timesteps
        if generator is None:
            generator = self.make_generator(settings)

        latents = self.start_latents(condition, scheduler, timesteps, generator, settings)
        latents, n_tiles = self._denoise(latents, condition, scheduler, timesteps, generator, prompts, settings,
                                         step_callback)
        return SRResult(
            image=self._final_image(latents, lr_up, prepared, settings),
            lr_up=prepared.lr_up,
            content_caption=content,
            quality_caption=quality,
            seed=None if settings.seed is None else int(settings.seed),
            settings=asdict(settings),
            seconds=time.perf_counter() - started,
            latent_tiles=n_tiles,
            info=_sampling_info(prepared, settings, timesteps, lr_up, texts),
        )

    def _prompt_embeddings(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], dict]:
        """(c_h, c_l, negative c_h or None, negative c_l as ``{"c_l_neg": ...}`` or ``{}``) of :meth:`prompts`."""
        embeddings = self.encode_text(texts)
        c_h, c_l = embeddings[0:1], embeddings[1:2]
        c_neg = embeddings[2:3] if len(texts) > 2 else None
        negative_extra = {"c_l_neg": embeddings[3:4]} if len(texts) > 3 else {}
        return c_h, c_l, c_neg, negative_extra

    def _denoise(self, latents: torch.Tensor, condition: torch.Tensor, scheduler, timesteps: torch.Tensor,
                 generator: torch.Generator, prompts: tuple, settings: SRSettings,
                 step_callback: Optional[StepCallback]) -> tuple[torch.Tensor, int]:
        """Every scheduler step, the noise predicted tile by tile: (final latents, number of latent tiles)."""
        c_h, c_l, c_neg, negative_extra = prompts
        tile, overlap = self._latent_tiling(settings, latents.shape[-2], latents.shape[-1])
        n_tiles = len(tile_boxes(latents.shape[-2], latents.shape[-1], tile[0], tile[1], overlap))
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        factor = self.vae_factor
        for index, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(latents, t)

            def predict(tile_latents, box, t=t):
                y0, y1, x0, x1 = box
                tile_condition = condition[..., y0 * factor : y1 * factor, x0 * factor : x1 * factor]
                return self.guided_noise(tile_latents, t, tile_condition, c_h, c_l, c_neg, settings, **negative_extra)

            noise_pred = tiled_apply(model_input, predict, tile, overlap, scale=1)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample.float()
            if step_callback is not None:
                step_callback(index + 1, len(timesteps))
        return latents, n_tiles

    def _final_image(self, latents: torch.Tensor, lr_up: torch.Tensor, prepared, settings: SRSettings) -> np.ndarray:
        """The decoded latents cropped to ``lr_up``, colour-corrected, quantised and resized to the output size."""
        height, width = lr_up.shape[-2:]
        decoded = self.vae_decode(latents, settings)[..., :height, :width]
        if settings.color_fix in UINT8_COLOR_FIXES:
            # quantised as the authors' pipeline returns its image, then fixed against the 8-bit condition
            image = adain_color_fix_uint8(to_uint8(decoded / 2 + 0.5), prepared.image_uint8)
        else:
            image = to_uint8(color_fix((decoded + 1) / 2, lr_up, settings.color_fix))
        return resize_output(image, prepared.output_size, settings.resize)

    def __call__(
        self,
        images: Sequence,
        content_captions: Optional[Sequence[str]] = None,
        quality_captions: Optional[Sequence[str]] = None,
        seeds: Optional[Sequence[int]] = None,
        step_callback: Optional[StepCallback] = None,
        **overrides,
    ) -> list[SRResult]:
        """Super-resolve several images (one at a time: their sizes may differ).

        With ``generator_scope="run"`` one generator (from the settings' seed) serves every image in order.
        """
        count = len(images)
        content_captions = list(content_captions or [""] * count)
        quality_captions = list(quality_captions or [""] * count)
        settings = replace(self.settings, **overrides)
        shared = self.make_generator(settings) if settings.generator_scope == "run" and seeds is None else None
        results = []
        for index, image in enumerate(images):
            extra = dict(overrides)
            if seeds is not None:
                extra["seed"] = seeds[index]
            results.append(
                self.upscale(
                    image,
                    content_captions[index],
                    quality_captions[index],
                    step_callback=step_callback,
                    generator=shared,
                    **extra,
                )
            )
        return results


def tiles_for(pipe: XPSRPipeline, height: int, width: int, settings: Optional[SRSettings] = None) -> int:
    """How many latent tiles an output of ``height`` x ``width`` pixels takes."""
    settings = settings or pipe.settings
    multiple = settings.pad_multiple or pipe.vae_factor * pipe.unet_factor
    lh, lw = (
        math.ceil(height / multiple) * multiple // pipe.vae_factor,
        math.ceil(width / multiple) * multiple // pipe.vae_factor,
    )
    tile, overlap = pipe._latent_tiling(settings, lh, lw)
    return len(tile_boxes(lh, lw, tile[0], tile[1], overlap))


def validation_grid(pipe: XPSRPipeline, samples: Sequence[dict], **overrides):
    """A stacked LR-upsampled | SR | HR grid (PIL image) for training validation.

    ``samples``: dicts with ``lr`` (PIL or uint8 array), optional ``hr``, ``content`` and
    ``quality`` captions and ``seed``. ``overrides`` are :class:`SRSettings` fields (e.g. ``steps``).
    """
    rows = []
    for index, sample in enumerate(samples):
        extra = dict(overrides)
        extra.setdefault("seed", sample.get("seed", index))
        result = pipe.upscale(sample["lr"], sample.get("content", ""), sample.get("quality", ""), **extra)
        rows.append(make_grid(result.lr_up, result.image, sample.get("hr")))
    return stack_rows(rows)
