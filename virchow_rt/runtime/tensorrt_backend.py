"""Native TensorRT backend: a checked engine, run with copies and compute overlapped across batches.

Loading: the engine's ``manifest.json`` entry must match the file (sha256) and this machine (TensorRT
version, GPU compute capability: :func:`~virchow_rt.runtime.engine_cache.runtime_problems`); if not,
the error says why and how to rebuild. Only the name-based tensor API is used
(``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), as in NVIDIA's TensorRT 10/11 Python samples.

Running (:meth:`TensorRTBackend.pipeline`): ``slots`` sets of buffers (pinned host in/out, device
in/out, each sized for the profile's max batch) are made once and reused round-robin. Three
streams share the work: H2D copies, compute (one execution context, so batches compute in order)
and D2H copies, ordered by events. While batch k computes, batch k+1 is filled and copied in and
batch k-1 copied out; the host waits only for a slot's previous D2H before refilling it. A host
batch below the profile's min (a ragged last batch) runs padded with blank tiles. The
bookkeeping is the pure :class:`SlotSchedule`, unit-tested on the CPU. GPU arrays
(``__cuda_array_interface__`` or DLPack: CuPy, torch, JAX) are read in place, without a host round trip.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from virchow_rt.errors import BackendError, InputError, ModelFileError
from virchow_rt.runtime import cuda
from virchow_rt.runtime.backend import Backend, ModelInfo
from virchow_rt.runtime.device_arrays import DeviceArray, as_device_array, as_host_array, split_rows
from virchow_rt.runtime.engine_cache import (
    INPUT,
    NUMPY_TYPES,
    OUTPUT,
    TensorSpec,
    check_batch,
    check_io,
    check_version,
    model_info,
    read_plan,
    rebuild_command,
    runtime_problems,
)
from virchow_rt.runtime.slot_schedule import SlotSchedule, Step
from virchow_rt.runtime.tensorrt_module import LogBook, import_tensorrt, is_real_tensorrt, make_logger

if TYPE_CHECKING:
    import tensorrt as trt

# re-exported: the builder and callers import these from here
__all__ = [
    "LogBook",
    "SlotSchedule",
    "Step",
    "TensorRTBackend",
    "import_tensorrt",
    "is_real_tensorrt",
    "make_logger",
]
_log = logging.getLogger("virchow_rt.tensorrt")


# --- GPU side ------------------------------------------------------------------------------------
class _Slot:
    """One set of buffers for a batch in flight, sized for the profile's max batch."""

    def __init__(self, specs: Mapping[str, TensorSpec], rows: int) -> None:
        self.device: dict[str, cuda.DeviceBuffer] = {}
        self.graph: cuda.GraphExec | None = None
        self.graph_failed = False
        self.held: object | None = None  # a caller's GPU array read in place: kept alive until emitted
        self.input_ptr = 0
        self.wait_input = True
        try:
            self.host_in = cuda.PinnedBuffer(specs[INPUT].nbytes(rows))
            self.host_out = cuda.PinnedBuffer(specs[OUTPUT].nbytes(rows))
            for name, spec in specs.items():
                self.device[name] = cuda.DeviceBuffer(spec.nbytes(rows))
            self.h2d_done, self.compute_done, self.d2h_done = cuda.Event(), cuda.Event(), cuda.Event()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for name in ("graph", "h2d_done", "compute_done", "d2h_done", "host_in", "host_out"):
            res = getattr(self, name, None)
            if res is not None:
                res.close()
        for buf in self.device.values():
            buf.close()
        self.held = None


@dataclass(frozen=True)
class _Batch:
    rows: int
    data: np.ndarray | DeviceArray  # host tiles, or a caller's GPU array read in place


