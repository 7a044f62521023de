"""``virchow_rt.backends.cuda.api`` without a GPU: errors, host views, GPU arrays, no-device behaviour."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from virchow_rt._deps import is_importable
from virchow_rt.backends.cuda import api as cuda
from virchow_rt.errors import BackendError, InputError

needs_cuda_python = pytest.mark.skipif(not is_importable("cuda.bindings.runtime"), reason="no cuda-python")


@needs_cuda_python
def test_check_turns_cuda_errors_into_backend_errors() -> None:
    from cuda.bindings import runtime as rt

    with pytest.raises(
        BackendError, match=r"cudaMalloc\(64 bytes\) failed with cudaErrorMemoryAllocation.*2"
    ):
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(64 bytes)")
    with pytest.raises(BackendError, match="smaller batch size"):
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation,), "cudaMalloc")
    with pytest.raises(BackendError, match="nvidia-smi"):
        cuda.check((rt.cudaError_t.cudaErrorInsufficientDriver,), "cudaGetDeviceCount")


@needs_cuda_python
def test_check_unpacks_values() -> None:
    from cuda.bindings import runtime as rt

    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok,), "x") is None
    assert cuda.check((ok, 7), "x") == 7
    assert cuda.check((ok, 1, 2), "x") == (1, 2)
    assert cuda.check(ok, "x") is None


def test_host_view_is_a_writable_window_on_memory() -> None:
    raw = (ctypes.c_ubyte * 64)()
    view = cuda.host_view(ctypes.addressof(raw), 64, np.float32, (4, 4))
    view[1, 2] = 3.5
    assert np.frombuffer(raw, np.float32)[6] == 3.5
    assert cuda.host_view(ctypes.addressof(raw), 64).shape == (64,)
    with pytest.raises(BackendError, match="needs 128 bytes"):
        cuda.host_view(ctypes.addressof(raw), 64, np.float32, (4, 8))
    with pytest.raises(BackendError, match="0x0"):
        cuda.host_view(0, 64)


@needs_cuda_python
@pytest.mark.skipif(cuda.device_count() > 0, reason="checks the behaviour on a machine without a GPU")
def test_without_a_gpu_allocations_fail_with_a_clear_error() -> None:
    assert cuda.device_count() == 0
    with pytest.raises(BackendError, match=r"cudaMallocHost\(16 bytes\) failed with cudaError"):
        cuda.PinnedBuffer(16)
    with pytest.raises(BackendError, match="cudaGetDeviceProperties|cudaGetDevice"):
        cuda.device_info(0)


def test_sizes_must_be_positive() -> None:
    with pytest.raises(InputError, match="positive"):
        cuda.PinnedBuffer(0)
    with pytest.raises(InputError, match="positive"):
        cuda.DeviceBuffer(-1)


def test_importing_the_gpu_modules_needs_neither_torch_nor_cuda_python() -> None:
    code = """
import sys
for name in ("torch", "cuda", "cuda.bindings", "cuda.bindings.runtime", "tensorrt", "onnxruntime"):
    sys.modules[name] = None  # importing them now raises ImportError
import virchow_rt.backends.cuda.api, virchow_rt.backends.engine_cache, virchow_rt.backends.tensorrt
import virchow_rt.kernels.cuda_resize, virchow_rt.export.tensorrt_build
from virchow_rt.backends.cuda import api as cuda
assert cuda.device_count() == 0
try:
    cuda.PinnedBuffer(16)
except Exception as err:
    print(type(err).__name__, err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MissingDependency cuda-python is needed to run TensorRT engines")
    assert "pip install 'virchow-rt[cuda]'" in done.stdout
