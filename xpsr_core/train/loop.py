"""The XPSR training loop on accelerate: one process or many, CPU or GPUs, exact resume.

Frozen SD-1.5 parts run in the mixed-precision dtype; the trainable parts (ControlNet with SFA,
Conditional Attention, DFC heads) stay in float32 under autocast. Checkpoints hold only the
trainable parts, the optimizer, the LR schedule and the step; every per-step random draw
(timesteps, noise, latent samples) comes from a generator seeded by (seed, step, micro-batch,
rank), and the data stream skips what earlier steps consumed, so ``--resume latest`` continues
bit-for-bit where an uninterrupted run would be. The authors' data recipe
(``hr_condition_probability``: the HR image as the condition, with its own quality caption) is
drawn per (seed, step, key) the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..io.atomic import atomic_write_json
from ..seeding import torch_generator
from .data import TrainingStream
from .settings import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.tsv"
STREAM_FILE_PREFIX = "stream.rank"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good state was checkpointed."""


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
        raise UserError(f"{path} is not a training checkpoint ({STATE_FILE} missing). Use --resume latest or a {CHECKPOINT_PREFIX}N folder.")
    return path


def checkpoint_stamp(config: TrainConfig) -> dict:
    """What a checkpoint records of what made it: the output-shaping settings (max_train_steps is a runtime
    field, so extending a run still continues it), their hash, and the code fingerprint of the train stage."""
    from ..fingerprint import stage_fingerprint

    return {"config_hash": config.output_hash(), "settings": config.output_settings(), "fingerprint": stage_fingerprint("train")}


