"""GPU arrays from other libraries: ``__cuda_array_interface__`` read directly, DLPack on the host as numpy.

Real DLPack GPU arrays (torch, CuPy) are read in ``tests/trt/test_cuda_gpu.py`` on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from virchow_rt.backends.cuda import device_arrays
from virchow_rt.backends.cuda.device_arrays import DeviceArray, as_device_array, as_host_array, split_rows
from virchow_rt.errors import InputError


class FakeGpuArray:
    def __init__(self, **interface: object) -> None:
        base = {"data": (0x7F00_0000, False), "shape": (2, 4, 4, 3), "typestr": "|u1", "version": 3}
        self.__cuda_array_interface__ = {**base, **interface}


class DlpackOnly:
    """An array that speaks only DLPack, as JAX's do; ``device`` overrides what it reports."""

    def __init__(self, array: np.ndarray, device: tuple[int, int] | None = None) -> None:
        self.array, self.device = array, device
        self.streams: list[int | None] = []  # the consumer streams it was asked to order its writes before

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self.device is not None:  # a pretend GPU array: note the stream, then export the host memory
            self.streams.append(kwargs.pop("stream", None))
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device or self.array.__dlpack_device__()


def test_gpu_array_interface_is_read() -> None:
    arr = as_device_array(FakeGpuArray(stream=5))
    assert arr is not None
    assert (arr.ptr, arr.shape, arr.dtype, arr.stream) == (0x7F00_0000, (2, 4, 4, 3), np.dtype(np.uint8), 5)
    assert as_device_array(FakeGpuArray(stream=None)).stream is None  # nothing to wait for
    assert as_device_array(FakeGpuArray(version=2)).stream == 1  # no stream entry: legacy default stream
    assert as_device_array(FakeGpuArray(strides=(48, 12, 3, 1))) is not None  # explicit C strides


def test_non_contiguous_or_malformed_gpu_arrays_are_refused() -> None:
    with pytest.raises(InputError, match="not C-contiguous.*contiguous"):
        as_device_array(FakeGpuArray(strides=(3, 96, 24, 1)))
    with pytest.raises(InputError, match="malformed"):
        as_device_array(FakeGpuArray(data=None))


def test_host_arrays_are_not_device_arrays() -> None:
    x = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    assert as_device_array(x) is None
    assert as_device_array(DlpackOnly(x)) is None  # DLPack on the CPU (kDLCPU)
    view = as_host_array(DlpackOnly(x))
    assert isinstance(view, np.ndarray) and np.shares_memory(view, x)  # read in place, not copied
    assert as_host_array(x) is x


def test_dlpack_gpu_arrays_are_read_through_cuda_core() -> None:
    pytest.importorskip("cuda.core.utils", reason="cuda-core (the 'cuda' extra) reads DLPack arrays")
    # an array that claims to be on a GPU but exports host memory: the view cuda.core makes of it has
    # the host pointer, which is what a real GPU array's device pointer would be
    x = np.zeros((3, 4, 4, 3), np.uint8)
    gpu = DlpackOnly(x, device=(2, 1))
    arr = as_device_array(gpu, stream=None)
    assert arr is not None
    assert (arr.ptr, arr.shape, arr.dtype, arr.device) == (x.ctypes.data, x.shape, np.dtype(np.uint8), 1)
    # no consumer stream given: the producer is asked to order its writes before the legacy default
    # stream, which the backend then waits on
    assert gpu.streams == [1] and arr.stream == 1
    gpu = DlpackOnly(x, device=(2, 0))
    assert as_device_array(gpu, stream=0xABC).stream is None and gpu.streams == [0xABC]


def test_dlpack_is_preferred_to_an_interface_without_a_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cuda.core.utils", reason="cuda-core (the 'cuda' extra) reads DLPack arrays")
    x = np.zeros((2, 4, 4, 3), np.uint8)

    class TorchLike(DlpackOnly):  # torch: interface v2 (no stream) and DLPack
        __cuda_array_interface__ = {"data": (0x7F00_0000, False), "shape": (2, 4, 4, 3), "typestr": "|u1",
                                    "version": 2}  # fmt: skip

    torch_like = TorchLike(x, device=(2, 0))
    arr = as_device_array(torch_like)
    assert arr is not None and arr.ptr == x.ctypes.data and torch_like.streams == [1]  # read through DLPack
    monkeypatch.setattr(device_arrays, "is_importable", lambda module: module != "cuda.core.utils")
    arr = as_device_array(TorchLike(x, device=(2, 0)))  # without cuda-core: the interface, legacy stream
    assert arr is not None and (arr.ptr, arr.stream) == (0x7F00_0000, 1)
    monkeypatch.undo()
    TorchLike.__cuda_array_interface__ = {**TorchLike.__cuda_array_interface__, "version": 3, "stream": 7}
    assert as_device_array(TorchLike(x, device=(2, 0))).ptr == 0x7F00_0000  # a v3 stream: the interface
    with pytest.raises(InputError, match="not C-contiguous"):
        as_device_array(DlpackOnly(x[:, :, ::2], device=(2, 0)))


def test_split_rows_views_pieces_and_overlaps_a_short_tail() -> None:
    x = np.zeros((10, 2, 2, 3), np.uint8)
    arr = DeviceArray(0x1000, x.shape, x.dtype, None, x)
    pieces, overlap = split_rows(arr, 8)
    assert [(p.ptr - 0x1000, p.shape[0]) for p in pieces] == [(0, 8), (8 * 12, 2)] and overlap == 0
    pieces, overlap = split_rows(arr, 8, least=4)  # the 2-row tail becomes rows 6-9; drop 2 of its rows
    assert [(p.ptr - 0x1000, p.shape[0]) for p in pieces] == [(0, 8), (6 * 12, 4)] and overlap == 2
    pieces, overlap = split_rows(DeviceArray(0x1000, (3, 2, 2, 3), x.dtype, None, x), 8, least=4)
    assert [p.shape[0] for p in pieces] == [3] and overlap == 0  # fewer rows than least: left to the caller
    assert split_rows(DeviceArray(0x1000, (0, 2, 2, 3), x.dtype, None, x), 8) == ([], 0)


def test_an_old_cuda_core_without_from_dlpack_leaves_torch_tensors_to_the_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys
    import types

    from virchow_rt.errors import MissingDependency

    old = types.ModuleType("cuda.core.utils")  # cuda-core before 1.0: a StridedMemoryView, no from_dlpack
    old.StridedMemoryView = type("StridedMemoryView", (), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda.core.utils", old)
    x = np.zeros((2, 4, 4, 3), np.uint8)

    class TorchLike(DlpackOnly):  # torch: interface v2 (no stream) and DLPack
        __cuda_array_interface__ = {"data": (0x7F00_0000, False), "shape": (2, 4, 4, 3), "typestr": "|u1",
                                    "version": 2}  # fmt: skip

    torch_like = TorchLike(x, device=(2, 0))
    arr = as_device_array(torch_like)  # not an AttributeError: the interface, on the legacy stream
    assert arr is not None and (arr.ptr, arr.shape, arr.stream) == (0x7F00_0000, (2, 4, 4, 3), 1)
    assert torch_like.streams == []  # DLPack was not tried
    with pytest.raises(MissingDependency, match="no StridedMemoryView.from_dlpack.*pip install -U"):
        as_device_array(DlpackOnly(x, device=(2, 0)))  # DLPack alone: nothing to fall back to
