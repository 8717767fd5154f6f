"""Every knob of XPSR training (flat, so `dvc exp run -S train.max_train_steps=...` reaches it).

The architecture switches are the fields of :class:`~xpsr_core.models.settings.XPSRSettings`, taken from there
(:data:`ModelOptions`) with their types, constraints and descriptions. No torch here: a bad value fails before
any model library loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import ConfigDict, Field, create_model, field_validator

from ..compiling import TRAIN_COMPILE_MODES, compile_cache_field
from ..config import StageConfig, recipe_field, runtime_field
from ..models.settings import XPSRSettings
from ..text_conditioning import NEGATIVE_PROMPT

# not training options: a fresh model takes XPSRSettings' defaults for the conditioning embedding's channels and
# CA_f's heads, a fine-tuned folder keeps its own
FIXED_ARCHITECTURE = ("conditioning_embedding_out_channels", "fusion_heads")

ModelOptions = create_model(
    "ModelOptions", __config__=ConfigDict(extra="forbid"),
    __doc__="The XPSRSettings fields a training run sets (all but FIXED_ARCHITECTURE), flat in its config.",
    **{name: (info.annotation, info) for name, info in XPSRSettings.__pydantic_fields__.items()
       if name not in FIXED_ARCHITECTURE},
)


class TrainConfig(StageConfig, ModelOptions):
    renamed_fields = {"train_dir": "input_dir"}

    input_dir: Path = runtime_field(Path("data/shards/train"), "Training shards from `xpsr embed`.")
    base_model: str = Field("models/tiny/sd15", description="Frozen SD-1.5 folder or hub id.")
    out: Path = runtime_field(Path("models/xpsr"), "Run folder: checkpoints, logs, final export.")
    metrics_file: Optional[Path] = runtime_field(Path("metrics/train.json"), "Final training metrics for DVC.")
    # replaces ModelOptions' init (zero | official): a run may also start from a folder to fine-tune
    init: str = recipe_field(
        "zero",
        description="zero (step 0 = plain ControlNet), official (the authors' initialisation), or a folder "
        "written by `xpsr import-official` or `xpsr train` to fine-tune (its architecture is kept).",
    )
    dfc_weight: float = recipe_field(0.05, ge=0, description="lambda in L = L_eps + lambda * L_DFC.")
    use_high_prompt: bool = recipe_field(True, description="Condition on the content caption (off: the empty prompt).")
    hr_condition_probability: float = recipe_field(
        0.0,
        ge=0,
        le=1,
        description="Share of samples whose condition is the HR image itself (in [0, 1], at the HR size) with the "
        "HR image's quality caption as c_l, drawn per (seed, step, key); the authors train with 0.1. "
        "Needs training shards with hr_quality.npy (`xpsr caption` with caption_hr, then `xpsr embed`).",
    )
    # optimisation
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (the authors': 5e-5 at batch 32 for "
                                 "300k steps; tune it to the run's batch size and length).")
    weight_decay: float = recipe_field(1e-2, ge=0, description="AdamW weight decay.")
    adam_beta1: float = recipe_field(0.9, description="AdamW beta1.")
    adam_beta2: float = recipe_field(0.999, description="AdamW beta2.")
    adam_epsilon: float = recipe_field(1e-8, description="AdamW epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = recipe_field(
        "constant_with_warmup", description="Learning-rate schedule (diffusers' get_scheduler).")
    warmup_steps: int = recipe_field(0, ge=0, description="Learning-rate warm-up steps.")
    max_grad_norm: float = recipe_field(1.0, gt=0, description="Gradients are clipped to this norm.")
    batch_size: int = Field(4, ge=1, description="Per process; the paper's global batch is 32.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches whose gradients make one optimizer step.")
    # runtime: extending a run (then resuming) must not count as a different configuration
    max_train_steps: int = runtime_field(100_000, "Optimizer steps to train for (the paper: 100k).", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Mixed precision of the forward pass "
                                                           "(accelerate); fp16/bf16 on a GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory, "
                                         "slower).")
    compile: Literal[TRAIN_COMPILE_MODES] = runtime_field(
        "none",
        "torch.compile of the model: none (eager), regional (each repeated transformer and resnet block once; compile "
        "time does not grow with depth) or full (the whole XPSR model as one graph). Checkpoints and exports hold "
        "the plain weights either way.",
    )
    compile_cache: Optional[Path] = compile_cache_field()
    seed: int = Field(0, description="Seed of the model initialisation, the data order and every random draw.")
    collective_timeout: int = runtime_field(
        1800,
        "Seconds a rank waits for the others in a collective (gradient all-reduce, barrier) before the run fails: "
        "the backstop for a rank that died or hangs. Longer than a checkpoint save or a validation grid on rank 0.",
        ge=1,
    )
    # data
    resampled: bool = Field(True, description="Resample shards with replacement (else seeded epochs).")
    shuffle_buffer: int = Field(256, ge=1, description="Samples in the streaming shuffle buffer of each dataloader.")
    num_workers: int = Field(0, ge=0, description="Dataloader workers per process (shards >= processes x workers).")
    max_bad_samples: int = runtime_field(
        100,
        "Bad training samples (truncated, undecodable) each dataloader stream logs and skips before the run stops.",
        ge=0,
    )
    online_encoding: bool = recipe_field(
        False, description="Encode captions and HR latents in the loop (the paper code's practice; slower)."
    )
    negative_prompt: str = Field(
        NEGATIVE_PROMPT, description="Replaces the content caption in the validation grids' guidance."
    )
    # checkpoints and logs
    checkpointing_steps: int = runtime_field(500, "Save a resumable checkpoint every N steps.", ge=1)
    checkpoints_total_limit: Optional[int] = runtime_field(3, "Keep only the newest N checkpoints.", ge=1)
    resume: Optional[str] = runtime_field(None, "'latest' or a checkpoint folder to continue from.")
    log_every: int = runtime_field(1, "Log every N steps.", ge=1)
    progress_steps: int = runtime_field(0, "Print a progress line (step, loss, samples/s, ETA) every N steps; 0: every "
                                        "XPSR_PROGRESS_SECONDS seconds (default 30).", ge=0)
    validation_steps: int = runtime_field(0, "Write an LR | SR | HR grid every N steps (0: never).", ge=0)
    validation_samples: int = runtime_field(2, "Samples (the first of the first training shard) in the grid.", ge=1)
    validation_inference_steps: int = runtime_field(20, "Sampling steps of the validation super-resolution.", ge=1)
    tensorboard: bool = runtime_field(True, "Also log to TensorBoard through accelerate.")
    device: Literal["auto", "cpu"] = runtime_field("auto", "auto: GPUs when present; cpu forces the CPU.")
    overwrite: bool = runtime_field(False, "Start over in a run folder made with a different config.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads an unquoted `no` (as tools like `dvc exp run -S` write it back) as False
        return "no" if value is False else value

    def xpsr_settings(self) -> XPSRSettings:
        """The settings of a fresh model (``init`` zero or official): this config's ModelOptions fields."""
        return XPSRSettings(**self.model_dump(include=set(ModelOptions.model_fields)))