def resume_mismatch(checkpoint: Path, config: TrainConfig) -> str | None:
    """Why ``checkpoint`` cannot be continued under ``config`` and this code, in words; None when it can."""
    from ..fingerprint import describe_changes

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
    from ..models.xpsr import TRAINABLE_FILE

    folder = Path(path)
    for candidate in (folder, folder / "xpsr", folder / "final"):
        if (candidate / TRAINABLE_FILE).is_file():
            return candidate
    raise UserError(f"train.init {path!r} is neither zero, official nor a folder of trained XPSR parts ({TRAINABLE_FILE} "
                    "not found in it, in its xpsr/ or in its final/). Pass a folder written by `xpsr import-official` or `xpsr train`.")


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
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.config = config
        self.run_dir = Path(config.out)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=config.sfa_mode in ("high", "low"))
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            cpu=config.device == "cpu",
            log_with="tensorboard" if config.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            kwargs_handlers=[ddp],
        )
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # accelerate runs fp16 on the CPU without autocast, so fp16 inputs would meet fp32 weights
            raise UserError("fp16 mixed precision needs a GPU. On the CPU use mixed_precision=bf16 (or no).")
        if prepare_run_dir is not None and self.accelerator.is_main_process:
            prepare_run_dir(config)
        self.accelerator.wait_for_everyone()
        self._build()

    # ------------------------------------------------------------------ setup

    def _initial_model(self, unet):
        """Fresh parts (``init`` zero or official), or the trained parts of a folder to fine-tune."""
        from ..models import XPSRModel, XPSRSettings
        from ..models.xpsr import dfc_heads_for

        config = self.config
        if config.init in ("zero", "official"):
            settings = XPSRSettings(
                sfa_mode=config.sfa_mode, conditional_attention=config.conditional_attention, dfc_pixel=config.dfc_pixel,
                dfc_latent=config.dfc_latent, fusion=config.fusion, conditional_attention_type=config.conditional_attention_type,
                dfc_latent_heads=config.dfc_latent_heads, dfc_target_resize=config.dfc_target_resize, init=config.init,
            )
            return XPSRModel.build(unet, settings)
        folder = trainable_folder(config.init)
        model = XPSRModel.load_trainable(folder, unet, with_dfc=True, dtype=unet.dtype, device=unet.device)
        if model.dfc_heads is None:  # a folder saved for inference only: the heads start afresh
            model.dfc_heads = dfc_heads_for(model.controlnet, model.settings, unet.config.out_channels)
        if self.accelerator.is_main_process:
            print(f"Fine-tuning from {folder} (its architecture: {model.settings})", flush=True)
        return model

    def _build(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from ..encoding import encode_prompts
        from ..models import XPSRModel, XPSRSettings, load_base_sd

        config, accelerator = self.config, self.accelerator
        self._check_hr_quality()
        self.weight_dtype = frozen_weight_dtype(config.mixed_precision)
        needs_vae = config.online_encoding or config.validation_steps > 0 or self._needs_vae()
        # the text encoder: captions encoded in the loop, validation, or the empty prompt of the
        # "no high-level prompt" ablation
        needs_text = config.online_encoding or config.validation_steps > 0 or not config.use_high_prompt
        components = ("unet", "scheduler") + (("text_encoder", "tokenizer") if needs_text else ()) + (("vae",) if needs_vae else ())
        base = load_base_sd(config.base_model, dtype=self.weight_dtype, device=accelerator.device, components=components)
        self.base = base
        self.scheduler = base.scheduler
        set_seed(config.seed)  # the new modules' initial weights (DFC heads, projections) are seeded too
        model = self._initial_model(base.unet)
        for module in model.trainable_modules().values():
            module.to(accelerator.device).float()
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.use_dfc = model.dfc_heads is not None and config.dfc_weight > 0
        # fused: one kernel over all parameters instead of a loop of small ops (CPU and CUDA alike)
        self.optimizer = torch.optim.AdamW(
            list(model.trainable_parameters()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, eps=config.adam_epsilon, fused=True,
        )
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.warmup_steps,
                                          num_training_steps=config.max_train_steps)
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        self.empty_prompt = None
        if not config.use_high_prompt:
            self.empty_prompt = encode_prompts(base.text_encoder, base.tokenizer, [""])[0].to(accelerator.device)

    def _needs_vae(self) -> bool:
        first = sorted(Path(self.config.train_dir).glob("*.tar"))[:1]
        if not first:
            return False
        from ..io.shards import read_shard

        return "latent.npy" not in next(read_shard(first[0]), {})

    def _check_hr_quality(self) -> None:
        """With hr_condition_probability > 0 the shards must carry the HR quality captions; refuse before any model loads."""
        if self.config.hr_condition_probability <= 0:
            return
        from ..io.shards import read_shard
        from .data import missing_hr_quality

        for shard in sorted(Path(self.config.train_dir).glob("*.tar"))[:1]:
            sample = next(read_shard(shard), None)
            if sample is None:
                continue
            has = (json.loads(sample["json"]).get("captions", {}).get("hr_quality") is not None if self.config.online_encoding
                   else "hr_quality.npy" in sample)
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
        from safetensors.torch import load_file

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
        from ..encoding import encode_latent_moments, sample_latent

        moments = batch.get("latent_moments")
        if moments is None:  # online: the VAE runs every step
            moments = encode_latent_moments(self.base.vae, hr)
        return sample_latent(moments.to(self.accelerator.device, non_blocking=True), self.base.vae_scaling_factor, generator)

    def _embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.online_encoding:
            from ..encoding import encode_prompts

            content = encode_prompts(self.base.text_encoder, self.base.tokenizer, batch["content_text"])
            quality = encode_prompts(self.base.text_encoder, self.base.tokenizer, batch["quality_text"])
        else:
            content, quality = batch["content"], batch["quality"]
        device = self.accelerator.device
        content, quality = content.to(device, non_blocking=True), quality.to(device, non_blocking=True)
        if not self.config.use_high_prompt:
            content = self.empty_prompt.expand_as(content)
        return content, quality

    def hr_condition_mask(self, batch: dict, step: int) -> torch.Tensor | None:
        """bool [B]: the samples conditioned on their HR image at this step (None when the recipe is off)."""
        from .data import hr_condition_draw

        probability = self.config.hr_condition_probability
        if probability <= 0:
            return None
        return torch.tensor([hr_condition_draw(self.config.seed, step, key, probability) for key in batch["keys"]], dtype=torch.bool)

    def _hr_quality(self, batch: dict) -> torch.Tensor:
        """The HR images' quality-caption embeddings (c_l of the HR-as-condition samples)."""
        if self.config.online_encoding:
            from ..encoding import encode_prompts

            return encode_prompts(self.base.text_encoder, self.base.tokenizer, batch["hr_quality_text"])
        return batch["hr_quality"].to(self.accelerator.device, non_blocking=True)

    def loss(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        from ..models import training_loss
        from .data import images_on_device

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
            quality = torch.where(hr_mask.to(device).view(-1, 1, 1), hr_quality, quality)
        with self.accelerator.autocast():
            output = self.model(noisy.to(self.weight_dtype), timesteps, content.to(self.weight_dtype), quality.to(self.weight_dtype),
                                condition, hr_image=hr, hr_latent=latents, return_dfc=self.use_dfc)
        loss, logs = training_loss(output.sample, target, output.dfc if self.use_dfc else None, self.config.dfc_weight)
        if hr_mask is not None:
            logs["hr_condition_share"] = float(hr_mask.float().mean())
        return loss, logs

    def micro_step(self, batch: dict, step: int, micro: int) -> dict:
        """Loss, divergence check, backward and (at the end of an accumulation) clipping and the
        optimizer update for one micro-batch; returns its logs."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            loss, logs = self.loss(batch, step, micro)
            bad = torch.tensor([0.0 if math.isfinite(logs["loss"]) else 1.0], device=accelerator.device)
            if accelerator.reduce(bad, reduction="sum").item() > 0:
                self._diverged(step, logs)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return logs

    # ------------------------------------------------------------------ the loop

    def save_checkpoint(self, step: int) -> Path:
        path = self.run_dir / f"{CHECKPOINT_PREFIX}{step}"
        self.accelerator.save_state(str(path))
        # where this rank's data stream stands (raw samples pulled, bad ones skipped), for an exact resume
        atomic_write_json(path / f"{STREAM_FILE_PREFIX}{self.accelerator.process_index}.json", getattr(self, "stream_state", {}))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            # written last: the checkpoint is complete; it records the config and code that made it
            atomic_write_json(path / STATE_FILE, {"global_step": step, **checkpoint_stamp(self.config)})
            rotate_checkpoints(self.run_dir, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def train(self, after_step=None) -> dict:
        """Train to ``max_train_steps``; ``after_step(step)``, if given, runs after each optimizer step (a profiler's tick)."""
        config, accelerator = self.config, self.accelerator
        start_step = 0
        checkpoint = resolve_resume(self.run_dir, config.resume)
        if checkpoint is not None:
            mismatch = resume_mismatch(checkpoint, config)
            if mismatch and not config.overwrite:
                raise UserError(f"Cannot resume from {checkpoint}: it was made with {mismatch}. Pass --overwrite to start "
                                "training afresh, or go back to the code and configuration that made it.")
            if mismatch:
                if accelerator.is_main_process:
                    print(f"Not resuming from {checkpoint}: it was made with {mismatch}. --overwrite: training starts "
                          "fresh from step 0.", flush=True)
                    if Path(checkpoint).resolve().parent == self.run_dir.resolve():
                        for old in list_checkpoints(self.run_dir):  # they would mix with the fresh run's
                            shutil.rmtree(old)
                accelerator.wait_for_everyone()
                checkpoint = None
        elif config.resume == "latest" and accelerator.is_main_process:
            print(f"--resume latest: no checkpoint of this configuration and code in {self.run_dir}; training starts "
                  "from step 0.", flush=True)
        self.stream_state: dict = {}
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            start_step = json.loads((checkpoint / STATE_FILE).read_text())["global_step"]
            stream_file = checkpoint / f"{STREAM_FILE_PREFIX}{accelerator.process_index}.json"
            if stream_file.is_file():
                self.stream_state = json.loads(stream_file.read_text())
        shards = sorted(Path(config.train_dir).glob("*.tar"))
        stream = TrainingStream(
            shards, config.batch_size, config.seed, rank=accelerator.process_index, world=accelerator.num_processes,
            shuffle_buffer=config.shuffle_buffer, resampled=config.resampled,
            skip_batches=start_step * config.gradient_accumulation_steps, online_encoding=config.online_encoding,
            hr_quality=config.hr_condition_probability > 0, max_bad_samples=config.max_bad_samples,
            resume_state=self.stream_state,
        )
        stream.check_workers(config.num_workers)
        # pinned batches let the host-to-device copies run asynchronously
        loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers,
                                                  pin_memory=accelerator.device.type == "cuda"))
        if config.tensorboard:
            accelerator.init_trackers("xpsr", config={k: v for k, v in config.resolved().items() if isinstance(v, (int, float, str, bool))})
        log_path = self.run_dir / LOG_FILE
        keys_log = (self.run_dir / "logs" / f"keys.rank{accelerator.process_index}.tsv")
        keys_log.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            keys_log.write_text("")
            if accelerator.is_main_process:
                log_path.write_text("")
        history: list[dict] = []
        samples_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        self.model.train()
        from ..progress import StepReporter

        # plain progress lines on rank 0 (any log): every progress_steps steps, or every XPSR_PROGRESS_SECONDS seconds
        progress = StepReporter(every_steps=config.progress_steps) if accelerator.is_main_process else None
        started = time.perf_counter()
        for step in range(start_step, config.max_train_steps):
            step_start = time.perf_counter()
            logs_sum: dict[str, float] = {}
            for micro in range(config.gradient_accumulation_steps):
                batch = next(loader)
                if "stop" in batch:  # the stream met more bad samples than max_bad_samples
                    raise UserError(batch["stop"])
                stream = batch.pop("stream")
                self.stream_state[str(stream["worker"])] = stream
                with keys_log.open("a") as handle:
                    handle.write(f"{step}\t{micro}\t{','.join(batch['keys'])}\n")
                logs = self.micro_step(batch, step, micro)
                for name, value in logs.items():
                    logs_sum[name] = logs_sum.get(name, 0.0) + value / config.gradient_accumulation_steps
            self.lr_scheduler.step()
            done = step + 1
            seconds = time.perf_counter() - step_start
            row = {"step": done, **logs_sum, "lr": self.lr_scheduler.get_last_lr()[0], "samples_per_s": samples_per_step / seconds}
            history.append(row)
            if done % config.log_every == 0 or done == config.max_train_steps:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=done)
                if accelerator.is_main_process:
                    self._append_log(log_path, row)
            if done % config.checkpointing_steps == 0 or done == config.max_train_steps:
                self.save_checkpoint(done)
            if config.validation_steps and (done % config.validation_steps == 0 or done == config.max_train_steps):
                self.validate(done)
            if accelerator.num_processes > 1:  # the progress line shows the loss over all ranks
                row_loss = accelerator.reduce(torch.tensor([row["loss"]], device=accelerator.device), reduction="mean").item()
            else:
                row_loss = row["loss"]
            if progress is not None and progress.due(done) and done < config.max_train_steps:
                progress.emit(self._progress_line(done, start_step, row_loss, time.perf_counter() - started, samples_per_step))
            if after_step is not None:
                after_step(done)
        total = time.perf_counter() - started
        return self._finish(history, start_step, total)

    def validation_samples(self) -> list[dict]:
        """The first samples of the first training shard, with their captions (fixed across the run)."""
        from ..io.images import decode_png
        from ..io.shards import read_shard

        first = sorted(Path(self.config.train_dir).glob("*.tar"))[0]
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
        import dataclasses

        import numpy as np
        from diffusers import DDPMScheduler

        from ..infer.pipeline import XPSRPipeline, validation_grid

        path = None
        if self.accelerator.is_main_process:
            # a scheduler of its own: sampling sets timesteps that training must not see
            base = dataclasses.replace(self.base, scheduler=DDPMScheduler.from_config(self.scheduler.config))
            pipe = XPSRPipeline.from_model(self._trainable(), base)
            grid = validation_grid(pipe, self.validation_samples(), steps=self.config.validation_inference_steps,
                                   negative_prompt=self.config.negative_prompt)
            path = self.run_dir / "validation" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            if self.config.tensorboard:
                self.accelerator.get_tracker("tensorboard").log_images({"validation": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        self.accelerator.wait_for_everyone()
        return path

    def _progress_line(self, done: int, start_step: int, loss: float, elapsed: float, samples_per_step: int) -> str:
        from ..progress import format_duration

        total = self.config.max_train_steps
        rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
        eta = format_duration((total - done) / rate if rate else None)
        return (f"train: step {done}/{total} ({100.0 * done / total:.0f}%), loss {loss:.4g}, "
                f"{rate * samples_per_step:.3g} samples/s, {rate:.3g} steps/s, ETA {eta}")

    def _append_log(self, path: Path, row: dict) -> None:
        columns = list(row)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a") as handle:
            if new:
                handle.write("\t".join(columns) + "\n")
            handle.write("\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + "\n")

    def _diverged(self, step: int, logs: dict) -> None:
        path = self.save_checkpoint(step)  # parameters are still those after the last good step
        raise TrainingDiverged(
            f"The training loss became {logs['loss']} at step {step + 1} (eps loss {logs.get('loss_eps')}). Training stopped; "
            f"the last good state is saved in {path}. Lower the learning rate, use bf16 instead of fp16, or check the data, "
            "then resume with --resume latest."
        )

    def _finish(self, history: list[dict], start_step: int, seconds: float) -> dict:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        final = self.run_dir / "final"
        if accelerator.is_main_process:
            self._trainable().save_trainable(final, include_dfc=False)
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
        if self.config.tensorboard:
            accelerator.end_training()
        return report


def train(config: TrainConfig, prepare_run_dir=None) -> dict:
    return Trainer(config, prepare_run_dir).train()