class TensorRTBackend(Backend):
    """Runs an fp16 TensorRT engine (``<variant>.fp16.engine``) on one GPU.

    ``slots`` (2-3): batches in flight. ``cuda_graphs``: replay full batches from a CUDA graph
    captured per slot (ragged batches run normally). ``runtime_module``: "auto", "tensorrt",
    "tensorrt_lean" or "tensorrt_dispatch" (the latter two run version-compatible engines only).
    Not thread-safe: use one backend per thread. Free it with :meth:`close` or ``with``.
    """

    name = "tensorrt"
    gpu: int  # always on a GPU

    def __init__(
        self,
        engine_path: str | Path,
        *,
        device: int = 0,
        slots: int = 3,
        cuda_graphs: bool = False,
        runtime_module: str = "auto",
    ) -> None:
        path = Path(engine_path)
        manifest, artifact, plan = read_plan(path)
        trt_module = import_tensorrt(runtime_module)
        check_version(trt_module.__version__)
        cuda.set_device(device)
        gpu = cuda.device_info(device)
        errors, notes = runtime_problems(
            artifact, trt_module.__name__, trt_module.__version__, gpu.name, gpu.compute_capability
        )
        if errors:
            raise ModelFileError(
                f"cannot use {path.name} here: {'; '.join(errors)}. TensorRT engines are specific to the "
                "TensorRT version and GPU that built them; rebuild it on this machine: "
                f"{rebuild_command(manifest, path.parent)}"
            )
        for note in notes:
            warnings.warn(f"{path.name}: {note}", stacklevel=2)
        info = model_info(manifest, artifact)
        if info.random_weights:
            warnings.warn(
                f"RANDOM WEIGHTS: {path.name} embeds nothing meaningful (tests and demos only)", stacklevel=2
            )
        self._setup(
            trt_module, plan, info, device, slots, cuda_graphs, bool(artifact.get("version_compatible"))
        )

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
    ) -> TensorRTBackend:
        """A backend over an engine held in memory (the builder's parity check, before the file exists)."""
        self = cls.__new__(cls)
        cuda.set_device(device)
        self._setup(import_tensorrt("tensorrt"), plan, info, device, slots, cuda_graphs, version_compatible)
        return self

    def _setup(
        self,
        trt_module: ModuleType,
        plan: bytes,
        info: ModelInfo,
        device: int,
        slots: int,
        graphs: bool,
        vc: bool,
    ) -> None:
        self.info, self.gpu, self._num_slots, self._use_graphs = info, device, slots, graphs
        self._slots: list[_Slot] = []
        self._streams: list[cuda.Stream] = []
        self._lock = threading.Lock()
        SlotSchedule(slots)  # validates the slot count before anything is allocated
        self._book = LogBook()
        self._logger = make_logger(trt_module, self._book)
        runtime: trt.Runtime = trt_module.Runtime(self._logger)
        if vc and trt_module.__name__ != "tensorrt_lean":
            # a version-compatible plan carries the lean runtime's host code; it is trusted because its
            # sha256 was checked against the manifest (or it was just built in this process)
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(
                f"TensorRT could not load the engine ({self._book.quote()}); rebuild it on this machine"
            )
        self._runtime: trt.Runtime | None = runtime
        self._engine: trt.ICudaEngine | None = engine
        self._specs = self._read_io(engine)
        check_io(self._specs, info)
        lowest, _, highest = engine.get_tensor_profile_shape(INPUT, 0)
        # batches below the profile's min (a ragged last batch) run padded with blank tiles up to it
        self._min, self._max = max(1, int(lowest[0])), int(highest[0])
        self.max_batch = self._max
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(
                f"TensorRT could not create an execution context ({self._book.quote()}); out of memory?"
            )
        self._context: trt.IExecutionContext | None = context

    @staticmethod
    def _read_io(engine: trt.ICudaEngine) -> dict[str, TensorSpec]:
        specs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            type_name = engine.get_tensor_dtype(name).name
            if type_name not in NUMPY_TYPES:
                raise ModelFileError(
                    f"engine tensor {name!r} has type {type_name}, which virchow-rt cannot feed"
                )
            is_input = engine.get_tensor_mode(name).name == "INPUT"
            dims = engine.get_tensor_shape(name)
            shape = tuple(int(dims[j]) for j in range(len(dims)))
            specs[name] = TensorSpec(name, is_input, np.dtype(NUMPY_TYPES[type_name]), shape)
        return specs

    # --- running --------------------------------------------------------------------------------
    def run(self, tiles: Any) -> np.ndarray:
        """Embed uint8 tiles (N, S, S, 3), a host or GPU array of any N -> a new (N, E) float32 array."""
        dev = tiles if isinstance(tiles, DeviceArray | np.ndarray) else as_device_array(tiles)
        if not isinstance(dev, DeviceArray):
            host = as_host_array(tiles)
            outs = list(self.pipeline(host[i : i + self._max] for i in range(0, len(host), self._max)))
        else:
            # read in place, not padded: a last piece below the profile's min starts earlier instead
            chunks, overlap = split_rows(dev, self._max, self._min)
            outs = list(self.pipeline(chunks))
            if overlap:
                outs[-1] = outs[-1][overlap:]
        if not outs:
            return np.empty((0, self.info.embedding_dim), np.float32)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _prepare(self, batch: Any) -> _Batch:
        dev = batch if isinstance(batch, DeviceArray) else None
        if dev is None and not isinstance(batch, np.ndarray):
            dev = as_device_array(batch)
        if dev is not None:
            if dev.device is not None and dev.device != self.gpu:
                raise InputError(
                    f"the GPU array is on device {dev.device} but this engine runs on device {self.gpu}; "
                    f"move it there first, or open the engine with device={dev.device}"
                )
            rows = check_batch(dev.shape, dev.dtype, self.info.tile_size, self._max)
            if 0 < rows < self._min:
                raise InputError(
                    f"a GPU array of {rows} tiles is below the engine's min batch {self._min} (GPU arrays "
                    f"are read in place, not padded); pass at least {self._min} tiles, a host array, or "
                    "rebuild the engine with a profile min of 1"
                )
            return _Batch(rows, dev)
        host = as_host_array(batch)
        return _Batch(check_batch(host.shape, host.dtype, self.info.tile_size, self._max), host)

    def pipeline(self, batches: Iterable[Any]) -> Iterator[np.ndarray]:
        """Embed batches in order, copies overlapped with compute; yields a fresh (B, E) float32 array each.

        Batches are uint8 (B, S, S, 3) numpy arrays or GPU arrays (``__cuda_array_interface__`` or
        DLPack; read in place, after the producer's queued writes), B <= :attr:`max_batch`. The input
        iterator is consumed lazily; results come out up to ``slots`` batches behind it.
        """
        with self._exclusive():
            schedule = SlotSchedule(len(self._slots))
            pending: dict[int, _Batch] = {}
            for batch in batches:
                prepared = pending[schedule.submitted] = self._prepare(batch)
                for step in schedule.submit(prepared.rows):
                    out = self._do(step, pending)
                    if out is not None:
                        yield out
            for step in schedule.drain():
                out = self._do(step, pending)
                if out is not None:
                    yield out

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the backend (one pipeline or timing at a time), its buffers made; on exit, let the GPU
        finish what was queued (an abandoned generator must not leave copies in flight)."""
        if not self._lock.acquire(blocking=False):
            raise BackendError(
                "this TensorRTBackend is already running a pipeline; use one backend per thread"
            )
        try:
            if self._context is None:
                raise BackendError("this TensorRTBackend was closed; open the engine again")
            cuda.set_device(self.gpu)
            self._allocate()
            yield
        finally:
            try:
                for stream in self._streams:
                    stream.synchronize()
            finally:
                for slot in self._slots:
                    slot.held = None
                self._lock.release()

    def time_compute(self, tiles: Any, *, repeats: int = 10, warmup: int = 2) -> list[float]:
        """Seconds of device time per engine run on one batch, no copies: CUDA events on the compute stream.

        The batch is copied in once (or read in place from a GPU array), then run ``warmup`` + ``repeats``
        times; only the last ``repeats`` are returned. Used by the benchmark's compute-only column.
        """
        if repeats < 1 or warmup < 0:
            raise InputError(f"repeats {repeats} must be >= 1 and warmup {warmup} >= 0")
        with self._exclusive():
            batch = self._prepare(tiles)
            if batch.rows == 0:
                raise InputError("time_compute needs at least one tile")
            for op in ("fill", "h2d"):
                self._do(Step(op, 0, 0, batch.rows), {0: batch})
            slot, compute = self._slots[0], self._streams[1]
            if slot.wait_input:
                compute.wait(slot.h2d_done)
            timer, rows = cuda.EventTimer(compute), max(batch.rows, self._min)
            runs = range(warmup + repeats)
            samples = [timer.measure(lambda: self._enqueue(slot, rows, compute)) for _ in runs]
            return samples[warmup:]

    def _allocate(self) -> None:
        if not self._slots:
            self._streams = [cuda.Stream() for _ in range(3)]  # H2D, compute, D2H
            self._slots = [_Slot(self._specs, self._max) for _ in range(self._num_slots)]

    def _do(self, step: Step, pending: dict[int, _Batch]) -> np.ndarray | None:
        h2d, compute, d2h = self._streams
        if step.slot < 0:  # an empty batch
            pending.pop(step.batch)
            return np.empty((0, self.info.embedding_dim), np.float32)
        slot, batch = self._slots[step.slot], pending[step.batch]
        tiles = self._specs[INPUT]
        rows = max(step.rows, self._min)  # rows the engine runs: padded up to the profile's min
        if step.op == "fill":
            if isinstance(batch.data, np.ndarray):
                host = slot.host_in.view(np.uint8, (self._max, *tiles.shape[1:]))
                np.copyto(host[: step.rows], batch.data)
                host[step.rows : rows] = 0  # blank padding tiles; their outputs are never read
                slot.input_ptr, slot.held = slot.device[INPUT].ptr, None
            else:
                slot.input_ptr, slot.held = batch.data.ptr, batch.data.owner
        elif step.op == "h2d":
            slot.wait_input = True
            if isinstance(batch.data, np.ndarray):
                cuda.copy_async(slot.input_ptr, slot.host_in.ptr, tiles.nbytes(rows), "h2d", h2d)
                slot.h2d_done.record(h2d)
            elif batch.data.stream is not None:
                slot.h2d_done.record(batch.data.stream)  # the producer's stream: wait for its writes
            else:
                slot.wait_input = False
        elif step.op == "compute":
            if slot.wait_input:
                compute.wait(slot.h2d_done)
            self._enqueue(slot, rows, compute)
            slot.compute_done.record(compute)
        elif step.op == "d2h":
            d2h.wait(slot.compute_done)
            nbytes = self._specs[OUTPUT].nbytes(step.rows)
            cuda.copy_async(slot.host_out.ptr, slot.device[OUTPUT].ptr, nbytes, "d2h", d2h)
            slot.d2h_done.record(d2h)
        elif step.op == "wait":
            slot.d2h_done.synchronize()
        elif step.op == "emit":
            pending.pop(step.batch)
            slot.held = None
            out = slot.host_out.view(np.float32, (self._max, self.info.embedding_dim))[: step.rows]
            return out.copy()  # the pinned buffer is refilled by a later batch
        return None

    def _enqueue(self, slot: _Slot, rows: int, stream: cuda.Stream) -> None:
        context = self._context
        assert context is not None
        own_input = slot.input_ptr == slot.device[INPUT].ptr
        full = self._use_graphs and own_input and rows == self._max
        if full and slot.graph is not None:
            slot.graph.launch(stream)
            return
        if rows != self._max:
            # a graph is only valid for the context state it was captured in: recapture after another shape
            for other in self._slots:
                if other.graph is not None:
                    other.graph.close()
                    other.graph = None
        if not context.set_input_shape(INPUT, (rows, *self._specs[INPUT].shape[1:])):
            raise BackendError(f"TensorRT refused input shape ({rows}, ...) ({self._book.quote()})")
        context.set_tensor_address(INPUT, slot.input_ptr)
        for name, spec in self._specs.items():
            if not spec.is_input:
                context.set_tensor_address(name, slot.device[name].ptr)
        if not context.execute_async_v3(stream.ptr):
            raise BackendError(f"TensorRT inference failed on a batch of {rows} tiles ({self._book.quote()})")
        if full and slot.graph is None and not slot.graph_failed:
            stream.synchronize()  # let one-time work finish outside the capture, as trtexec does
            slot.graph = cuda.capture_graph(stream, lambda: context.execute_async_v3(stream.ptr))
            slot.graph_failed = slot.graph is None
            if slot.graph_failed:
                _log.warning("this engine cannot be captured in a CUDA graph; running it without graphs")

    def close(self) -> None:
        """Synchronize and free streams, buffers, graphs, the execution context and the engine. Safe twice."""
        streams, slots = getattr(self, "_streams", []), getattr(self, "_slots", [])
        try:
            for stream in streams:
                stream.synchronize()
        finally:
            for slot in slots:
                slot.close()
            for stream in streams:
                stream.close()
            self._slots, self._streams = [], []
            self._context = None
            self._engine = self._runtime = None
