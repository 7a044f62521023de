"""ONNX Runtime I/O binding: the GPU sessions' path, run on the CPU by binding host memory by pointer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from runtime_models import expected_embedding

from virchow_rt.backends.onnxruntime import OnnxRuntimeBackend
from virchow_rt.compare import compare
from virchow_rt.errors import InputError


def _no_plain_runs(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("InferenceSession.run was called: the batch did not go through the I/O binding")


def test_bound_runs_match_plain_runs(models, tissue):
    plain = OnnxRuntimeBackend(models["fp32"], "cpu")
    bound = OnnxRuntimeBackend(models["fp32"], "cpu", io_binding=True)
    assert (plain.gpu, plain.io_binding, bound.io_binding) == (None, False, True)
    bound._session.run = _no_plain_runs
    for tiles in (tissue[:5], tissue[1:9:2], tissue[:1]):  # contiguous, strided, a single tile
        out = bound.run(tiles)
        assert out.dtype == np.float32 and out.shape == (len(tiles), 16)
        np.testing.assert_array_equal(out, plain.run(tiles))
        np.testing.assert_allclose(out, expected_embedding(tiles), atol=1e-5)


def test_dlpack_host_arrays_run(models, tissue):
    class HostDlpack:  # a CPU tensor that speaks only DLPack
        def __dlpack__(self, **kwargs: Any) -> Any:
            return tissue[:3].__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return tissue.__dlpack_device__()

    backend = OnnxRuntimeBackend(models["fp32"], "cpu")
    np.testing.assert_allclose(backend.run(HostDlpack()), expected_embedding(tissue[:3]), atol=1e-5)


def test_gpu_arrays_on_a_cpu_session_say_how_to_fix(models):
    class GpuArray:
        __cuda_array_interface__ = {"data": (0x7F00_0000, False), "shape": (2, 224, 224, 3),
                                    "typestr": "|u1", "version": 3}  # fmt: skip

    backend = OnnxRuntimeBackend(models["fp32"], "cpu", io_binding=True)
    with pytest.raises(InputError, match=r"GPU array.*runs on the CPU.*\.cpu\(\)\.numpy\(\)"):
        backend.run(GpuArray())


@pytest.mark.gpu
def test_cuda_session_reads_gpu_arrays_in_place(models, tissue):
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu with the CUDA provider and torch with CUDA")
    backend = OnnxRuntimeBackend(models["fp32"], "cuda")
    assert (backend.name, backend.gpu, backend.io_binding) == ("onnxruntime-cuda", 0, True)
    gpu = torch.from_numpy(tissue[:6]).cuda()
    # the CUDA provider may run fp32 MatMuls in TF32 (10-bit mantissa): ~1e-3 relative, not 1e-4 absolute
    for tiles in (gpu, tissue[:6]):  # read in place, and copied in from the host
        result = compare(backend.run(tiles), expected_embedding(tissue[:6]), 0.9999)
        assert result, str(result)
