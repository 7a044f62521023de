"""GPU arrays handed in by other libraries and read in place: ``__cuda_array_interface__`` or DLPack.

torch, CuPy and Numba arrays carry ``__cuda_array_interface__``, read here directly. Arrays that only
speak DLPack (JAX, and any of the above through ``__dlpack__``) are read with cuda.core's
``StridedMemoryView``, which hands our consumer stream to the producer as the protocol asks. Only
C-contiguous arrays are accepted: the backends read them as one block. This module imports numpy
alone; cuda.core loads on the first DLPack GPU array. An older cuda-core without
``StridedMemoryView.from_dlpack`` leaves arrays that also carry the interface (torch's) to it, and
refuses DLPack-only ones with the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from virchow_rt._deps import is_importable, optional_import
from virchow_rt.errors import InputError, MissingDependency

LEGACY_STREAM = 1  # the CUDA legacy default stream, as both protocols number it
_DLPACK_CUDA = (2, 13)  # DLDeviceType kDLCUDA and kDLCUDAManaged; kDLCPU is 1


@dataclass(frozen=True)
class DeviceArray:
    """A caller's GPU array: where it is, what it holds, and which stream its writes were queued on."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    #: the stream to wait for before reading: None (nothing), 1 / 2 (legacy / per-thread default) or a handle
    stream: int | None
    owner: object  # keeps the producer's array alive while its memory is in use
    device: int | None = None  # the GPU index when the producer says (DLPack); None for the interface


def _check_contiguous(shape: Sequence[int], strides: Sequence[int] | None, itemsize: int, unit: int) -> None:
    """Refuse non-C-contiguous strides; ``unit``: bytes per stride step (1, or the itemsize)."""
    if strides is None or int(np.prod(shape)) <= 1:
        return
    expected = [itemsize] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        expected[i] = expected[i + 1] * shape[i + 1]
    if tuple(s * unit for s in strides) != tuple(expected):
        raise InputError(
            f"GPU array of shape {tuple(shape)} has strides {tuple(strides)}, not C-contiguous; make it "
            "contiguous first (e.g. .contiguous() in torch, cupy.ascontiguousarray)"
        )


def _from_interface(obj: object, cai: Any) -> DeviceArray:
    try:
        ptr = int(cai["data"][0])
        shape = tuple(int(s) for s in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        # no "stream" entry (interface v2, e.g. torch): the work was queued on the legacy default stream
        stream = cai.get("stream", LEGACY_STREAM)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"malformed __cuda_array_interface__ on {type(obj).__name__}: {err}") from err
    _check_contiguous(shape, strides, dtype.itemsize, 1)
    return DeviceArray(ptr, shape, dtype, None if stream is None else int(stream), obj)


def _dlpack_reader() -> Any:
    """cuda-core's ``StridedMemoryView.from_dlpack``; None where cuda-core is missing or older than it."""
    if not is_importable("cuda.core.utils"):
        return None
    utils = optional_import("cuda.core.utils", "to read GPU arrays passed through DLPack")
    return getattr(getattr(utils, "StridedMemoryView", None), "from_dlpack", None)


def _from_dlpack(obj: object, device: int, stream: int | None) -> DeviceArray:
    consumer = LEGACY_STREAM if stream is None else stream
    try:
        utils = optional_import("cuda.core.utils", "to read GPU arrays passed through DLPack")
        from_dlpack = utils.StridedMemoryView.from_dlpack
    except AttributeError as err:  # cuda-core before StridedMemoryView.from_dlpack
        try:
            have = f"cuda-core {version('cuda-core')}"
        except PackageNotFoundError:
            have = "this cuda-core"
        raise MissingDependency(
            f"{have} cannot read {type(obj).__name__} through DLPack (it has no "
            f"StridedMemoryView.from_dlpack): pip install -U 'virchow-rt[cuda]' (AttributeError: {err})"
        ) from err
    try:
        view = from_dlpack(obj, stream_ptr=consumer)
        shape = tuple(int(s) for s in view.shape)
        dtype = np.dtype(view.dtype)  # a type numpy lacks (bfloat16 without ml_dtypes) fails here
    except (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        raise InputError(f"cannot read {type(obj).__name__} through DLPack: {err}") from err
    strides = None if view.strides is None else tuple(view.strides)
    _check_contiguous(shape, strides, dtype.itemsize, dtype.itemsize)
    # the producer ordered its writes before ``consumer``: wait on it, unless the caller passed its own
    wait = LEGACY_STREAM if stream is None else None
    return DeviceArray(int(view.ptr), shape, dtype, wait, (obj, view), device)


def as_device_array(obj: object, stream: int | None = None) -> DeviceArray | None:
    """Describe ``obj`` if it is a GPU array (``__cuda_array_interface__`` v2/v3, or DLPack), else None.

    DLPack is preferred over an interface without a ``stream`` entry (torch's), whose producer stream is
    unknown: through DLPack the producer orders its own writes before the consumer stream.

    ``stream``: the consumer stream the caller will read on, handed to a DLPack producer so that its
    writes are ordered before it; without one the legacy default stream is used and returned as the
    stream to wait for. Host arrays (numpy, or DLPack on the CPU) give None.
    """
    cai = getattr(obj, "__cuda_array_interface__", None)
    dlpack = hasattr(obj, "__dlpack__")
    # an interface without a stream (v2, torch's) cannot say where the writes were queued; DLPack can,
    # where a cuda-core that reads it is here (else the interface, and the legacy default stream, as before)
    if cai is not None and ("stream" in cai or not dlpack or _dlpack_reader() is None):
        return _from_interface(obj, cai)
    dlpack_device = getattr(obj, "__dlpack_device__", None)
    if dlpack_device is None or not dlpack:
        return None
    device_type, device = dlpack_device()
    if int(device_type) not in _DLPACK_CUDA:
        return None
    return _from_dlpack(obj, int(device), stream)


def split_rows(arr: DeviceArray, most: int, least: int = 1) -> tuple[list[DeviceArray], int]:
    """Views of ``arr`` of at most ``most`` rows each, and how many leading rows of the last one repeat.

    A last piece below ``least`` rows starts earlier instead (overlapping the one before) when ``arr``
    has at least ``least`` rows; drop that many rows from the front of its result.
    """
    n, rest = (arr.shape[0], arr.shape[1:]) if arr.shape else (0, ())
    row = int(np.prod(rest, dtype=np.int64)) * arr.dtype.itemsize
    starts = list(range(0, n, most))
    overlap = max(0, least - (n - starts[-1])) if starts and n >= least else 0
    if overlap:
        starts[-1] -= overlap
    pieces = [
        dataclasses.replace(arr, ptr=arr.ptr + i * row, shape=(min(most, n - i), *rest)) for i in starts
    ]
    return pieces, overlap


def as_host_array(obj: object) -> np.ndarray:
    """A numpy view of a host array: numpy itself, anything with the array interface, or DLPack on the CPU."""
    if isinstance(obj, np.ndarray) or not hasattr(obj, "__dlpack__") or hasattr(obj, "__array_interface__"):
        return np.asarray(obj)
    try:
        return np.from_dlpack(obj)
    except (BufferError, TypeError, RuntimeError) as err:
        raise InputError(f"cannot read {type(obj).__name__} as a host array through DLPack: {err}") from err
