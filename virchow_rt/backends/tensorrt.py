"""Native TensorRT backend: a checked engine, run by the shared CUDA pipeline with one context per slot.

Loading: the engine's ``manifest.json`` entry must match the file (sha256) and this machine (TensorRT
version, GPU compute capability: :func:`~virchow_rt.backends.engine_cache.runtime_problems`); if not,
the error says why and how to rebuild. A version-compatible engine carries native host code that runs
when it is deserialized; it is loaded only with ``allow_engine_host_code=True`` (the CLI's
``--allow-engine-host-code``), never because its manifest says so: whoever can write the engine can write
the manifest beside it. Only the name-based tensor API is used
(``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), as in NVIDIA's TensorRT 10/11 Python samples.

Running: :class:`~virchow_rt.backends.cuda.pipeline.PipelinedBackend` owns the buffers, streams and
ordering; :class:`TensorRTExecutor` queues the engine. Each slot has its own execution context
(NVIDIA's pattern for CUDA graphs: a graph bakes in its context's tensor addresses and shapes, so
one context per captured graph); the contexts share one block of scratch memory
(``USER_MANAGED`` allocation), which is safe because every batch computes on the one compute stream.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from virchow_rt.backends.cuda import api as cuda
from virchow_rt.backends.cuda.pipeline import ALIGNMENT, Executor, PipelinedBackend
from virchow_rt.backends.cuda.slot_schedule import SlotSchedule, Step
from virchow_rt.backends.engine_cache import (
    NUMPY_TYPES,
    check_io,
    check_version,
    read_plan,
    rebuild_command,
    runtime_problems,
)
from virchow_rt.backends.tensorrt_module import LogBook, import_tensorrt, is_real_tensorrt, make_logger
from virchow_rt.contract import INPUT, ModelInfo, TensorSpec
from virchow_rt.errors import BackendError, ModelFileError, warn_random_weights

if TYPE_CHECKING:
    import tensorrt as trt

# re-exported: the builder and callers import these from here
__all__ = [
    "LogBook",
    "SlotSchedule",
    "Step",
    "TensorRTBackend",
    "TensorRTExecutor",
    "import_tensorrt",
    "is_real_tensorrt",
    "make_logger",
]
_log = logging.getLogger("virchow_rt.tensorrt")


@dataclass
class _Context:
    """One slot's execution context, the state it was last set to, and its CUDA graph."""

    context: trt.IExecutionContext
    rows: int = 0
    addresses: tuple[tuple[str, int], ...] = ()
    graph: cuda.GraphExec | None = None
    graph_failed: bool = False

    def drop_graph(self) -> None:
        if self.graph is not None:
            self.graph.close()
            self.graph = None


def check_host_code(version_compatible: bool, runtime_module: str, allowed: bool, what: str) -> None:
    """Refuse to load an engine whose deserialization runs host code stored in it, unless ``allowed``.

    A version-compatible plan carries the lean runtime's native code (the ``tensorrt_lean`` runtime needs
    none of it). TensorRT leaves host code off unless asked, and NVIDIA says to deserialize only trusted
    engines; a sha256 in the manifest beside the engine proves it is unchanged, not who wrote it."""
    if version_compatible and runtime_module != "tensorrt_lean" and not allowed:
        raise ModelFileError(
            f"{what} is a version-compatible TensorRT engine: loading it runs native code stored in the "
            "engine file, which virchow-rt does only when asked. If you built it, or trust whoever wrote "
            "it, pass --allow-engine-host-code (allow_engine_host_code=True in Python); else rebuild it "
            "without --version-compatible on this machine"
        )


def read_io(engine: trt.ICudaEngine) -> dict[str, TensorSpec]:
    """The engine's I/O tensors by name, batch axis as in the engine (-1 for a dynamic batch)."""
    specs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        type_name = engine.get_tensor_dtype(name).name
        if type_name not in NUMPY_TYPES:
            raise ModelFileError(f"engine tensor {name!r} has type {type_name}, which virchow-rt cannot feed")
        is_input = engine.get_tensor_mode(name).name == "INPUT"
        dims = engine.get_tensor_shape(name)
        shape = tuple(int(dims[j]) for j in range(len(dims)))
        specs[name] = TensorSpec(name, is_input, np.dtype(NUMPY_TYPES[type_name]), shape)
    return specs


