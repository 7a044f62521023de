"""virchow-rt: fast inference for the Virchow pathology foundation models.

Importing the package is cheap and never imports torch: the heavy parts load on first use.
"""

from __future__ import annotations

from typing import Any

from virchow_rt.compare import Comparison, compare
from virchow_rt.errors import (
    BackendError,
    InputError,
    MissingDependency,
    ModelFileError,
    ParityError,
    VirchowError,
    WeightsError,
)
from virchow_rt.registry import VARIANTS, Variant, get_variant

__version__ = "0.1.0"

# name -> module that defines it; loaded on first attribute access (PEP 562)
_LAZY = {
    "Embedder": "virchow_rt.runtime",
    "open_backend": "virchow_rt.runtime",
    "export_model": "virchow_rt.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'virchow_rt' has no attribute {name!r}")


__all__ = [
    "VARIANTS",
    "BackendError",
    "Comparison",
    "Embedder",
    "InputError",
    "MissingDependency",
    "ModelFileError",
    "ParityError",
    "Variant",
    "VirchowError",
    "WeightsError",
    "compare",
    "export_model",
    "get_variant",
    "open_backend",
]
