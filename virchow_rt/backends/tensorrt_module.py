"""The TensorRT module (full, lean or dispatch runtime) and a logger that keeps what TensorRT said.

Imported lazily: :func:`import_tensorrt` refuses a bare ``tensorrt-stubs`` install with a
:class:`~virchow_rt.errors.MissingDependency` that says what to install; :class:`LogBook` keeps
TensorRT's messages so that errors can quote them. Shared by the backend and the engine builder.
"""

from __future__ import annotations

import collections
import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

from virchow_rt._deps import optional_import
from virchow_rt.backends.engine_cache import LEAN_MODULES, RUNTIME_MODULES
from virchow_rt.errors import InputError, MissingDependency

if TYPE_CHECKING:
    import tensorrt as trt

#: ILogger.Severity values -> names (TensorRT 10/11)
SEVERITIES = {0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING", 3: "INFO", 4: "VERBOSE"}
_log = logging.getLogger("virchow_rt.tensorrt")


# --- TensorRT module, version and logger -----------------------------------------------------------
def _real(module: ModuleType, name: str, purpose: str) -> ModuleType:
    # tensorrt-stubs installs a bare tensorrt/ folder of .pyi files: it imports as an empty namespace package
    if not hasattr(module, "__version__") or not hasattr(module, "Runtime"):
        raise MissingDependency(
            f"{name} is needed {purpose}, but only its type stubs are installed (an empty package at "
            f"{list(getattr(module, '__path__', []))}): pip install 'virchow-rt[tensorrt]' on a GPU machine"
        )
    return module


def is_real_tensorrt(name: str = "tensorrt") -> bool:
    """True when TensorRT itself (not just tensorrt-stubs) is importable as ``name``."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return False
    return hasattr(module, "__version__") and hasattr(module, "Runtime")


def import_tensorrt(module: str = "auto", purpose: str = "to run TensorRT engines") -> ModuleType:
    """The TensorRT module: "tensorrt", "tensorrt_lean", "tensorrt_dispatch", or "auto" (the first found)."""
    if module == "auto":
        module = next((name for name in RUNTIME_MODULES if is_real_tensorrt(name)), "tensorrt")
    if module not in RUNTIME_MODULES:
        raise InputError(
            f"unknown TensorRT runtime module {module!r}; use one of: auto, {', '.join(RUNTIME_MODULES)}"
        )
    if module in LEAN_MODULES:
        try:
            return _real(importlib.import_module(module), module, purpose)
        except ImportError as err:
            package = module.replace("_", "-")
            raise MissingDependency(
                f"{module} is needed {purpose} without the TensorRT builder: pip install {package} ({err})"
            ) from err
    return _real(optional_import(module, purpose), "TensorRT", purpose)


class LogBook:
    """What TensorRT logged, kept so that errors can quote TensorRT's own words; also sent to ``logging``."""

    def __init__(self, keep: int = 500) -> None:
        self.records: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep)

    def add(self, severity: str, message: str) -> None:
        self.records.append((severity, message))
        level = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING}
        _log.log(level.get(severity, logging.DEBUG), "TensorRT %s: %s", severity, message)

    def clear(self) -> None:
        self.records.clear()

    def errors(self) -> list[str]:
        return [m for s, m in self.records if s in ("INTERNAL_ERROR", "ERROR")]

    def quote(self, limit: int = 5) -> str:
        """The last ``limit`` errors TensorRT logged, as one line."""
        errors = self.errors()[-limit:]
        return "TensorRT said: " + " | ".join(errors) if errors else "TensorRT logged no error"


def make_logger(trt_module: ModuleType, book: LogBook, min_severity: int = 3) -> trt.ILogger:
    """A ``trt.ILogger`` that records messages up to ``min_severity`` (3: INFO) in ``book``."""

    # the base class comes from the module picked at run time (tensorrt or tensorrt_lean), hence Any
    class CapturingLogger(trt_module.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt_module.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= min_severity:
                book.add(SEVERITIES.get(level, str(level)), str(msg))

    logger: trt.ILogger = CapturingLogger()
    return logger
