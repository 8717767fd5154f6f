"""torch.compile for training and super-resolution: regional or whole-model compilation, the inductor cache, the
time spent compiling.

Regional compilation compiles each repeated block (diffusers' ``BasicTransformerBlock`` and ``ResnetBlock2D``, the
SFA fusion and Conditional Attention layers) in place with ``nn.Module.compile``, as diffusers'
``compile_repeated_blocks`` does: blocks of the same configuration and shapes share one graph, so compile time
follows the number of distinct blocks, not the depth. In-place compilation keeps the module tree, so state dicts
carry no ``_orig_mod.`` keys and checkpoints, exports and resumes see the plain model.

Settings are torch-free (:data:`TRAIN_COMPILE_MODES`, :data:`SR_COMPILE_MODES`, :func:`compile_cache_field`);
torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from .config import runtime_field

TRAIN_COMPILE_MODES = ("none", "regional", "full")
SR_COMPILE_MODES = ("none", "default", "reduce-overhead")
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "TokenCrossAttention", "FusionAttention")
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# one graph per block configuration and shape: an SD-1.5 UNet with its ControlNet has a few dozen
RECOMPILE_LIMIT = 64


def compile_cache_field():
    """The one definition of the inductor cache setting (training and super-resolution share it)."""
    return runtime_field(
        None,
        "Folder of torch.compile's inductor cache (compiled kernels reused by later runs). Default: "
        f"${CACHE_ENV} when set, else $XDG_CACHE_HOME/xpsr/inductor when XDG_CACHE_HOME is set, else "
        ".xpsr-cache/inductor beside the output folder.",
    )


def inductor_cache_dir(setting: Optional[Path], out: Path) -> Path:
    """Where the inductor cache goes: the setting, else $TORCHINDUCTOR_CACHE_DIR, $XDG_CACHE_HOME/xpsr/inductor, or
    ``.xpsr-cache/inductor`` in the output folder's parent."""
    if setting is not None:
        return Path(setting)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "xpsr" / "inductor"
    return Path(out).absolute().parent / ".xpsr-cache" / "inductor"


def use_inductor_cache(folder: Path) -> Path:
    """Points inductor (and the Triton kernels it writes) at ``folder``; call before anything compiles."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(folder)
    return folder


def raise_recompile_limit() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def compile_repeated_blocks(module, **options) -> int:
    """Compiles every repeated block inside ``module`` in place (full graphs); returns how many."""
    raise_recompile_limit()
    count = 0
    for block in module.modules():
        if type(block).__name__ in REPEATED_BLOCKS:
            block.compile(fullgraph=True, **options)
            count += 1
    return count


def compile_training_model(model, mode: str) -> None:
    """Applies ``train.compile`` (none | regional | full) to the XPSR model, in place."""
    if mode == "none":
        return
    if mode not in TRAIN_COMPILE_MODES:
        raise ValueError(f"compile must be one of {TRAIN_COMPILE_MODES}, got {mode!r}")
    if mode == "regional":
        compile_repeated_blocks(model)
    else:
        raise_recompile_limit()
        model.compile(fullgraph=True)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Compiled modules run eagerly inside (nothing new is compiled): validation shapes stay out of the graphs."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


def compile_seconds() -> float:
    """Seconds this process spent in torch.compile so far: dynamo's frame compiles, inductor's forward and backward
    graphs included."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class CompileClock:
    """Compile seconds and graphs since it started, for a report."""

    def __init__(self):
        self.start_seconds = compile_seconds()
        self.start_graphs = compiled_graph_count()

    def report(self) -> dict:
        return {"compile_seconds": round(compile_seconds() - self.start_seconds, 3),
                "compiled_graphs": compiled_graph_count() - self.start_graphs}
