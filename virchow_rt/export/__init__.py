"""Export: weights -> PyTorch reference -> fp32 / fp16 ONNX (-> TensorRT), each checked for parity.

This subpackage may import torch, timm and onnx; ``virchow_rt.runtime`` never does. Names load on
first access (PEP 562), so importing a light submodule (``virchow_rt.export.weights``, or the
TensorRT builder on a machine without torch) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule that defines it
_LAZY = {
    "export_model": "pipeline",
    "run_onnx_cpu": "pipeline",
    "build_model": "reference",
    "TorchBackend": "reference",
    "timm_transform": "reference",
    "pool_tokens": "reference",
    "load_weights": "weights",
    "check_state_dict": "weights",
    "guess_variant": "weights",
    "WeightsInfo": "weights",
    "RandomWeightsWarning": "weights",
    "export_onnx": "onnx_export",
    "ExportWrapper": "onnx_export",
    "check_onnx": "onnx_export",
    "PrecisionPlan": "precision",
    "convert_fp16": "precision",
    "verify_precision_plan": "precision",
    "build_engine": "tensorrt_build",
    "ensure_engine": "tensorrt_build",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
