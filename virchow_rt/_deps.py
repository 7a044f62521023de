"""Lazy imports of optional heavy packages, with an error that says how to install them."""

from __future__ import annotations

import importlib
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
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        name, extra = _KNOWN.get(top, (top, "all"))
        raise MissingDependency(
            f"{name} is needed {purpose}: pip install 'virchow-rt[{extra}]' ({type(err).__name__}: {err})"
        ) from err


def is_importable(module: str) -> bool:
    """True when ``module`` imports cleanly (used for capability reports and test skips)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install counts as absent, whatever it raises
        return False
    return True
