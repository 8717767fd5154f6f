"""xpsr_core: the XPSR library (data formats, degradations, models, training, inference).

The library never imports the CLI or the stage modules; stages compose it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__version__ = "0.1.0"


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """A package's ``__getattr__`` and ``__dir__`` re-exporting ``exports`` (name -> submodule) on first use, so
    importing the package (or a light submodule of it, such as its settings) never imports torch."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list:
        return sorted(exports)

    return __getattr__, __dir__
