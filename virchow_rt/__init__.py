"""virchow-rt: fast inference for the Virchow pathology foundation models.

Importing the package is cheap and never imports torch: the heavy parts load on first use.
"""

from __future__ import annotations

from typing import Any

from virchow_rt._version import __version__ as __version__
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


def __getattr__(name: str) -> Any:
    """``Embedder``, ``open_backend`` and ``export_model`` load on first use (PEP 562): importing the
    package stays cheap, and only ``export_model`` imports torch."""
    if name == "Embedder":
        from virchow_rt.embed import Embedder

        return Embedder
    if name == "open_backend":
        from virchow_rt.backends import open_backend

        return open_backend
    if name == "export_model":
        from virchow_rt.export.pipeline import export_model

        return export_model
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
