"""A thin, checked layer over cuda-python's runtime API (``cuda.bindings.runtime``). No torch.

Every call goes through :func:`check`, which turns a non-zero ``cudaError_t`` (or ``CUresult`` /
``nvrtcResult``) into a :class:`~virchow_rt.errors.BackendError` that names the call and the error.
Resources have explicit lifetimes: :class:`PinnedBuffer`, :class:`DeviceBuffer`, :class:`Stream`,
:class:`Event` and :class:`GraphExec` are freed exactly once by ``close()`` (or ``with``); a
finalizer is only a safety net. cuda-python is imported on first use through
:func:`~virchow_rt._deps.optional_import`, so importing this module is free.

The same calls NVIDIA's TensorRT Python samples use (``samples/python/common_runtime.py``):
``cudaMallocHost``/``cudaMalloc``/``cudaMemcpyAsync`` on streams, events for ordering and timing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, TypeVar

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.errors import BackendError, InputError, MissingDependency

PURPOSE = "to run TensorRT engines and GPU kernels"

# cudaError_t codes that mean "this machine has no usable CUDA GPU" rather than a bug
_NO_DEVICE = {35: "the NVIDIA driver is older than this CUDA runtime", 100: "no CUDA GPU is visible"}
_OUT_OF_MEMORY = 2
_NOT_READY = 600


def cudart() -> ModuleType:
    """``cuda.bindings.runtime``, or :class:`MissingDependency` saying how to install cuda-python."""
    return optional_import("cuda.bindings.runtime", PURPOSE)


def _error_text(err: Any) -> str:
    """``name: description`` of a cuda-python error enum, whichever library it came from."""
    kind = type(err).__name__
    try:
        if kind == "cudaError_t":
            rt = cudart()
            name, desc = rt.cudaGetErrorName(err)[1], rt.cudaGetErrorString(err)[1]
        elif kind == "CUresult":
            drv = optional_import("cuda.bindings.driver", PURPOSE)
            name, desc = drv.cuGetErrorName(err)[1], drv.cuGetErrorString(err)[1]
        else:  # nvrtcResult: one string says it all
            name, desc = optional_import("cuda.bindings.nvrtc", PURPOSE).nvrtcGetErrorString(err)[1], b""
    except Exception:  # noqa: BLE001 - a failure to describe an error must not hide the error itself
        return repr(err)
    text = name.decode() if isinstance(name, bytes) else str(name)
    desc = desc.decode() if isinstance(desc, bytes) else str(desc)
    return f"{text}: {desc}" if desc else text


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python result ``(error, *values)``; raise :class:`BackendError` unless error is 0.

    Returns ``None``, the single value, or the tuple of values. ``call`` names what was attempted,
    with its arguments (it goes into the message).
    """
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    code = int(err)
    if code != 0:
        hint = ""
        if type(err).__name__ == "cudaError_t" and code in _NO_DEVICE:
            hint = f" ({_NO_DEVICE[code]}; check `nvidia-smi` and the driver, or use ONNX Runtime on the CPU)"
        elif type(err).__name__ == "cudaError_t" and code == _OUT_OF_MEMORY:
            hint = " (out of GPU memory: use a smaller batch size or close other GPU processes)"
        raise BackendError(f"{call} failed with {_error_text(err)} (code {code}){hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


_O = TypeVar("_O", bound="_Owned")


class _Owned:
    """A CUDA object released exactly once, by ``close()`` or ``with``; ``__del__`` is a safety net."""

    _handle: Any = None
    _closed = True

    def _release(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def _live(self) -> Any:
        if self._closed:
            raise BackendError(f"{type(self).__name__} used after close(); create a new one")
        return self._handle

    def close(self) -> None:
        """Free the CUDA resource. Safe to call twice; arrays viewing a freed buffer must not be used."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # only if the owner forgot close(); at interpreter exit cuda-python may already be gone
        with contextlib.suppress(Exception):
            self.close()


def host_view(
    ptr: int, nbytes: int, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """A writable numpy array over ``nbytes`` of host memory at address ``ptr`` (no copy, no ownership)."""
    if ptr == 0 or nbytes < 0:
        raise BackendError(f"cannot view host memory at address {ptr:#x} of {nbytes} bytes")
    raw = np.frombuffer(memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B"), dtype=np.uint8)
    dt = np.dtype(dtype)
    count = nbytes // dt.itemsize if shape is None else int(np.prod(shape, dtype=np.int64))
    if count * dt.itemsize > nbytes:
        raise BackendError(
            f"a {dt} array of shape {shape} needs {count * dt.itemsize} bytes; the buffer has {nbytes}"
        )
    arr: np.ndarray = raw[: count * dt.itemsize].view(dt)
    return arr if shape is None else arr.reshape(shape)


class PinnedBuffer(_Owned):
    """Page-locked host memory (``cudaMallocHost``): the only kind a copy can overlap with compute from."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise InputError(f"pinned buffer size must be positive, got {nbytes} bytes")
        self.nbytes = int(nbytes)
        self._handle = int(
            check(cudart().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes} bytes)")
        )
        self._closed = False

    @property
    def ptr(self) -> int:
        return int(self._live())

    def view(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A numpy view of the buffer (no copy). Invalid after :meth:`close`."""
        return host_view(self.ptr, self.nbytes, dtype, shape)

    def _release(self) -> None:
        check(cudart().cudaFreeHost(self._handle), "cudaFreeHost")


class DeviceBuffer(_Owned):
    """Device memory (``cudaMalloc``)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise InputError(f"device buffer size must be positive, got {nbytes} bytes")
        self.nbytes = int(nbytes)
        self._handle = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))
        self._closed = False

    @property
    def ptr(self) -> int:
        return int(self._live())

    def _release(self) -> None:
        check(cudart().cudaFree(self._handle), "cudaFree")


