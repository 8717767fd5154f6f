"""What an evaluation compares and how it scores: the methods, the metrics and the metric protocol.

``xpsr evaluate`` takes these fields beside the SR settings (``xpsr_core.infer.config.SRModelConfig``);
no torch here, so a bad method or value fails before any model library loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import recipe_field
from .compare import DEFAULT_METRICS
from .methods import DEFAULT_METHODS, MethodSpec, parse_method


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    methods: list[MethodSpec] = Field(
        default_factory=lambda: list(DEFAULT_METHODS),
        description="A compared method (repeatable): xpsr | bicubic | realesrgan[:WEIGHTS] | folder:DIR | "
        "xpsr-no-high | xpsr-no-low | xpsr-no-prompts | xpsr-no-negative; NAME=KIND names its column.")
    ablations: bool = Field(False, description="Add the inference-time ablations of the first xpsr method.")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate at most this many pairs (in key order).")
    crop_border: Optional[int] = recipe_field(None, ge=0, description="Border cropped before PSNR/SSIM (default: "
                                              "the scale; the authors' protocol: 0).")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS),
                               description="A metric to compute (repeatable; default: all).")
    metric_weights_dir: Optional[Path] = Field(Path("models/metrics"), description="The one folder of metric weights.")
    grid_images: int = Field(4, ge=0, description="Pairs shown in grids/.")

    @field_validator("methods", mode="before")
    @classmethod
    def _parse_method_texts(cls, value: Any) -> Any:
        """A method may be given as its text (``NAME=KIND:PATH``), as on the command line."""
        if isinstance(value, (list, tuple)):
            return [parse_method(item) if isinstance(item, str) else item for item in value]
        return value
