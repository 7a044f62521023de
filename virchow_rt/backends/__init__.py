"""Backends: one interface (:class:`Backend`) for every way of running an exported model, and the one
factory that opens them (:func:`open_backend`).

Importing this package never imports torch, ONNX Runtime, TensorRT or cuda-python: each backend's module
loads its runtime when the backend is opened. ``torch_reference`` and ``torch_cuda`` import torch and
are imported only when chosen.
"""

from virchow_rt.backends.base import Backend
from virchow_rt.backends.open import BACKENDS, open_backend
from virchow_rt.contract import ModelInfo

__all__ = ["BACKENDS", "Backend", "ModelInfo", "open_backend"]