class TensorRTExecutor(Executor):
    """Queues a deserialized engine: one execution context per pipeline slot, optional CUDA graphs.

    ``lean_library``: path of the lean runtime library (``libnvinfer_lean.so.X``) to load with
    ``IRuntime.load_runtime`` for a version-compatible engine built with the lean runtime excluded.
    ``allow_host_code``: let a version-compatible plan run its host code (see :func:`check_host_code`).
    """

    def __init__(
        self,
        trt_module: ModuleType,
        plan: bytes,
        info: ModelInfo,
        *,
        graphs: bool = False,
        version_compatible: bool = False,
        lean_library: str | None = None,
        allow_host_code: bool = False,
    ) -> None:
        check_host_code(version_compatible, trt_module.__name__, allow_host_code, "this engine")
        self._use_graphs = graphs
        self._contexts: list[_Context] = []
        self._scratch: cuda.DeviceBuffer | None = None
        self._book = LogBook()
        self._logger = make_logger(trt_module, self._book)
        runtime: trt.Runtime = trt_module.Runtime(self._logger)
        self._parent_runtime = runtime  # a runtime loaded from it must not outlive it
        if lean_library:
            loaded = runtime.load_runtime(lean_library)
            if loaded is None:
                raise BackendError(
                    f"TensorRT could not load the lean runtime library {lean_library} "
                    f"({self._book.quote()}); pass the libnvinfer_lean of the TensorRT version that built it"
                )
            runtime = loaded
        if version_compatible and trt_module.__name__ != "tensorrt_lean":
            # the caller allowed it explicitly (checked above): a manifest's word is not enough
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(
                f"TensorRT could not load the engine ({self._book.quote()}); rebuild it on this machine"
            )
        self._trt, self._runtime, self._engine = trt_module, runtime, engine
        self.specs = read_io(engine)
        check_io(self.specs, info)
        lowest, _, highest = engine.get_tensor_profile_shape(INPUT, 0)
        self.min_batch, self.max_batch = max(1, int(lowest[0])), int(highest[0])

    def open(self, slots: int) -> None:
        """One execution context per slot, all on one block of scratch memory (they never run at once)."""
        engine = self._engine
        size = int(engine.device_memory_size_v2)
        if size > 0:
            self._scratch = cuda.DeviceBuffer(size)
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        for _ in range(slots):
            context = engine.create_execution_context(strategy)
            if context is None:
                raise BackendError(
                    f"TensorRT could not create an execution context ({self._book.quote()}); out of memory?"
                )
            if self._scratch is not None:
                context.set_device_memory(self._scratch.ptr, size)
            self._contexts.append(_Context(context))

    def enqueue(
        self, slot: int, rows: int, addresses: Mapping[str, int], stream: cuda.Stream, graph: bool
    ) -> None:
        state = self._contexts[slot]
        bound = tuple(sorted(addresses.items()))
        graph = graph and self._use_graphs
        if graph and state.graph is not None and (state.rows, state.addresses) == (rows, bound):
            state.graph.launch(stream)
            return
        self._bind(state, rows, bound)
        if not state.context.execute_async_v3(stream.ptr):
            raise BackendError(f"TensorRT inference failed on a batch of {rows} tiles ({self._book.quote()})")
        if graph and state.graph is None and not state.graph_failed:
            context = state.context
            stream.synchronize()  # let one-time work finish outside the capture, as trtexec does
            state.graph = cuda.capture_graph(stream, lambda: context.execute_async_v3(stream.ptr))
            state.graph_failed = state.graph is None
            if state.graph_failed:
                _log.warning("this engine cannot be captured in a CUDA graph; running it without graphs")

    def _bind(self, state: _Context, rows: int, bound: tuple[tuple[str, int], ...]) -> None:
        """Set the context's input shape and tensor addresses, checking what TensorRT answers."""
        if (state.rows, state.addresses) == (rows, bound):
            return
        state.drop_graph()  # a graph replays the shape and addresses it was captured with
        if not state.context.set_input_shape(INPUT, (rows, *self.specs[INPUT].shape[1:])):
            raise BackendError(f"TensorRT refused input shape ({rows}, ...) ({self._book.quote()})")
        for name, ptr in bound:
            if not state.context.set_tensor_address(name, ptr):
                raise BackendError(
                    f"TensorRT refused the address {ptr:#x} of tensor {name!r} (it needs {ALIGNMENT}-byte "
                    f"aligned addresses) ({self._book.quote()})"
                )
        state.rows, state.addresses = rows, bound

    def close(self) -> None:
        for state in self._contexts:
            state.drop_graph()
        self._contexts = []
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None


