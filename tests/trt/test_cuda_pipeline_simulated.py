"""The shared CUDA pipeline with the simplest executor (a numpy function of each tile) over ``sim_cuda``.

SIMULATION, not CUDA (see ``sim_cuda``). What no particular executor shows: resources freed after a
failure half-way, a caller's GPU array kept alive exactly while it is in flight, which batches may
replay a CUDA graph, and what GPU arrays below the min batch do. Written from the mutants
``mutmut`` left alive in ``virchow_rt/backends/cuda/pipeline.py``.
"""

from __future__ import annotations

import gc
import types
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from sim_cuda import Memory, fake_cuda

from virchow_rt.backends.cuda import pipeline as cuda_pipeline
from virchow_rt.backends.cuda.device_arrays import DeviceArray
from virchow_rt.backends.cuda.pipeline import Executor, PipelinedBackend
from virchow_rt.backends.engine_cache import INPUT, OUTPUT, TensorSpec
from virchow_rt.contract import ModelInfo
from virchow_rt.errors import BackendError, InputError

S, E, MAX = 2, 3, 4  # tile size, embedding width, max batch


def expected(tiles: np.ndarray) -> np.ndarray:
    """Per tile: the mean pixel plus the column index -> (B, E) float32."""
    return tiles.reshape(len(tiles), -1).astype(np.float32).mean(1, keepdims=True) + np.arange(
        E, dtype=np.float32
    )


class NumpyExecutor(Executor):
    def __init__(self, mem: Memory, min_batch: int) -> None:
        self.mem, self.min_batch, self.max_batch = mem, min_batch, MAX
        self.specs = {
            INPUT: TensorSpec(INPUT, True, np.dtype(np.uint8), (-1, S, S, 3)),
            OUTPUT: TensorSpec(OUTPUT, False, np.dtype(np.float32), (-1, E)),
        }
        self.calls: list[tuple[int, bool]] = []  # (rows, graph) of each enqueue
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def enqueue(self, slot: int, rows: int, addresses: Mapping[str, int], stream: Any, graph: bool) -> None:
        self.calls.append((rows, graph))
        src, dst = addresses[INPUT], addresses[OUTPUT]

        def run() -> None:
            tiles = self.mem.at(src, rows * S * S * 3).reshape(rows, S, S, 3)
            self.mem.at(dst, rows * E * 4)[:] = expected(tiles).view(np.uint8).ravel()

        stream.enqueue(run)


class SimBackend(PipelinedBackend):
    name = "sim"

    def __init__(self, executor: Executor, slots: int = 2) -> None:
        self._start(executor, ModelInfo("stand-in", E, E, S, "fp32", True, "random"), 0, slots)


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Any:
    mem = Memory()
    fake = fake_cuda(mem, [], {})
    made: list[Any] = []

    def tracked(nbytes: int) -> Any:
        if len(made) == sim.fail_at:
            raise BackendError("out of memory (simulated)")
        made.append(fake.DeviceBuffer(nbytes))
        return made[-1]

    buffers = {"PinnedBuffer": tracked, "DeviceBuffer": tracked}
    monkeypatch.setattr(cuda_pipeline, "cuda", types.SimpleNamespace(**{**vars(fake), **buffers}))
    sim = types.SimpleNamespace(mem=mem, made=made, fail_at=-1)
    sim.make = lambda min_batch=1, slots=2: SimBackend(NumpyExecutor(mem, min_batch), slots)
    return sim


def tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def on_gpu(sim: Any, x: np.ndarray, owner: object | None = None) -> DeviceArray:
    ptr = sim.mem.alloc(x.nbytes)
    sim.mem.at(ptr, x.nbytes)[:] = x.ravel()
    return DeviceArray(ptr, x.shape, x.dtype, None, x if owner is None else owner)


@pytest.mark.parametrize("fail_at", range(8))  # 2 slots x (2 pinned + 2 device buffers): fail at each
def test_a_failed_allocation_frees_what_was_made(sim: Any, fail_at: int) -> None:
    sim.fail_at = fail_at
    backend = sim.make()
    assert backend.max_batch == MAX
    with pytest.raises(BackendError, match="out of memory"):
        backend.run(tiles(2))
    assert len(sim.made) == fail_at and all(buf.closed for buf in sim.made)
    sim.fail_at = -1
    np.testing.assert_array_equal(backend.run(tiles(2)), expected(tiles(2)))  # the next run starts afresh
    backend.close()
    assert all(buf.closed for buf in sim.made)


def test_close_before_start_and_after_close(sim: Any) -> None:
    SimBackend.__new__(SimBackend).close()  # never started (a constructor that failed before _start)
    backend = sim.make()
    backend.run(tiles(3))
    executor, streams = backend._executor, list(sim.mem.streams.values())
    backend.close()
    assert sim.made and all(buf.closed for buf in sim.made)
    assert len(streams) == 3 and all(s.closed for s in streams) and executor.closed
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.run(tiles(1))


def test_a_callers_gpu_array_is_kept_alive_while_in_flight(sim: Any) -> None:
    class Owner:  # the producer's array object (a torch tensor, a CuPy array)
        pass

    owners = [Owner() for _ in range(3)]
    refs = [weakref.ref(o) for o in owners]
    batches = [on_gpu(sim, tiles(MAX, seed=i), owner) for i, owner in enumerate(owners)]
    del owners

    def handed_over() -> Any:  # the caller keeps no reference to a batch once it is handed over
        while batches:
            yield batches.pop(0)

    gen = sim.make(slots=2).pipeline(handed_over())
    first = next(gen)  # batches 0 and 1 submitted, then 0 retired to make room: 1 and 2 in flight
    gc.collect()
    assert [r() is not None for r in refs] == [False, True, True]
    rest = list(gen)
    gc.collect()
    assert [r() for r in refs] == [None, None, None] and len(rest) == 2 and first.shape == (MAX, E)


def test_empty_batches_give_float32(sim: Any) -> None:
    outs = list(sim.make().pipeline([tiles(0), tiles(2), tiles(0)]))
    assert [(o.shape, o.dtype) for o in outs] == [
        ((0, E), np.float32),
        ((2, E), np.float32),
        ((0, E), np.float32),
    ]


def test_pipeline_reads_gpu_interface_objects_itself(sim: Any) -> None:
    x = tiles(3)
    dev = on_gpu(sim, x)

    class GpuArray:
        __cuda_array_interface__ = {"data": (dev.ptr, False), "shape": x.shape, "typestr": "|u1",
                                    "version": 3, "strides": None, "stream": None}  # fmt: skip

    (out,) = sim.make().pipeline([GpuArray()])
    np.testing.assert_array_equal(out, expected(x))


def test_gpu_arrays_below_the_min_batch(sim: Any) -> None:
    backend = sim.make(min_batch=2)
    with pytest.raises(InputError, match="of 1 tiles is below the engine's min batch 2"):
        list(backend.pipeline([on_gpu(sim, tiles(1))]))  # read in place, so not padded: refused
    (empty,) = backend.pipeline([on_gpu(sim, tiles(0))])  # nothing to run: no min to meet
    assert empty.shape == (0, E)


def test_only_full_batches_in_the_slots_own_buffer_may_replay_a_graph(sim: Any) -> None:
    backend = sim.make()
    x = tiles(MAX)
    outs = list(backend.pipeline([x, tiles(2), on_gpu(sim, x)]))  # full host, ragged host, full in place
    for got, want in zip(outs, [x, tiles(2), x], strict=True):
        np.testing.assert_array_equal(got, expected(want))
    assert backend._executor.calls == [(MAX, True), (2, False), (MAX, False)]
