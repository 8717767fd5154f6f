"""The XPSR training loop on accelerate: one process or many, CPU or GPUs, exact resume.

Frozen SD-1.5 parts run in the mixed-precision dtype; the trainable parts (ControlNet with SFA,
Conditional Attention, DFC heads) stay in float32 under autocast. Checkpoints hold only the
trainable parts, the optimizer, the LR schedule and the step; every per-step random draw
(timesteps, noise, latent samples) comes from a generator seeded by (seed, step, micro-batch,
rank), and the data stream skips what earlier steps consumed, so ``--resume latest`` continues
bit-for-bit where an uninterrupted run would be. The authors' data recipe
(``hr_condition_probability``: the HR image as the condition, with its own quality caption) is
drawn per (seed, step, key) the same way.

The step never waits for the device: the losses and the divergence flag stay there as tensors and
come to the host together, in one copy, after every step that logs, checkpoints, validates or ends
the run (``Trainer.read_back_due``). A non-finite loss on any rank sets the flag on the device, and
from then on the device skips every optimizer update, so the weights stay those of the last good
step until the next read-back finds the flag and checkpoints them.

With several ranks, a rank that cannot go on (more bad samples than ``max_bad_samples``, or an error while it
fetched its batch) says so before the next micro-batch: every micro-batch starts with a small all-reduce of one
stop flag per rank, on the host over gloo (it never waits for the GPU), so all ranks stop together, each with
the reason, instead of waiting forever in the gradient all-reduce for the rank that left. A rank that dies
hard or hangs elsewhere is caught by the collective timeout (``collective_timeout``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from ..compiling import CompileClock, compile_training_model, eager, inductor_cache_dir, use_inductor_cache
from ..encoding import encode_latent_moments, encode_prompts, sample_latent
from ..errors import UserError
from ..fingerprint import describe_changes, stage_fingerprint
from ..infer.pipeline import XPSRPipeline, validation_grid
from ..io.atomic import atomic_write_json
from ..io.images import decode_png
from ..io.outputs import claim
from ..io.shards import read_shard
from ..models import xpsr as xpsr_models
from ..models.loading import load_base_sd
from ..models.xpsr import TRAINABLE_FILE, XPSRModel, dfc_heads_for
from ..progress import StepReporter, format_duration
from ..seeding import torch_generator
from ..training_shards import caption_memory, check_embedding_length
from .data import TrainingStream, hr_condition_draw, images_on_device, missing_hr_quality
from .settings import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.tsv"
STREAM_FILE_PREFIX = "stream.rank"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good state was checkpointed."""


class RankStopped(UserError):
    """Another rank stopped the run (its own message says why); this rank stopped with it."""


@dataclass
class StepState:
    """What a checkpoint after ``step`` holds besides the weights and the optimizer: the LR schedule and where each
    data worker stands. The host keeps it for the steps not yet read back, to go back to the last good one."""

    step: int
    scheduler: dict
    stream: dict


@dataclass
class PendingStep:
    """An optimizer step until its read-back: its micro-batches' logs (device tensors until then), the divergence
    flag after it (a device tensor until then, then a bool), its host seconds and learning rate, its state."""

    state: StepState
    micro_logs: list[dict]
    diverged: torch.Tensor | bool
    seconds: float
    lr: float


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"{path} is not a training checkpoint ({STATE_FILE} missing). "
            f"Use --resume latest or a {CHECKPOINT_PREFIX}N folder."
        )
    return path


def checkpoint_stamp(config: TrainConfig) -> dict:
    """What a checkpoint records of what made it: the output-shaping settings (max_train_steps is a runtime
    field, so extending a run still continues it), their hash, and the code fingerprint of the train stage."""
    return {
        "config_hash": config.output_hash(),
        "settings": config.output_settings(),
        "fingerprint": stage_fingerprint("train"),
    }


