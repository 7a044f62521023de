"""The GPU pipeline every CUDA backend shares, apart from what computes a batch (the :class:`Executor`).

:class:`PipelinedBackend` owns the memory, streams and ordering: ``slots`` sets of buffers (pinned host
in/out, device in/out, each sized for the executor's max batch) made once and reused round-robin, and
three streams: H2D copies, compute (batches compute in order) and D2H copies, ordered by events.
While batch k computes, batch k+1 is filled and copied in and batch k-1 copied out; the host waits
only for a slot's previous D2H before refilling it. A host batch below the executor's min (a ragged
last batch) runs padded with blank tiles. GPU arrays (``__cuda_array_interface__`` or DLPack: CuPy,
torch, JAX) are read in place, without a host round trip, unless their address is not aligned as the
executor needs (then they are copied into the slot on the GPU). The bookkeeping is the pure
:class:`~virchow_rt.backends.cuda.slot_schedule.SlotSchedule`, unit-tested on the CPU.

An :class:`Executor` only queues the computation of one batch on a stream, reading the input
address and writing the output addresses the pipeline gives it: TensorRT's execution contexts
(:mod:`virchow_rt.backends.tensorrt`) are one, a PyTorch module
(:mod:`virchow_rt.backends.torch_cuda`) another.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.backends.cuda import api as cuda
from virchow_rt.backends.cuda.device_arrays import (
    LEGACY_STREAM,
    DeviceArray,
    as_device_array,
    as_host_array,
    split_rows,
)
from virchow_rt.backends.cuda.slot_schedule import SlotSchedule, Step
from virchow_rt.contract import INPUT, OUTPUT, ModelInfo, TensorSpec, check_batch
from virchow_rt.errors import BackendError, InputError

#: TensorRT needs every tensor address aligned to 256 bytes (cudaMalloc gives at least that)
ALIGNMENT = 256
PER_THREAD_STREAM = 2  # the protocols' number for the per-thread default stream


class Executor(abc.ABC):
    """Computes one batch from device buffers, queued on the stream the pipeline gives it.

    ``specs``: the input (:data:`INPUT`, uint8 ``(-1, S, S, 3)``) and every output (``embedding``
    float32 ``(-1, E)`` first), the batch axis as -1. ``min_batch``/``max_batch``: the rows one call
    takes. ``alignment``: bytes an input address must be a multiple of.
    """

    specs: Mapping[str, TensorSpec]
    min_batch: int = 1
    max_batch: int
    alignment: int = ALIGNMENT

    def open(self, slots: int) -> None:  # noqa: B027 - optional hook
        """Make per-slot state before the first batch (TensorRT: one execution context per slot)."""

    @abc.abstractmethod
    def enqueue(
        self, slot: int, rows: int, addresses: Mapping[str, int], stream: cuda.Stream, graph: bool
    ) -> None:
        """Queue the computation of ``rows`` tiles on ``stream``: read ``addresses[INPUT]``, write outputs.

        ``graph``: the addresses are slot ``slot``'s own buffers and ``rows`` is the max batch, so a CUDA
        graph captured for this slot may be replayed (an executor may ignore it). Never blocks on the GPU
        except to capture a graph.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what :meth:`open` made (called after the pipeline's streams are synchronized)."""


class _Slot:
    """One set of buffers for a batch in flight, sized for the executor's max batch."""

    def __init__(self, specs: Mapping[str, TensorSpec], rows: int) -> None:
        self.device: dict[str, cuda.DeviceBuffer] = {}
        self.events: list[cuda.Event] = []
        self.held: object | None = None  # a caller's GPU array read in place: kept alive until emitted
        self.input_ptr = 0
        self.copy_from = 0  # a misaligned GPU array: copied from here into the slot's input on the GPU
        self.wait_input = True
        try:
            self.host_in = cuda.PinnedBuffer(specs[INPUT].nbytes(rows))
            self.host_out = cuda.PinnedBuffer(specs[OUTPUT].nbytes(rows))
            for name, spec in specs.items():
                self.device[name] = cuda.DeviceBuffer(spec.nbytes(rows))
            for _ in range(3):  # one at a time: a failure frees the ones made before it
                self.events.append(cuda.Event())
        except BaseException:
            self.close()
            raise
        self.h2d_done, self.compute_done, self.d2h_done = self.events

    def addresses(self) -> dict[str, int]:
        return {name: (self.input_ptr if name == INPUT else buf.ptr) for name, buf in self.device.items()}

    def close(self) -> None:
        for res in [*self.events, getattr(self, "host_in", None), getattr(self, "host_out", None)]:
            if res is not None:
                res.close()
        for buf in self.device.values():
            buf.close()
        self.held = None


@dataclass(frozen=True)
class _Batch:
    rows: int
    data: np.ndarray | DeviceArray  # host tiles, or a caller's GPU array read in place


def _producer(stream: int) -> int:
    """The stream to record on for a producer's ``stream``: a per-thread default stream (2) belongs to the
    producer's thread and cannot be named from this one; the legacy stream (1) waits for it (both block)."""
    return LEGACY_STREAM if stream == PER_THREAD_STREAM else stream


class PipelinedBackend(Backend):
    """A :class:`Backend` that runs an :class:`Executor` on one GPU with copies overlapped with compute.

    ``slots`` (2-3): batches in flight. Not thread-safe: use one backend per thread. Free it with
    :meth:`close` or ``with``. Subclasses set up ``executor`` and call :meth:`_start`.
    """

    gpu: int  # always on a GPU

    def _start(self, executor: Executor, info: ModelInfo, device: int, slots: int) -> None:
        SlotSchedule(slots)  # validates the slot count before anything is allocated
        self.info, self.gpu, self._num_slots = info, device, slots
        self._executor: Executor | None = executor
        self._slots: list[_Slot] = []
        self._streams: list[cuda.Stream] = []
        self._lock = threading.Lock()
        self._specs = dict(executor.specs)
        # batches below the executor's min (a ragged last batch) run padded with blank tiles up to it
        self._min, self._max = max(1, executor.min_batch), executor.max_batch
        self.max_batch = self._max

    # --- running --------------------------------------------------------------------------------
    def run(self, tiles: Any) -> np.ndarray:
        """Embed uint8 tiles (N, S, S, 3), a host or GPU array of any N -> a new (N, E) float32 array."""
        dev = tiles if isinstance(tiles, DeviceArray | np.ndarray) else as_device_array(tiles)
        if not isinstance(dev, DeviceArray):
            host = as_host_array(tiles)
            outs = list(self.pipeline(host[i : i + self._max] for i in range(0, len(host), self._max)))
        else:
            # read in place, not padded: a last piece below the min starts earlier instead
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
                    f"the GPU array is on device {dev.device} but this {self.name} backend runs on device "
                    f"{self.gpu}; move it there first, or open the backend with device={dev.device}"
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
            raise BackendError(f"this {self.name} backend is already running a pipeline; use one per thread")
        try:
            if self._executor is None:
                raise BackendError(f"this {self.name} backend was closed; open the model again")
            cuda.set_device(self.gpu)
            self._allocate(self._executor)
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
        """Seconds of device time per executor run on one batch, no copies: CUDA events on the compute stream.

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
            samples = [timer.measure(lambda: self._compute(0, rows)) for _ in runs]
            return samples[warmup:]

    def _allocate(self, executor: Executor) -> None:
        """Streams, slots and the executor's per-slot state, made together on first use (or not at all)."""
        if self._slots:
            return
        streams: list[cuda.Stream] = []
        slots: list[_Slot] = []
        try:
            for _ in range(3):  # H2D, compute, D2H; one at a time: a failure frees the ones made before it
                streams.append(cuda.Stream())
            for _ in range(self._num_slots):
                slots.append(_Slot(self._specs, self._max))
            executor.open(self._num_slots)
        except BaseException:
            executor.close()
            for slot in slots:
                slot.close()
            for stream in streams:
                stream.close()
            raise
        self._streams, self._slots = streams, slots

    def _compute(self, index: int, rows: int) -> None:
        executor, slot = self._executor, self._slots[index]
        assert executor is not None
        own = slot.input_ptr == slot.device[INPUT].ptr
        executor.enqueue(index, rows, slot.addresses(), self._streams[1], own and rows == self._max)

    def _do(self, step: Step, pending: dict[int, _Batch]) -> np.ndarray | None:
        h2d, compute, d2h = self._streams
        if step.slot < 0:  # an empty batch
            pending.pop(step.batch)
            return np.empty((0, self.info.embedding_dim), np.float32)
        slot, batch = self._slots[step.slot], pending[step.batch]
        tiles = self._specs[INPUT]
        rows = max(step.rows, self._min)  # rows the executor runs: padded up to its min
        if step.op == "fill":
            slot.input_ptr, slot.copy_from, slot.held = slot.device[INPUT].ptr, 0, None
            if isinstance(batch.data, np.ndarray):
                host = slot.host_in.view(np.uint8, (self._max, *tiles.shape[1:]))
                np.copyto(host[: step.rows], batch.data)
                host[step.rows : rows] = 0  # blank padding tiles; their outputs are never read
            else:
                slot.held = batch.data.owner
                assert self._executor is not None
                if batch.data.ptr % self._executor.alignment == 0:
                    slot.input_ptr = batch.data.ptr
                else:  # e.g. a view at an odd row offset: copied into the slot's own buffer on the GPU
                    slot.copy_from = batch.data.ptr
        elif step.op == "h2d":
            self._copy_in(slot, batch, tiles.nbytes(rows), tiles.nbytes(step.rows), h2d)
        elif step.op == "compute":
            if slot.wait_input:
                compute.wait(slot.h2d_done)
            self._compute(step.slot, rows)
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

    @staticmethod
    def _copy_in(slot: _Slot, batch: _Batch, padded: int, given: int, h2d: cuda.Stream) -> None:
        """Queue what brings the batch into the slot's input: a host copy, a GPU copy, or nothing."""
        slot.wait_input = True
        if isinstance(batch.data, np.ndarray):
            cuda.copy_async(slot.input_ptr, slot.host_in.ptr, padded, "h2d", h2d)
            slot.h2d_done.record(h2d)
        elif slot.copy_from:  # misaligned: wait for the producer, then copy on the GPU
            if batch.data.stream is not None:
                slot.h2d_done.record(_producer(batch.data.stream))
                h2d.wait(slot.h2d_done)
            cuda.copy_async(slot.input_ptr, slot.copy_from, given, "d2d", h2d)
            slot.h2d_done.record(h2d)
        elif batch.data.stream is not None:
            slot.h2d_done.record(_producer(batch.data.stream))  # the producer's stream: wait for its writes
        else:
            slot.wait_input = False

    def close(self) -> None:
        """Synchronize and free streams, buffers and the executor. Safe to call twice."""
        streams, slots = getattr(self, "_streams", []), getattr(self, "_slots", [])
        executor = getattr(self, "_executor", None)
        try:
            for stream in streams:
                stream.synchronize()
        finally:
            try:
                if executor is not None:
                    executor.close()
            finally:
                for slot in slots:
                    slot.close()
                for stream in streams:
                    stream.close()
                self._slots, self._streams, self._executor = [], [], None