class Stream(_Owned):
    """A CUDA stream, non-blocking by default (as trtexec's): it neither waits for nor delays work that
    other code queues on the legacy default stream, and graph capture on it is not disturbed by it."""

    def __init__(self, blocking: bool = False) -> None:
        rt = cudart()
        flags = rt.cudaStreamDefault if blocking else rt.cudaStreamNonBlocking
        self._handle = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self._closed = False

    @property
    def handle(self) -> Any:
        """The ``cudaStream_t`` cuda-python object."""
        return self._live()

    @property
    def ptr(self) -> int:
        """The stream as an integer (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self._live())

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for ``event`` (no host blocking)."""
        check(cudart().cudaStreamWaitEvent(self.handle, event.handle, 0), "cudaStreamWaitEvent")

    def _release(self) -> None:
        check(cudart().cudaStreamDestroy(self._handle), "cudaStreamDestroy")


def _stream_arg(stream: Stream | int | None) -> Any:
    """A ``cudaStream_t`` for cuda-python from a :class:`Stream`, a raw handle, or None (legacy stream 0)."""
    if isinstance(stream, Stream):
        return stream.handle
    return cudart().cudaStream_t(int(stream or 0))


class Event(_Owned):
    """A CUDA event: ordering between streams, host waits, and (``timing=True``) elapsed times."""

    def __init__(self, timing: bool = False) -> None:
        rt = cudart()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self._handle = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        self.timing = timing
        self._closed = False

    @property
    def handle(self) -> Any:
        return self._live()

    def record(self, stream: Stream | int | None = None) -> None:
        """Mark the point reached by ``stream`` (a :class:`Stream`, a raw handle, or None: stream 0)."""
        check(cudart().cudaEventRecord(self.handle, _stream_arg(stream)), "cudaEventRecord")

    def synchronize(self) -> None:
        """Block the host until the recorded work is done."""
        check(cudart().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def done(self) -> bool:
        """True when the recorded work is finished (never blocks)."""
        err = cudart().cudaEventQuery(self.handle)
        err = err[0] if isinstance(err, tuple) else err
        if int(err) == _NOT_READY:
            return False
        check((err,), "cudaEventQuery")
        return True

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds of device time from this event to ``end`` (both recorded, both ``timing=True``)."""
        if not (self.timing and end.timing):
            raise InputError("elapsed time needs two events created with timing=True")
        return float(check(cudart().cudaEventElapsedTime(self.handle, end.handle), "cudaEventElapsedTime"))

    def _release(self) -> None:
        check(cudart().cudaEventDestroy(self._handle), "cudaEventDestroy")


_KINDS = {"h2d": "cudaMemcpyHostToDevice", "d2h": "cudaMemcpyDeviceToHost", "d2d": "cudaMemcpyDeviceToDevice"}


def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream) -> None:
    """Queue a copy of ``nbytes`` on ``stream``; ``kind``: "h2d", "d2h" or "d2d" (overlaps only if pinned)."""
    if kind not in _KINDS:
        raise InputError(f"copy kind {kind!r} is not one of {', '.join(_KINDS)}")
    if nbytes == 0:
        return
    rt = cudart()
    check(
        rt.cudaMemcpyAsync(dst, src, nbytes, getattr(rt.cudaMemcpyKind, _KINDS[kind]), stream.handle),
        f"cudaMemcpyAsync({kind}, {nbytes} bytes)",
    )


class GraphExec(_Owned):
    """An instantiated CUDA graph (``cudaGraphExec_t``) replayed with :meth:`launch`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._closed = False

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._live(), stream.handle), "cudaGraphLaunch")

    def _release(self) -> None:
        check(cudart().cudaGraphExecDestroy(self._handle), "cudaGraphExecDestroy")


