"""Lazy imports of optional heavy packages, with an error that says how to install them."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from virchow_rt.errors import MissingDependency

# module name -> (what it is called, the pip extra that brings it)
_KNOWN = {
    "torch": ("PyTorch", "export"),
    "timm": ("timm", "export"),
    "onnx": ("ONNX", "export"),
    "safetensors": ("safetensors", "export"),
    "huggingface_hub": ("huggingface_hub", "export"),
    "onnxruntime": ("ONNX Runtime", "all"),
    "openvino": ("OpenVINO", "openvino"),
    "tensorrt": ("TensorRT", "tensorrt"),
    "cuda": ("cuda-python", "cuda"),
    "skimage": ("scikit-image", "tissue"),
    "h5py": ("h5py", "slides"),
    "tifffile": ("tifffile", "slides"),
    "tiffslide": ("tiffslide", "slides"),
    "openslide": ("OpenSlide", "slides"),
    "matplotlib": ("matplotlib", "bench"),
}


def optional_import(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``purpose`` and the pip extra to install.

    >>> trt = optional_import("tensorrt", "to build TensorRT engines")  # doctest: +SKIP
    """
    try:
        imported = importlib.import_module(module)
        _refuse_stub_only(imported)
        return imported
    except ImportError as err:
        top = module.split(".")[0]
        name, extra = _KNOWN.get(top, (top, "all"))
        raise MissingDependency(
            f"{name} is needed {purpose}: pip install 'virchow-rt[{extra}]' ({type(err).__name__}: {err})"
        ) from err


def _refuse_stub_only(imported: ModuleType) -> None:
    # A type-stubs package (tensorrt-stubs) leaves a bare folder that imports as an empty namespace
    # package: treat it as missing rather than fail later on its first attribute.
    spec = imported.__spec__
    if spec is None or spec.origin is not None or not hasattr(imported, "__path__"):
        return
    contents = [entry for folder in imported.__path__ for entry in Path(folder).iterdir()]
    if all(entry.is_file() and entry.suffix in {".pyi", ".typed"} for entry in contents):
        raise ImportError(f"only type stubs of {spec.name!r} are installed, not the package itself")


def is_importable(module: str) -> bool:
    """True when ``module`` imports cleanly (used for capability reports and test skips)."""
    try:
        _refuse_stub_only(importlib.import_module(module))
    except Exception:  # noqa: BLE001 - a broken install counts as absent, whatever it raises
        return False
    return True