class TensorRTBackend(PipelinedBackend):
    """Runs an fp16 TensorRT engine (``<variant>.fp16.engine``) on one GPU.

    ``slots`` (2-3): batches in flight. ``cuda_graphs``: replay full batches from a CUDA graph
    captured per slot (ragged batches run normally). ``runtime_module``: "auto", "tensorrt",
    "tensorrt_lean" or "tensorrt_dispatch" (the latter two run version-compatible engines only).
    ``lean_library``: see :class:`TensorRTExecutor`. ``allow_engine_host_code``: load a
    version-compatible engine, which runs host code stored in the engine file (only for engines you built
    or trust; see :func:`check_host_code`). Not thread-safe: use one backend per thread.
    Free it with :meth:`close` or ``with``.
    """

    name = "tensorrt"
    _sha256: str | None = None  # of the engine file; None for a plan held in memory

    def __init__(
        self,
        engine_path: str | Path,
        *,
        device: int = 0,
        slots: int = 3,
        cuda_graphs: bool = False,
        runtime_module: str = "auto",
        lean_library: str | None = None,
        allow_engine_host_code: bool = False,
    ) -> None:
        path = Path(engine_path)
        manifest, artifact, plan = read_plan(path)
        trt_module = import_tensorrt(runtime_module)
        vc = bool(artifact.extra.get("version_compatible"))
        check_host_code(vc, trt_module.__name__, allow_engine_host_code, path.name)  # before any GPU work
        check_version(trt_module.__version__)
        cuda.set_device(device)
        gpu = cuda.device_info(device)
        errors, notes = runtime_problems(
            artifact,
            trt_module.__name__,
            trt_module.__version__,
            gpu.name,
            gpu.compute_capability,
            lean_library=lean_library,
        )
        if errors:
            raise ModelFileError(
                f"cannot use {path.name} here: {'; '.join(errors)}. TensorRT engines are specific to the "
                "TensorRT version and GPU that built them; rebuild it on this machine: "
                f"{rebuild_command(manifest, path.parent)}"
            )
        for note in notes:
            warnings.warn(f"{path.name}: {note}", stacklevel=2)
        info = ModelInfo.from_manifest(manifest, artifact)
        if info.random_weights:
            warn_random_weights(f"{path.name} was built from random weights")
        executor = TensorRTExecutor(
            trt_module, plan, info, graphs=cuda_graphs, version_compatible=vc, lean_library=lean_library,
            allow_host_code=allow_engine_host_code,
        )  # fmt: skip
        self._start(executor, info, device, slots)
        self.path, self._sha256 = path, artifact.sha256  # the plan was checked against it above

    @property
    def model_sha256(self) -> str | None:
        """The engine's sha256 as its manifest records it (checked against the file when it was loaded)."""
        return self._sha256

    @classmethod
    def from_serialized(
        cls,
        plan: bytes,
        info: ModelInfo,
        *,
        device: int = 0,
        slots: int = 3,
        cuda_graphs: bool = False,
        version_compatible: bool = False,
        allow_engine_host_code: bool = False,
    ) -> TensorRTBackend:
        """A backend over an engine held in memory (the builder's parity check, before the file exists).

        ``allow_engine_host_code``: as for the constructor (the builder allows the plan it just built)."""
        self = cls.__new__(cls)
        cuda.set_device(device)
        trt_module = import_tensorrt("tensorrt")
        executor = TensorRTExecutor(
            trt_module, plan, info, graphs=cuda_graphs, version_compatible=version_compatible,
            allow_host_code=allow_engine_host_code,
        )  # fmt: skip
        self._start(executor, info, device, slots)
        return self