def capture_graph(stream: Stream, enqueue: Callable[[], bool]) -> GraphExec | None:
    """Capture the work ``enqueue()`` queues on ``stream`` into a graph; None when it cannot be captured.

    ``enqueue`` returns False when the work refused capture (TensorRT's ``execute_async_v3`` does for
    engines with operations not allowed in a graph). The caller should have run the same work once
    before capturing, so one-time initialisation is not captured (trtexec does the same).
    """
    rt = cudart()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
    ok = False
    try:
        ok = bool(enqueue())
    finally:  # end the capture whatever happened, or the stream stays unusable
        err, graph = rt.cudaStreamEndCapture(stream.handle)[:2]
        captured = ok and int(err) == 0 and graph is not None
        if not captured:
            if int(err) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()  # clear a sticky capture error so later calls are not blamed for it
    if not captured:
        return None
    try:
        exec_handle = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
    finally:
        check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
    return GraphExec(exec_handle)


class EventTimer:
    """Device time of the work a callable queues on ``stream`` (default: legacy stream 0), via CUDA events.

    Pass the stream the work runs on (e.g. a backend's compute stream). With the default, work on
    other non-blocking streams is bracketed only if ``fn`` waits for it, as ``Backend.run`` does, so
    the figure is then the device-side span of the whole call. Used by
    :mod:`virchow_rt.benchmark.timing` for compute-only figures.
    """

    def __init__(self, stream: Stream | int | None = None) -> None:
        self.stream = stream

    def measure(self, fn: Callable[[], Any]) -> float:
        """Seconds of device time between events recorded before and after ``fn()``."""
        with Event(timing=True) as start, Event(timing=True) as end:
            start.record(self.stream)
            fn()
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_ms(end) / 1e3


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: the GPU's name and compute capability ("8.9")."""

    index: int
    name: str
    compute_capability: str
    total_memory_bytes: int
    multiprocessors: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "total_memory_bytes": self.total_memory_bytes,
            "multiprocessors": self.multiprocessors,
        }


def device_count() -> int:
    """Number of visible CUDA GPUs; 0 when there is none, no driver, or cuda-python is missing."""
    try:
        err, count = cudart().cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - any failure here means "no usable GPU"
        return 0
    return int(count) if int(err) == 0 else 0


def current_device() -> int:
    return int(check(cudart().cudaGetDevice(), "cudaGetDevice"))


def set_device(index: int) -> None:
    """Make GPU ``index`` current for this thread (and its primary context, for driver-API calls)."""
    check(cudart().cudaSetDevice(int(index)), f"cudaSetDevice({index})")


def device_info(index: int | None = None) -> DeviceInfo:
    """Name, compute capability, memory and SM count of GPU ``index`` (default: the current one)."""
    idx = current_device() if index is None else int(index)
    prop = check(cudart().cudaGetDeviceProperties(idx), f"cudaGetDeviceProperties({idx})")
    raw_name = prop.name
    name = raw_name.split(b"\0", 1)[0].decode() if isinstance(raw_name, bytes) else str(raw_name)
    return DeviceInfo(
        index=idx,
        name=name,
        compute_capability=f"{int(prop.major)}.{int(prop.minor)}",
        total_memory_bytes=int(prop.totalGlobalMem),
        multiprocessors=int(prop.multiProcessorCount),
    )


NVRTC_FIX = "pip install 'virchow-rt[cuda]' (brings nvidia-cuda-nvrtc; on CUDA 12: nvidia-cuda-nvrtc-cu12)"


def load_nvrtc() -> Any:
    """cuda-python's NVRTC bindings with the NVRTC library loaded, or :class:`MissingDependency`.

    cuda-python finds ``libnvrtc`` on the first call (cuda.pathfinder), not at import: a missing library
    surfaces there as a ``RuntimeError``, turned here into the one error virchow-rt's callers handle.
    """
    nvrtc = optional_import("cuda.bindings.nvrtc", "to compile the GPU resize kernel")
    try:
        check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except (RuntimeError, OSError) as err:  # DynamicLibNotFoundError is a RuntimeError
        raise MissingDependency(
            f"the NVRTC library is needed to compile the GPU resize kernel and was not found "
            f"({type(err).__name__}: {err}): {NVRTC_FIX}"
        ) from err
    return nvrtc
