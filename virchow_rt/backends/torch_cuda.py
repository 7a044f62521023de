"""The ``torch-cuda`` backend: an export's PyTorch module in fp16, run by the shared CUDA pipeline.

For a GPU server without TensorRT: the same pipelined runtime as TensorRT (pinned host buffers, copy
and compute streams ordered by events, GPU-array input:
:class:`~virchow_rt.backends.cuda.pipeline.PipelinedBackend`), with torch's kernels computing each
batch. The module is timm's backbone in fp16 (or bf16) with SDPA attention (timm's ``fused_attn``:
flash / memory-efficient kernels), uint8 tiles normalised in fp32 inside it and the tokens pooled in
fp32 (:class:`~virchow_rt.export.onnx_export.ExportWrapper`), as the fp16 ONNX precision plan does.

:class:`TorchExecutor` reads the pipeline's uint8 device input buffer and writes its output buffer in
place (torch tensors over the pipeline's memory, through ``__cuda_array_interface__``), queued on
the pipeline's compute stream (``torch.cuda.ExternalStream``): no host copy besides the pipeline's
own. Full batches replay a CUDA graph per slot (``torch.cuda.CUDAGraph`` sharing one memory pool,
which is safe because every graph runs on the one compute stream, never two at once);
``compile=True`` also wraps the module in ``torch.compile``.

Weights: those the export folder was made from (the path or model id its manifest records, checked
against the recorded sha256; or the same seeded random weights), or ``weights=`` given: see
:func:`~virchow_rt.model.vit.load_export_model`.
torch is imported only when this module is: ``open_backend(..., "torch-cuda")`` does so lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.backends.cuda import api as cuda
from virchow_rt.backends.cuda.pipeline import Executor, PipelinedBackend
from virchow_rt.contract import INPUT, OUTPUT, ModelInfo, TensorSpec, WeightsInfo
from virchow_rt.errors import BackendError, InputError
from virchow_rt.model.vit import ExportWrapper, load_export_model
from virchow_rt.registry import Variant

if TYPE_CHECKING:
    import torch
else:
    torch = optional_import("torch", "for the torch-cuda backend")

_log = logging.getLogger("virchow_rt.torch_cuda")
#: precision -> the module's compute dtype
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class _PipelineMemory:
    """Pipeline memory as torch sees it: ``torch.as_tensor`` of this is a view, not a copy."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        # stream None: torch must not synchronize; the pipeline ordered the writes before this stream
        self.__cuda_array_interface__ = {
            "data": (ptr, False), "shape": shape, "typestr": dtype.str, "strides": None, "version": 3,
            "stream": None,
        }  # fmt: skip