def resume_mismatch(checkpoint: Path, config: TrainConfig) -> str | None:
    """Why ``checkpoint`` cannot be continued under ``config`` and this code, in words; None when it can."""
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    stamp = checkpoint_stamp(config)
    reasons = []
    if state.get("config_hash") != stamp["config_hash"]:
        old = state.get("settings") or {}
        changed = sorted(k for k in set(old) | set(stamp["settings"]) if old.get(k) != stamp["settings"].get(k))
        reasons.append("a different configuration" + (f" (changed: {', '.join(changed)})" if old and changed else
                                                      " (not recorded)" if not old else ""))
    if (state.get("fingerprint") or {}).get("code") != stamp["fingerprint"]["code"]:
        reasons.append(f"other code (changed: {describe_changes(state.get('fingerprint'), stamp['fingerprint'])})")
    return " and ".join(reasons) or None


def rotate_checkpoints(run_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def trainable_folder(path: str | Path) -> Path:
    """The trained-parts folder (``xpsr.json``) inside what a user passes to ``init``: that folder itself,
    a pipeline folder (``xpsr/``, as ``xpsr import-official`` writes) or a training run (``final/``)."""
    folder = Path(path)
    for candidate in (folder, folder / "xpsr", folder / "final"):
        if (candidate / TRAINABLE_FILE).is_file():
            return candidate
    raise UserError(
        f"train.init {path!r} is neither zero, official nor a folder of trained XPSR parts ({TRAINABLE_FILE} "
        "not found in it, in its xpsr/ or in its final/). "
        "Pass a folder written by `xpsr import-official` or `xpsr train`."
    )


def frozen_weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the frozen SD parts run in under ``mixed_precision`` (no / fp16 / bf16)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def parameter_digest(model) -> str:
    """sha256 over the trainable parameters (to check that ranks hold identical weights)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, config: TrainConfig, prepare_run_dir=None):
        """``prepare_run_dir(config)`` runs on the main process only, before the others go on."""
        self.config = config
        self.config_hash = config.output_hash()
        self.run_dir = Path(config.out)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=config.sfa_mode in ("high", "low"))
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            cpu=config.device == "cpu",
            log_with="tensorboard" if config.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            kwargs_handlers=[ddp, InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout))],
        )
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # accelerate runs fp16 on the CPU without autocast, so fp16 inputs would meet fp32 weights
            raise UserError("fp16 mixed precision needs a GPU. On the CPU use mixed_precision=bf16 (or no).")
        self.stop_group = self._stop_flag_group()
        failure = None
        if prepare_run_dir is not None and self.accelerator.is_main_process:
            try:
                prepare_run_dir(config)
            except Exception as error:  # the other ranks hear of it instead of waiting for rank 0
                failure = error
        self._stop_if_any_rank_failed(failure, "before training: rank {ranks} could not prepare the run folder")
        self._build()

    def _stop_flag_group(self):
        """The process group of the per-micro-batch stop flags: gloo, so that they never wait for a GPU
        (the default group where it is gloo already); None with one process."""
        if self.accelerator.num_processes == 1:
            return None
        if dist.get_backend() == "gloo":
            return dist.group.WORLD
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=self.config.collective_timeout))

    # ------------------------------------------------------------------ setup

    def _initial_model(self, unet):
        """Fresh parts (``init`` zero or official), or the trained parts of a folder to fine-tune."""
        config = self.config
        if config.init in ("zero", "official"):
            return XPSRModel.build(unet, config.xpsr_settings())
        folder = trainable_folder(config.init)
        model = XPSRModel.load_trainable(folder, unet, with_dfc=True, dtype=unet.dtype, device=unet.device)
        # the text conditioning's length is the run's: the attention layers take any number of text tokens
        model.settings = replace(model.settings, max_caption_tokens=config.max_caption_tokens)
        if model.dfc_heads is None:  # a folder saved for inference only: the heads start afresh
            model.dfc_heads = dfc_heads_for(model.controlnet, model.settings, unet.config.out_channels)
        if self.accelerator.is_main_process:
            print(f"Fine-tuning from {folder} (its architecture: {model.settings})", flush=True)
        return model

    def _build(self) -> None:
        config, accelerator = self.config, self.accelerator
        self._check_hr_quality()
        if not config.online_encoding:
            check_embedding_length(config.input_dir, config.max_caption_tokens)
        self.weight_dtype = frozen_weight_dtype(config.mixed_precision)
        needs_vae = config.online_encoding or config.validation_steps > 0 or self._needs_vae()
        # the text encoder: captions encoded in the loop, validation, or the empty prompt of the
        # "no high-level prompt" ablation
        needs_text = config.online_encoding or config.validation_steps > 0 or not config.use_high_prompt
        components = (
            ("unet", "scheduler")
            + (("text_encoder", "tokenizer") if needs_text else ())
            + (("vae",) if needs_vae else ())
        )
        base = load_base_sd(
            config.base_model, dtype=self.weight_dtype, device=accelerator.device, components=components
        )
        self.base = base
        self.scheduler = base.scheduler
        set_seed(config.seed)  # the new modules' initial weights (DFC heads, projections) are seeded too
        model = self._initial_model(base.unet)
        for module in model.trainable_modules().values():
            module.to(accelerator.device).float()
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self._compile(model)
        self.use_dfc = model.dfc_heads is not None and config.dfc_weight > 0
        # fused: one kernel over all parameters instead of a loop of small ops (CPU and CUDA alike)
        self.optimizer = torch.optim.AdamW(
            list(model.trainable_parameters()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, eps=config.adam_epsilon, fused=True,
        )
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.warmup_steps,
                                          num_training_steps=config.max_train_steps)
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        # The divergence flag: 1 once any rank's loss was non-finite, and 1 from then on. The step never reads it;
        # the device skips every optimizer update while it is 1, so the weights and the optimizer stay those after
        # the last good step until the next read-back (at the latest, before any checkpoint) finds it and saves
        # them (``_diverged``). The fused AdamW kernel skips its update, step count included, where ``found_inf``
        # is 1, as it does under a GradScaler; with fp16 the GradScaler sets ``found_inf`` itself, from the
        # gradients, so there ``micro_step`` makes the loss NaN instead.
        self.diverged = torch.zeros((), device=accelerator.device)
        if accelerator.scaler is None:
            self.optimizer.optimizer.found_inf = self.diverged
        accelerator.register_for_checkpointing(self.lr_scheduler)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        self.empty_prompt = None
        if not config.use_high_prompt:
            self.empty_prompt = self.encode_texts([""])[0].to(accelerator.device)
        if accelerator.is_main_process:  # grows linearly with max_caption_tokens

            width = int(base.unet.config.cross_attention_dim)
            print(f"Caption embeddings: {caption_memory(config.max_caption_tokens, width)}", flush=True)

    def _compile(self, model) -> None:
        """``compile``: the model compiled in place (before DDP wraps it), its kernels cached where
        ``compile_cache`` says; the clock counts the compile time of the whole run."""
        self.compile_clock = None
        if self.config.compile == "none":
            return
        use_inductor_cache(inductor_cache_dir(self.config.compile_cache, self.run_dir))
        self.compile_clock = CompileClock()
        compile_training_model(model, self.config.compile)

    def _needs_vae(self) -> bool:
        first = sorted(Path(self.config.input_dir).glob("*.tar"))[:1]
        if not first:
            return False

        return "latent.npy" not in next(read_shard(first[0]), {})

    def _check_hr_quality(self) -> None:
        """With hr_condition_probability > 0 the shards must carry the HR quality captions.

        Refuses before any model loads.
        """
        if self.config.hr_condition_probability <= 0:
            return

        for shard in sorted(Path(self.config.input_dir).glob("*.tar"))[:1]:
            sample = next(read_shard(shard), None)
            if sample is None:
                continue
            has = (
                json.loads(sample["json"]).get("captions", {}).get("hr_quality") is not None
                if self.config.online_encoding
                else "hr_quality.npy" in sample
            )
            if not has:
                raise missing_hr_quality(sample["__key__"])

    def _trainable(self):
        return self.accelerator.unwrap_model(self.model)

    def _save_hook(self, models, weights, output_dir) -> None:
        # only the trainable parts are saved (not the frozen UNet), in from_pretrained layout
        if self.accelerator.is_main_process:
            for model in models:
                self.accelerator.unwrap_model(model).save_trainable(Path(output_dir) / "xpsr")
        weights.clear()

    def _load_hook(self, models, input_dir) -> None:
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            for name, module in model.trainable_modules().items():
                state = load_file(Path(input_dir) / "xpsr" / name / "diffusion_pytorch_model.safetensors")
                module.load_state_dict(state)

    # ------------------------------------------------------------------ one step

    def _generator(self, step: int, micro: int) -> torch.Generator:
        return torch_generator(self.config.seed, "train-step", f"{step}-{micro}-{self.accelerator.process_index}",
                               device=self.accelerator.device)

    def _latents(self, batch: dict, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        moments = batch.get("latent_moments")
        if moments is None:  # online: the VAE runs every step
            moments = encode_latent_moments(self.base.vae, hr)
        return sample_latent(
            moments.to(self.accelerator.device, non_blocking=True), self.base.vae_scaling_factor, generator
        )

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP embeddings [N, max_caption_tokens, D] of ``texts``, as the embed stage stores them."""
        return encode_prompts(self.base.text_encoder, self.base.tokenizer, texts, self.config.max_caption_tokens)

    def _embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.online_encoding:
            content = self.encode_texts(batch["content_text"])
            quality = self.encode_texts(batch["quality_text"])
        else:
            content, quality = batch["content"], batch["quality"]
        device = self.accelerator.device
        content, quality = content.to(device, non_blocking=True), quality.to(device, non_blocking=True)
        if not self.config.use_high_prompt:
            content = self.empty_prompt.expand_as(content)
        return content, quality

    def hr_condition_mask(self, batch: dict, step: int) -> torch.Tensor | None:
        """bool [B]: the samples conditioned on their HR image at this step (None when the recipe is off)."""
        probability = self.config.hr_condition_probability
        if probability <= 0:
            return None
        return torch.tensor(
            [hr_condition_draw(self.config.seed, step, key, probability) for key in batch["keys"]], dtype=torch.bool
        )

    def _hr_quality(self, batch: dict) -> torch.Tensor:
        """The HR images' quality-caption embeddings (c_l of the HR-as-condition samples)."""
        if self.config.online_encoding:
            return self.encode_texts(batch["hr_quality_text"])
        return batch["hr_quality"].to(self.accelerator.device, non_blocking=True)

    def loss(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch and its logs: detached device tensors (the share of HR-conditioned samples,
        drawn on the host, is a float)."""
        device = self.accelerator.device
        generator = self._generator(step, micro)
        hr_mask = self.hr_condition_mask(batch, step)
        condition, hr = images_on_device(batch, device, hr_mask)
        latents = self._latents(batch, hr, generator)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        content, quality = self._embeddings(batch)
        if hr_mask is not None and bool(hr_mask.any()):  # the HR image's quality caption goes with the HR condition
            hr_quality = self._hr_quality(batch).to(quality.dtype)
            quality = torch.where(hr_mask.to(device, non_blocking=True).view(-1, 1, 1), hr_quality, quality)
        with self.accelerator.autocast():
            output = self.model(
                noisy.to(self.weight_dtype),
                timesteps,
                content.to(self.weight_dtype),
                quality.to(self.weight_dtype),
                condition,
                hr_image=hr,
                hr_latent=latents,
                return_dfc=self.use_dfc,
            )
        # looked up when called, so that a replaced xpsr_models.training_loss takes effect
        loss, logs = xpsr_models.training_loss(
            output.sample, target, output.dfc if self.use_dfc else None, self.config.dfc_weight
        )
        if hr_mask is not None:
            logs["hr_condition_share"] = float(hr_mask.float().mean())
        return loss, logs

    def micro_step(self, batch: dict, step: int, micro: int) -> dict:
        """Loss, divergence flag, backward and (at the end of an accumulation) clipping and the optimizer
        update for one micro-batch, all without waiting for the device; returns its logs (see ``loss``)."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            loss, logs = self.loss(batch, step, micro)
            nonfinite = torch.isfinite(loss.detach()).logical_not().float()
            # reduced on the device, so that every rank skips the same updates
            torch.maximum(self.diverged, accelerator.reduce(nonfinite, reduction="max"), out=self.diverged)
            if accelerator.scaler is not None:  # NaN gradients make the GradScaler skip the update (x 1.0: exact)
                loss = loss * torch.where(self.diverged > 0, float("nan"), 1.0)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return logs

    # ------------------------------------------------------------------ the loop

    def read_back_due(self, done: int) -> bool:
        """Whether the losses and the divergence flag come to the host after step ``done``: at every step that logs,
        checkpoints, validates or prints progress at fixed steps, and at the last, so that nothing is written from
        diverged weights. (Progress lines by the clock wait for the next read-back.)"""
        config = self.config
        return (done == config.max_train_steps or done % config.log_every == 0 or done % config.checkpointing_steps == 0
                or any(every and done % every == 0 for every in (config.validation_steps, config.progress_steps)))

    def _step_state(self, step: int) -> StepState:
        return StepState(step, copy.deepcopy(self.lr_scheduler.state_dict()), dict(self.stream_state))

    def _read_back(self, pending: list[PendingStep]) -> float | None:
        """Brings the pending steps' logs and divergence flags to the host in one copy (on a GPU, the one wait for
        the device), in place; with several ranks also returns the last step's loss averaged over them."""
        tensors = [value for entry in pending for logs in entry.micro_logs for value in logs.values()
                   if isinstance(value, torch.Tensor)]
        tensors += [entry.diverged for entry in pending]
        if self.accelerator.num_processes > 1:
            last_loss = torch.stack([logs["loss"] for logs in pending[-1].micro_logs]).mean()
            tensors.append(self.accelerator.reduce(last_loss, reduction="mean"))
        values = iter(torch.stack(tensors).tolist())
        for entry in pending:
            entry.micro_logs = [{name: next(values) if isinstance(value, torch.Tensor) else value
                                 for name, value in logs.items()} for logs in entry.micro_logs]
        for entry in pending:
            entry.diverged = next(values) > 0
        return next(values, None)

    def _settle(self, pending: list[PendingStep], last_good: StepState,
                samples_per_step: int) -> tuple[list[dict], float | None]:
        """Reads the pending steps back and stops at the first diverged one (``_diverged``); else returns their log rows
        and, with several ranks, the last step's loss averaged over them."""
        read_start = time.perf_counter()
        mean_loss = self._read_back(pending)
        for index, entry in enumerate(pending):
            if entry.diverged:
                self._diverged(entry, pending[index - 1].state if index else last_good)
        # the device ran ahead of the host until the read-back waited for it, so each step gets the interval's rate
        seconds = sum(entry.seconds for entry in pending) + time.perf_counter() - read_start
        return [self._row(entry, samples_per_step * len(pending) / seconds) for entry in pending], mean_loss

    def _row(self, entry: PendingStep, samples_per_s: float) -> dict:
        """A step's log row: each term averaged over the micro-batches (host floats, summed in this order)."""
        logs_sum: dict[str, float] = {}
        for logs in entry.micro_logs:
            for name, value in logs.items():
                logs_sum[name] = logs_sum.get(name, 0.0) + value / self.config.gradient_accumulation_steps
        return {"step": entry.state.step, **logs_sum, "lr": entry.lr, "samples_per_s": samples_per_s}

    def save_checkpoint(self, step: int) -> Path:
        path = self.run_dir / f"{CHECKPOINT_PREFIX}{step}"
        if self.accelerator.is_main_process:
            claim(self.run_dir, f"{path.name}/")  # the run folder's own: save_state writes it not atomically
        self.accelerator.save_state(str(path))
        # where this rank's data stream stands (raw samples pulled, bad ones skipped), for an exact resume
        atomic_write_json(
            path / f"{STREAM_FILE_PREFIX}{self.accelerator.process_index}.json", getattr(self, "stream_state", {})
        )
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            # written last: the checkpoint is complete; it records the config and code that made it
            atomic_write_json(path / STATE_FILE, {"global_step": step, **checkpoint_stamp(self.config)})
            rotate_checkpoints(self.run_dir, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def train(self, after_step=None) -> dict:
        """Train to ``max_train_steps``.

        ``after_step(step)``, if given, runs after each optimizer step (a profiler's tick).
        """
        config, accelerator = self.config, self.accelerator
        start_step = self._load_checkpoint(self._resume_checkpoint())
        loader = self._data_loader(start_step)
        if config.tensorboard:
            accelerator.init_trackers(
                "xpsr", config={k: v for k, v in config.resolved().items() if isinstance(v, (int, float, str, bool))}
            )
        log_path, keys_log = self._start_logs(start_step)
        history: list[dict] = []
        samples_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        self.model.train()

        # plain progress lines on rank 0 (any log): every progress_steps steps, or every XPSR_PROGRESS_SECONDS seconds
        progress = StepReporter(every_steps=config.progress_steps) if accelerator.is_main_process else None
        pending: list[PendingStep] = []
        last_good = self._step_state(start_step)
        started = time.perf_counter()
        for step in range(start_step, config.max_train_steps):
            pending.append(self._optimizer_step(loader, step, keys_log))
            done = step + 1
            if self.read_back_due(done):
                rows, mean_loss = self._settle(pending, last_good, samples_per_step)
                last_good = pending[-1].state
                pending.clear()
                history.extend(rows)
                self._log_rows(rows, log_path)
                self._checkpoint_and_validate(done)
                if progress is not None and progress.due(done) and done < config.max_train_steps:
                    # with several ranks, the progress line shows their mean loss
                    row_loss = history[-1]["loss"] if mean_loss is None else mean_loss
                    elapsed = time.perf_counter() - started
                    progress.emit(self._progress_line(done, start_step, row_loss, elapsed, samples_per_step))
            if after_step is not None:
                after_step(done)
        total = time.perf_counter() - started
        return self._finish(history, start_step, total)

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint that ``resume`` names, or None to start from step 0. One made with other code or another
        configuration is refused; with ``overwrite`` it is passed over instead (and the run folder's checkpoints,
        if it is one of them, are deleted)."""
        config, accelerator = self.config, self.accelerator
        checkpoint = resolve_resume(self.run_dir, config.resume)
        if checkpoint is None:
            if config.resume == "latest" and accelerator.is_main_process:
                print(f"--resume latest: no checkpoint of this configuration and code in {self.run_dir}; training "
                      "starts from step 0.", flush=True)
            return None
        mismatch = resume_mismatch(checkpoint, config)
        if not mismatch:
            return checkpoint
        if not config.overwrite:
            raise UserError(
                f"Cannot resume from {checkpoint}: it was made with {mismatch}. Pass --overwrite to start "
                "training afresh, or go back to the code and configuration that made it."
            )
        if accelerator.is_main_process:
            print(f"Not resuming from {checkpoint}: it was made with {mismatch}. --overwrite: training starts "
                  "fresh from step 0.", flush=True)
            if Path(checkpoint).resolve().parent == self.run_dir.resolve():
                for old in list_checkpoints(self.run_dir):  # they would mix with the fresh run's
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return None

    def _load_checkpoint(self, checkpoint: Path | None) -> int:
        """Restores the weights, the optimizer, the LR schedule and this rank's data stream from ``checkpoint``;
        returns the step it was saved after (0 without a checkpoint: a fresh start)."""
        self.stream_state: dict = {}
        if checkpoint is None:
            return 0
        accelerator = self.accelerator
        accelerator.load_state(str(checkpoint))
        start_step = json.loads((checkpoint / STATE_FILE).read_text())["global_step"]
        stream_file = checkpoint / f"{STREAM_FILE_PREFIX}{accelerator.process_index}.json"
        if stream_file.is_file():
            self.stream_state = json.loads(stream_file.read_text())
        return start_step

    def _data_loader(self, start_step: int):
        """This rank's batches, from where the steps before ``start_step`` left the stream."""
        config, accelerator = self.config, self.accelerator
        shards = sorted(Path(config.input_dir).glob("*.tar"))
        stream = TrainingStream(
            shards, config.batch_size, config.seed, rank=accelerator.process_index, world=accelerator.num_processes,
            shuffle_buffer=config.shuffle_buffer, resampled=config.resampled,
            skip_batches=start_step * config.gradient_accumulation_steps, online_encoding=config.online_encoding,
            hr_quality=config.hr_condition_probability > 0, max_bad_samples=config.max_bad_samples,
            resume_state=self.stream_state,
        )
        stream.check_workers(config.num_workers)
        # pinned batches let the host-to-device copies run asynchronously
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers,
                                                pin_memory=accelerator.device.type == "cuda"))

    def _start_logs(self, start_step: int) -> tuple[Path, Path]:
        """The log file and this rank's record of the sample keys of every micro-batch; a fresh run empties both."""
        log_path = self.run_dir / LOG_FILE
        keys_log = (self.run_dir / "logs" / f"keys.rank{self.accelerator.process_index}.tsv")
        keys_log.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            keys_log.write_text("")
            if self.accelerator.is_main_process:
                log_path.write_text("")
        return log_path, keys_log

    def _optimizer_step(self, loader, step: int, keys_log: Path) -> PendingStep:
        """One optimizer step over its micro-batches and the LR schedule's step, without waiting for the device."""
        step_start = time.perf_counter()
        micro_logs = []
        for micro in range(self.config.gradient_accumulation_steps):
            batch = self._next_batch(loader, step, micro, keys_log)
            micro_logs.append(self.micro_step(batch, step, micro))
        self.lr_scheduler.step()
        return PendingStep(self._step_state(step + 1), micro_logs, self.diverged.clone(),
                           time.perf_counter() - step_start, self.lr_scheduler.get_last_lr()[0])

    def _next_batch(self, loader, step: int, micro: int, keys_log: Path) -> dict:
        """The next batch, once every rank has one; notes where its data worker stands (for checkpoints) and its
        sample keys."""
        try:
            batch = next(loader)
            failure = UserError(batch["stop"]) if "stop" in batch else None  # more bad samples than max_bad_samples
        except Exception as error:  # told to the other ranks before raised here
            failure = error
        self._stop_if_any_rank_failed(failure, f"at step {step + 1}: rank {{ranks}} could not go on (too many bad "
                                               "samples, or an error while reading its data)")
        stream = batch.pop("stream")
        self.stream_state[str(stream["worker"])] = stream
        with keys_log.open("a") as handle:
            handle.write(f"{step}\t{micro}\t{','.join(batch['keys'])}\n")
        return batch

    def _stop_if_any_rank_failed(self, failure: Exception | None, what: str) -> None:
        """Raises ``failure`` on its rank and RankStopped on the others when any rank has one (an all-reduce of
        one flag per rank, on the host; every rank calls it at the same point); returns when none has. ``what``
        says where, with ``{ranks}`` for the ranks that failed."""
        if self.stop_group is None:
            if failure is not None:
                raise failure
            return

        flags = torch.zeros(self.accelerator.num_processes, dtype=torch.int32)
        flags[self.accelerator.process_index] = failure is not None
        dist.all_reduce(flags, group=self.stop_group)
        if failure is not None:
            raise failure
        stopped = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if stopped:
            where = what.format(ranks=", ".join(map(str, stopped)))
            raise RankStopped(f"Training stopped {where}; every rank stops with it. See that rank's message for why.")

    def _log_rows(self, rows: list[dict], log_path: Path) -> None:
        """Logs the rows of the logging steps (every ``log_every``-th and the last) to the trackers and the log file."""
        config = self.config
        for row in rows:
            if row["step"] % config.log_every == 0 or row["step"] == config.max_train_steps:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
                if self.accelerator.is_main_process:
                    self._append_log(log_path, row)

    def _checkpoint_and_validate(self, done: int) -> None:
        """After step ``done`` (read back, so not diverged): the checkpoint and the validation grid when due."""
        config = self.config
        if done % config.checkpointing_steps == 0 or done == config.max_train_steps:
            self.save_checkpoint(done)
        if config.validation_steps and (done % config.validation_steps == 0 or done == config.max_train_steps):
            self.validate(done)

    def validation_samples(self) -> list[dict]:
        """The first samples of the first training shard, with their captions (fixed across the run)."""
        first = sorted(Path(self.config.input_dir).glob("*.tar"))[0]
        samples = []
        for sample in read_shard(first):
            captions = json.loads(sample["json"]).get("captions", {})
            samples.append({"lr": decode_png(sample["lr.png"]), "hr": decode_png(sample["hr.png"]),
                            "content": captions.get("content", ""), "quality": captions.get("quality", "")})
            if len(samples) == self.config.validation_samples:
                break
        return samples

    def validate(self, step: int) -> Path | None:
        """Super-resolve the validation samples with the current weights; save and log the grid."""
        path = None
        if self.accelerator.is_main_process:
            with eager():  # compiled blocks run eagerly: the sampling shapes would only add graphs
                grid = self._validation_grid()
            path = self.run_dir / "validation" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            if self.config.tensorboard:
                self.accelerator.get_tracker("tensorboard").log_images(
                    {"validation": np.asarray(grid)[None]}, step=step, dataformats="NHWC"
                )
        self.accelerator.wait_for_everyone()
        return path

    def _validation_grid(self):
        # a scheduler of its own: sampling sets timesteps that training must not see
        base = dataclasses.replace(self.base, scheduler=DDPMScheduler.from_config(self.scheduler.config))
        pipe = XPSRPipeline.from_model(self._trainable(), base)
        return validation_grid(pipe, self.validation_samples(), steps=self.config.validation_inference_steps,
                               negative_prompt=self.config.negative_prompt)

    def _progress_line(self, done: int, start_step: int, loss: float, elapsed: float, samples_per_step: int) -> str:
        total = self.config.max_train_steps
        rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
        eta = format_duration((total - done) / rate if rate else None)
        return (f"train: step {done}/{total} ({100.0 * done / total:.0f}%), loss {loss:.4g}, "
                f"{rate * samples_per_step:.3g} samples/s, {rate:.3g} steps/s, ETA {eta}")

    def _append_log(self, path: Path, row: dict) -> None:
        # the last column says which configuration made the row (a string: dvc plots keeps plotting the others)
        row = {**row, "config_hash": self.config_hash}
        columns = list(row)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a") as handle:
            if new:
                handle.write("\t".join(columns) + "\n")
            handle.write(
                "\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + "\n"
            )

    def _diverged(self, entry: PendingStep, last_good: StepState) -> None:
        """Checkpoints the state after the last good step and stops. The device skipped every update from ``entry``
        on, so the weights and the optimizer are still those after it; the LR schedule and the data stream, which
        the host moved on, go back to it."""
        self.lr_scheduler.load_state_dict(last_good.scheduler)
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        self.stream_state = dict(last_good.stream)
        path = self.save_checkpoint(last_good.step)
        logs = next((logs for logs in entry.micro_logs if not math.isfinite(logs["loss"])), None)
        what = (f"non-finite on another rank at step {entry.state.step}" if logs is None else
                f"{logs['loss']} at step {entry.state.step} (eps loss {logs.get('loss_eps')})")
        raise TrainingDiverged(
            f"The training loss became {what}. Training stopped; the last good state is saved in {path}. Lower the "
            "learning rate, use bf16 instead of fp16, or check the data, then resume with --resume latest."
        )

    def _finish(self, history: list[dict], start_step: int, seconds: float) -> dict:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        final = self.run_dir / "final"
        if accelerator.is_main_process:
            self._trainable().save_trainable(final)  # every trained part, the DFC heads included
        tail = history[-max(1, len(history) // 10):] if history else []
        report = {
            "stage": "train",
            "steps": self.config.max_train_steps,
            "steps_this_run": len(history),
            "resumed_from": start_step,
            "processes": accelerator.num_processes,
            "seconds": round(seconds, 3),
            "samples_per_s": round(sum(r["samples_per_s"] for r in history) / len(history), 3) if history else None,
            "final_loss": round(sum(r["loss"] for r in tail) / len(tail), 6) if tail else None,
            "first_loss": round(history[0]["loss"], 6) if history else None,
            "parameter_digest": parameter_digest(self._trainable()),
            "bad_samples_skipped": sum(int(s["skipped"]) for s in getattr(self, "stream_state", {}).values()),
            "final_export": str(final),
        }
        if self.compile_clock is not None:
            report["compile"] = {"mode": self.config.compile, **self.compile_clock.report()}
            if accelerator.is_main_process:
                print(f"train: torch.compile ({self.config.compile}) took {report['compile']['compile_seconds']:.1f} s "
                      f"({report['compile']['compiled_graphs']} graphs)", flush=True)
        if self.config.tensorboard:
            accelerator.end_training()
        return report


def train(config: TrainConfig, prepare_run_dir=None) -> dict:
    return Trainer(config, prepare_run_dir).train()
