"""``virchow_rt.backends.cuda.api`` and the NVRTC resize kernel on a real GPU (skipped without one)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from virchow_rt.backends.cuda import api as cuda
from virchow_rt.errors import BackendError

pytestmark = pytest.mark.gpu


def test_device_info() -> None:
    assert cuda.device_count() >= 1
    info = cuda.device_info(0)
    assert info.name and re.fullmatch(r"\d+\.\d+", info.compute_capability)
    assert info.total_memory_bytes > 1 << 30 and info.multiprocessors > 0


def test_pinned_device_round_trip_on_streams_ordered_by_events() -> None:
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    with (
        cuda.PinnedBuffer(data.nbytes) as host_in,
        cuda.PinnedBuffer(data.nbytes) as host_out,
        cuda.DeviceBuffer(data.nbytes) as a,
        cuda.DeviceBuffer(data.nbytes) as b,
        cuda.Stream() as copy_in,
        cuda.Stream() as copy_out,
        cuda.Event() as copied,
    ):
        host_in.view()[:] = data
        cuda.copy_async(a.ptr, host_in.ptr, data.nbytes, "h2d", copy_in)
        cuda.copy_async(b.ptr, a.ptr, data.nbytes, "d2d", copy_in)
        copied.record(copy_in)
        copy_out.wait(copied)  # the other stream reads b only after copy_in wrote it
        cuda.copy_async(host_out.ptr, b.ptr, data.nbytes, "d2h", copy_out)
        done = cuda.Event()
        done.record(copy_out)
        done.synchronize()
        assert done.done()
        np.testing.assert_array_equal(host_out.view(), data)
        done.close()


def test_events_time_device_work() -> None:
    """Device time grows with the work queued, and lies within the host's time around the same call."""
    n = 64 << 20
    with cuda.DeviceBuffer(n) as a, cuda.DeviceBuffer(n) as b, cuda.Stream() as stream:
        timer = cuda.EventTimer(stream)

        def copies(count: int) -> float:
            return timer.measure(
                lambda: [cuda.copy_async(b.ptr, a.ptr, n, "d2d", stream) for _ in range(count)]
            )

        copies(2)  # warm-up
        host = time.perf_counter()
        four = copies(4)
        host = time.perf_counter() - host
        sixteen = copies(16)
    assert 0 < four <= host  # the events bracket the work inside the host's call: seconds, not ms
    assert 2 < sixteen / four < 8, (four, sixteen)  # 4x the copies: about 4x the device time


def test_graph_capture_replays_the_work() -> None:
    data = np.arange(4096, dtype=np.uint8)
    with (
        cuda.PinnedBuffer(data.nbytes) as host,
        cuda.DeviceBuffer(data.nbytes) as a,
        cuda.DeviceBuffer(data.nbytes) as b,
        cuda.Stream() as stream,
    ):
        host.view()[:] = data
        cuda.copy_async(a.ptr, host.ptr, data.nbytes, "h2d", stream)
        stream.synchronize()

        def enqueue() -> bool:
            cuda.copy_async(b.ptr, a.ptr, data.nbytes, "d2d", stream)
            return True

        graph = cuda.capture_graph(stream, enqueue)
        assert graph is not None
        host.view()[:] = 0
        with graph:
            graph.launch(stream)
            cuda.copy_async(host.ptr, b.ptr, data.nbytes, "d2h", stream)
            stream.synchronize()
        np.testing.assert_array_equal(host.view(), data)
        assert cuda.capture_graph(stream, lambda: False) is None  # refused capture: no graph, no error left


def test_resources_are_freed_once() -> None:
    buf = cuda.DeviceBuffer(1024)
    buf.close()
    buf.close()
    assert buf.closed
    with pytest.raises(BackendError, match="used after close"):
        _ = buf.ptr


@pytest.mark.parametrize(
    ("h", "w"), [(448, 448), (300, 500), (1000, 700), (112, 112), (231, 517), (224, 224)]
)
def test_nvrtc_resize_kernel_matches_the_cpu_reference(h: int, w: int) -> None:
    from virchow_rt.kernels.cuda_resize import CudaResizer
    from virchow_rt.kernels.resize import resize_tiles
    from virchow_rt.tissue import tissue_tiles

    tissue = np.tile(tissue_tiles(1, 512, seed=2)[0], (2, 2, 1))[:h, :w]
    noise = np.random.default_rng(1).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    tiles = np.ascontiguousarray(np.concatenate([tissue[None], noise]))
    with CudaResizer(224) as resizer:
        got = resizer(tiles)
        again = resizer(tiles[:2])  # tables and scratch reused
    want = resize_tiles(tiles, 224)
    assert got.shape == want.shape == (4, 224, 224, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
    np.testing.assert_array_equal(again, got[:2])


@pytest.mark.parametrize("library", ["torch", "cupy"])
def test_dlpack_only_gpu_arrays_are_read_in_place(library: str) -> None:
    from virchow_rt.backends.cuda.device_arrays import as_device_array

    lib = pytest.importorskip(library)
    if library == "torch":
        if not lib.cuda.is_available():
            pytest.skip("torch here has no CUDA")
        x = lib.arange(2 * 224 * 224 * 3, device="cuda").to(lib.uint8).reshape(2, 224, 224, 3)
        ptr = x.data_ptr()
    else:
        x = lib.arange(2 * 224 * 224 * 3, dtype=lib.uint8).reshape(2, 224, 224, 3)
        ptr = x.data.ptr

    class DlpackOnly:  # hides __cuda_array_interface__, as a JAX array would not have one
        def __dlpack__(self, **kwargs: object) -> object:
            return x.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return x.__dlpack_device__()

    arr = as_device_array(DlpackOnly())
    assert arr is not None
    assert (arr.ptr, arr.shape, arr.dtype, arr.device) == (ptr, (2, 224, 224, 3), np.dtype(np.uint8), 0)


def test_embedder_resizes_on_the_gpu_like_the_cpu() -> None:
    from virchow_rt.backends.base import Backend
    from virchow_rt.contract import ModelInfo
    from virchow_rt.embed import Embedder
    from virchow_rt.tissue import tissue_tiles

    class Echo(Backend):  # returns the tiles it was given, flattened: the embedding is the model input
        name, gpu = "echo", 0
        info = ModelInfo("unknown", 224 * 224 * 3, 3, 224, "fp32", True, "random")

        def run(self, tiles: np.ndarray) -> np.ndarray:
            return tiles.reshape(len(tiles), -1).astype(np.float32)

    tiles = tissue_tiles(10, 448, seed=1)  # 40x tiles for a 20x model
    with Embedder(Echo(), batch_size=4) as gpu, Embedder(Echo(), batch_size=4, resize="cpu") as cpu:
        assert (gpu.resize, cpu.resize) == ("gpu", "cpu")
        np.testing.assert_array_equal(gpu.embed(tiles), cpu.embed(tiles))