class TorchExecutor(Executor):
    """Queues a PyTorch module (uint8 (B, S, S, 3) -> float32 (B, E)) on the pipeline's compute stream."""

    alignment = 1  # torch reads a tensor at any address

    def __init__(self, module: torch.nn.Module, info: ModelInfo, device: int, max_batch: int, graphs: bool):
        self._module = module
        self._device = torch.device("cuda", device)
        self._use_graphs = graphs
        self._graphs: dict[int, tuple[tuple[int, int], torch.cuda.CUDAGraph]] = {}
        self._graphs_failed = False
        self._pool: Any = None
        self.replayed = self.eager = 0  # executor runs so far, from a graph and not
        size, width = info.tile_size, info.embedding_dim
        self.specs = {
            INPUT: TensorSpec(INPUT, True, np.dtype(np.uint8), (-1, size, size, 3)),
            OUTPUT: TensorSpec(OUTPUT, False, np.dtype(np.float32), (-1, width)),
        }
        self.max_batch = max_batch

    @property
    def slots_captured(self) -> int:
        return len(self._graphs)

    def _view(self, name: str, ptr: int, rows: int) -> torch.Tensor:
        spec = self.specs[name]
        return torch.as_tensor(_PipelineMemory(ptr, (rows, *spec.shape[1:]), spec.dtype), device=self._device)

    def enqueue(
        self, slot: int, rows: int, addresses: Mapping[str, int], stream: cuda.Stream, graph: bool
    ) -> None:
        tiles = self._view(INPUT, addresses[INPUT], rows)  # (B, S, S, 3) uint8
        out = self._view(OUTPUT, addresses[OUTPUT], rows)  # (B, E) float32
        key = (addresses[INPUT], addresses[OUTPUT])
        graph = graph and self._use_graphs
        on_stream = torch.cuda.ExternalStream(stream.ptr, device=self._device)  # type: ignore[no-untyped-call]
        with torch.cuda.device(self._device), torch.cuda.stream(on_stream), torch.inference_mode():
            known = self._graphs.get(slot)
            if graph and known is not None and known[0] == key:
                known[1].replay()
                self.replayed += 1
                return
            out.copy_(self._module(tiles)[0])  # ExportWrapper returns (embedding,)
            self.eager += 1
            if graph and not self._graphs_failed:  # the eager run above was the warm-up (and this result)
                self._capture(slot, key, tiles, out, on_stream)

    def _capture(
        self, slot: int, key: tuple[int, int], tiles: torch.Tensor, out: torch.Tensor, stream: Any
    ) -> None:
        """Capture this slot's full batch into a graph; if torch cannot, run without graphs from now on."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        captured = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls of other threads (an Embedder's reader) must not break the capture
            with torch.cuda.graph(
                captured, pool=self._pool, stream=stream, capture_error_mode="thread_local"
            ):
                out.copy_(self._module(tiles)[0])
        except RuntimeError as err:  # an operation that cannot be captured
            self._graphs_failed = True
            self._graphs.clear()
            _log.warning(
                "the torch-cuda module cannot be captured in a CUDA graph (%s); running without", err
            )
            return
        self._graphs[slot] = (key, captured)

    def close(self) -> None:
        self._graphs.clear()
        self._pool = None


class TorchCudaBackend(PipelinedBackend):
    """A timm backbone in fp16 on one GPU, behind the CUDA pipeline (see the module docstring).

    ``model``: the backbone (fp32, as :func:`~virchow_rt.model.vit.build_model` makes it; it is
    converted in place). ``precision``: "fp16" (default), "bf16" or "fp32". ``cuda_graphs``: replay full
    batches from a graph per slot. ``compile``: ``torch.compile`` the module. ``max_batch``: the
    largest batch (the buffers are sized for it).
    """

    name = "torch-cuda"

    def __init__(
        self,
        model: torch.nn.Module,
        variant: Variant,
        weights: WeightsInfo,
        *,
        device: int = 0,
        slots: int = 3,
        precision: str = "fp16",
        cuda_graphs: bool = True,
        compile: bool = False,
        max_batch: int | None = None,
    ) -> None:
        if precision not in DTYPES:
            raise InputError(f"unknown torch-cuda precision {precision!r}; use one of: {', '.join(DTYPES)}")
        if not torch.cuda.is_available() or cuda.device_count() == 0:
            raise BackendError(
                "the torch-cuda backend needs a CUDA GPU and none is visible here (torch "
                f"{torch.__version__}, cuda-python sees {cuda.device_count()}); use --backend onnxruntime "
                "on this machine"
            )
        dtype = DTYPES[precision]
        module: Any = ExportWrapper(model.to(dtype), variant, compute_dtype=dtype)
        module = module.to(torch.device("cuda", device)).eval().requires_grad_(False)
        torch.cuda.synchronize(device)  # the weights were copied on torch's stream; the pipeline's are others
        if compile:
            module = torch.compile(module)
        info = ModelInfo.from_variant(variant, precision, weights)
        rows = max_batch or variant.batch.max
        self.slots = slots  # a pipeline pass takes them in turn from the first: warm-ups must reach all
        self._torch_executor = TorchExecutor(module, info, device, rows, cuda_graphs)
        self._start(self._torch_executor, info, device, slots)
        if compile:
            self.name = "torch-cuda-compiled"

    def graph_use(self) -> dict[str, int]:
        """Executor runs so far that replayed a CUDA graph and that ran eager, and the slots captured.

        Graphs replay only for full batches (``max_batch`` rows) in a slot already captured; the
        benchmark records the counts of its timed passes in each row.
        """
        runs = self._torch_executor
        return {"replayed": runs.replayed, "eager": runs.eager, "slots_captured": runs.slots_captured}

    @classmethod
    def from_export(
        cls, folder: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None, **options: Any
    ) -> TorchCudaBackend:
        """The backbone an export folder was made from (:func:`~virchow_rt.model.vit.load_export_model`),
        on the GPU."""
        model, variant, info, manifest = load_export_model(folder, weights)
        options.setdefault("max_batch", manifest.batch.max if manifest.batch else None)
        return cls(model, variant, info, **options)
