"""The TensorRT backend's pipelined executor, with the CUDA layer and the engine replaced by numpy stand-ins.

SIMULATION, not TensorRT: buffers are numpy byte arrays at fake addresses, work on a stream runs only
when a synchronize or a wait forces it (``sim_cuda``), and the "engine" is a known numpy function of
each tile. This checks the data flow and the ordering of :meth:`TensorRTBackend.pipeline` (each batch
through the right slot, results in order, ragged and empty batches, GPU arrays read in place, per-slot
CUDA graphs, every wait in its place: a missing one gives wrong numbers). TensorRT's own results are
checked in ``test_trt_engine_real.py`` on a GPU.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sim_cuda import Memory, fake_cuda

from virchow_rt.backends import tensorrt as tb
from virchow_rt.backends.cuda import pipeline as cuda_pipeline
from virchow_rt.backends.cuda.device_arrays import DeviceArray
from virchow_rt.contract import ModelInfo
from virchow_rt.errors import BackendError, InputError, ModelFileError
from virchow_rt.files import sha256_file

S, E = 4, 6  # tile size and embedding width of the stand-in model


def expected(tiles: np.ndarray) -> np.ndarray:
    """The stand-in engine: per tile, the mean pixel plus the column index -> (B, E) float32."""
    flat = tiles.reshape(len(tiles), S * S * 3).astype(np.float32)
    return flat.mean(1, keepdims=True) + np.arange(E, dtype=np.float32)


class FakeContext:
    """Stand-in for IExecutionContext: name-based addresses and shapes, a numpy 'engine'."""

    def __init__(self, mem: Memory, log: list[tuple[Any, ...]], capture: dict[str, Any]) -> None:
        self.mem, self.log, self.capture = mem, log, capture
        self.addr: dict[str, int] = {}
        self.shape: tuple[int, ...] = ()
        self.scratch: tuple[int, int] | None = None

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.scratch = (ptr, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert name == "tiles"
        self.shape = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if ptr % 256:  # TensorRT's rule
            return False
        self.addr[name] = ptr
        return True

    def compute(self, addr: dict[str, int], shape: tuple[int, ...]) -> None:
        b = shape[0]
        tiles = self.mem.at(addr["tiles"], b * S * S * 3).reshape(b, S, S, 3)
        out = expected(tiles)
        self.mem.at(addr["embedding"], out.nbytes)[:] = out.view(np.uint8).ravel()

    def execute_async_v3(self, stream: int) -> bool:
        assert self.scratch is not None, "context ran without its scratch memory"
        # TensorRT reads the addresses and shape when the work is queued; it runs when the stream gets there
        addr, shape = dict(self.addr), self.shape
        if self.capture.get("on"):  # recorded into the graph, not run
            self.capture["captured"] = (self, addr, shape)
            return True

        def run() -> None:
            self.log.append(("execute", shape[0]))
            self.compute(addr, shape)

        self.mem.stream(stream).enqueue(run)
        return True


def fake_tensorrt(mem: Memory, log: list[tuple[Any, ...]], capture: dict[str, Any], min_batch: int) -> Any:
    """A module with what TensorRTExecutor touches: Runtime, ILogger, an engine of two tensors, contexts."""
    io = [("tiles", "UINT8", "INPUT", (-1, S, S, 3)), ("embedding", "FLOAT", "OUTPUT", (-1, E))]
    named = types.SimpleNamespace

    class Engine:
        num_io_tensors = len(io)
        device_memory_size_v2 = 4096

        def __init__(self) -> None:
            self.contexts: list[FakeContext] = []

        def get_tensor_name(self, i: int) -> str:
            return io[i][0]

        def _row(self, name: str) -> tuple[Any, ...]:
            return next(row for row in io if row[0] == name)

        def get_tensor_dtype(self, name: str) -> Any:
            return named(name=self._row(name)[1])

        def get_tensor_mode(self, name: str) -> Any:
            return named(name=self._row(name)[2])

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._row(name)[3]

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
            return (min_batch, S, S, 3), (8, S, S, 3), (8, S, S, 3)

        def create_execution_context(self, strategy: Any) -> FakeContext:
            assert strategy == "USER_MANAGED"
            self.contexts.append(FakeContext(mem, log, capture))
            return self.contexts[-1]

    class Runtime:
        engine_host_code_allowed = False

        def __init__(self, logger: Any) -> None:
            self.engine = Engine()

        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            assert plan == b"plan"
            capture.setdefault("deserialized", []).append(self.engine_host_code_allowed)
            return self.engine

    class ILogger:
        def __init__(self) -> None:
            pass

    strategy = named(USER_MANAGED="USER_MANAGED")
    return named(
        __name__="tensorrt", Runtime=Runtime, ILogger=ILogger, ExecutionContextAllocationStrategy=strategy
    )


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A TensorRTBackend (max batch 8) over the stand-ins; ``sim.mem``, ``sim.log`` for inspection."""
    mem, log, capture = Memory(), [], {}
    fake = fake_cuda(mem, log, capture)
    monkeypatch.setattr(tb, "cuda", fake)
    monkeypatch.setattr(cuda_pipeline, "cuda", fake)

    def make(slots: int = 3, graphs: bool = False, min_batch: int = 1, **options: Any) -> tb.TensorRTBackend:
        info = ModelInfo("stand-in", E, E // 2, S, "fp16", True, "random")
        monkeypatch.setattr(tb, "import_tensorrt", lambda name: fake_tensorrt(mem, log, capture, min_batch))
        return tb.TensorRTBackend.from_serialized(b"plan", info, slots=slots, cuda_graphs=graphs, **options)

    return types.SimpleNamespace(make=make, mem=mem, log=log, capture=capture)


def tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


@pytest.mark.parametrize("slots", [2, 3])
def test_run_splits_at_max_batch_and_keeps_order(sim: Any, slots: int) -> None:
    x = tiles(33)
    out = sim.make(slots).run(x)
    assert out.shape == (33, E) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected(x))
    assert [e[1] for e in sim.log if e[0] == "execute"] == [8, 8, 8, 8, 1]


def test_pipeline_ragged_and_empty_batches(sim: Any) -> None:
    sizes = [8, 3, 8, 1, 0, 5, 8]
    batches = [tiles(n, seed=i) for i, n in enumerate(sizes)]
    outs = list(sim.make().pipeline(iter(batches)))
    assert [len(o) for o in outs] == sizes
    for batch, out in zip(batches, outs, strict=True):
        np.testing.assert_array_equal(out, expected(batch))
    h2d = [e[2] for e in sim.log if e[:2] == ("copy", "h2d")]
    assert h2d == [n * S * S * 3 for n in sizes if n]  # only the rows given are copied


def test_batches_below_the_profile_min_run_padded(sim: Any) -> None:
    sizes = [8, 3, 1]
    batches = [tiles(n, seed=i) for i, n in enumerate(sizes)]
    backend = sim.make(min_batch=4)
    for batch, out in zip(batches, backend.pipeline(batches), strict=True):
        np.testing.assert_array_equal(out, expected(batch))  # the padding's outputs are dropped
    assert [e[1] for e in sim.log if e[0] == "execute"] == [8, 4, 4]
    assert [e[2] for e in sim.log if e[:2] == ("copy", "d2h")] == [n * E * 4 for n in sizes]
    x = tiles(2)
    ptr = sim.mem.alloc(x.nbytes)
    small = DeviceArray(ptr, x.shape, x.dtype, None, x)
    with pytest.raises(InputError, match="2 tiles is below the engine's min batch 4.*profile min of 1"):
        list(backend.pipeline([small]))


@pytest.mark.parametrize(("n", "runs"), [(10, [8, 4]), (18, [8, 8, 4])])
def test_gpu_arrays_below_the_profile_min_are_read_with_an_overlap(sim: Any, n: int, runs: list[int]) -> None:
    x = tiles(n)  # max 8, min 4: 10 -> [0, 8) and [6, 10), the repeated rows 6-7 dropped; 18 -> ... [14, 18)
    ptr = sim.mem.alloc(x.nbytes)
    sim.mem.at(ptr, x.nbytes)[:] = x.ravel()
    out = sim.make(min_batch=4).run(DeviceArray(ptr, x.shape, x.dtype, None, x))
    np.testing.assert_array_equal(out, expected(x))
    assert [e[1] for e in sim.log if e[0] == "execute"] == runs


def test_zero_tiles_give_an_empty_float32_array(sim: Any) -> None:
    out = sim.make().run(tiles(0))
    assert out.shape == (0, E) and out.dtype == np.float32 and not sim.log


def test_time_compute_runs_the_engine_alone(sim: Any) -> None:
    backend = sim.make(min_batch=4)
    samples = backend.time_compute(tiles(3), repeats=3, warmup=2)
    assert samples == [1e-3] * 3
    # one copy in, then 2 + 3 runs of the engine alone (3 tiles padded to the min of 4), each inside its
    # timer on the compute stream (the first waits for the copy), nothing copied out
    runs = [("timed",), ("execute", 4)]
    assert [e[:2] for e in sim.log] == [("timed",), ("copy", "h2d"), ("execute", 4)] + runs * 4
    np.testing.assert_array_equal(backend.run(tiles(2)), expected(tiles(2)))  # the backend is free again
    sim.log.clear()
    assert backend.time_compute(tiles(8)) == [1e-3] * 10  # defaults: 10 timed after 2 warm-up runs
    assert [e for e in sim.log if e[0] == "execute"] == [("execute", 8)] * 12
    assert backend.time_compute(tiles(1), repeats=1, warmup=0) == [1e-3]
    for bad, match in [({"repeats": 0}, "repeats 0"), ({"warmup": -1}, "warmup -1 >= 0")]:
        with pytest.raises(InputError, match=match):
            backend.time_compute(tiles(1), **bad)
    with pytest.raises(InputError, match="^time_compute needs at least one tile$"):
        backend.time_compute(tiles(0))


def test_results_are_fresh_arrays(sim: Any) -> None:
    backend = sim.make(slots=2)
    outs = list(backend.pipeline([tiles(8, seed=i) for i in range(5)]))
    pinned = [slot.host_out.view(np.uint8) for slot in backend._slots]
    assert not any(np.shares_memory(o, p) for o in outs for p in pinned)
    np.testing.assert_array_equal(outs[0], expected(tiles(8, seed=0)))  # not overwritten by batch 2 or 4


def test_gpu_arrays_are_read_in_place(sim: Any) -> None:
    x = tiles(5)
    ptr = sim.mem.alloc(x.nbytes)
    sim.mem.at(ptr, x.nbytes)[:] = x.ravel()

    class GpuArray:  # what CuPy / torch expose
        __cuda_array_interface__ = {"data": (ptr, False), "shape": x.shape, "typestr": "|u1", "version": 3,
                                    "strides": None, "stream": 7}  # fmt: skip

    backend = sim.make()
    out = backend.run(GpuArray())
    np.testing.assert_array_equal(out, expected(x))
    assert not [e for e in sim.log if e[:2] == ("copy", "h2d")]  # no host round trip
    assert backend._slots[0].h2d_done.recorded_on == 7  # compute waited for the producer's stream
    assert backend._slots[0].held is None  # the caller's array is released once its result is out


def test_dlpack_host_arrays_are_copied_like_numpy(sim: Any) -> None:
    x = tiles(5)

    class HostDlpack:  # a CPU tensor that speaks only DLPack
        def __dlpack__(self, **kwargs: Any) -> Any:
            return x.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return x.__dlpack_device__()

    np.testing.assert_array_equal(sim.make().run(HostDlpack()), expected(x))


def test_gpu_arrays_on_another_device_are_refused(sim: Any) -> None:
    x = tiles(2)
    other = DeviceArray(sim.mem.alloc(x.nbytes), x.shape, x.dtype, None, x, device=1)
    with pytest.raises(InputError, match="device 1 but this tensorrt backend runs on device 0"):
        list(sim.make().pipeline([other]))


def test_cuda_graphs_are_per_slot_and_only_for_full_batches(sim: Any) -> None:
    batches = [tiles(8, seed=i) for i in range(7)] + [tiles(3, seed=99)]
    backend = sim.make(slots=3, graphs=True)
    outs = list(backend.pipeline(batches))
    for batch, out in zip(batches, outs, strict=True):
        np.testing.assert_array_equal(out, expected(batch))
    # each slot's first full batch runs normally and is captured; later full batches replay their slot's
    # graph; the ragged last batch runs normally
    ran = [e[0] for e in sim.log if e[0] in ("execute", "graph")]
    assert ran == ["execute"] * 3 + ["graph"] * 4 + ["execute"]


def test_graphs_are_recaptured_after_a_ragged_batch(sim: Any) -> None:
    sizes = [8, 8, 8, 3, 8, 8, 8, 8]
    batches = [tiles(n, seed=i) for i, n in enumerate(sizes)]
    backend = sim.make(slots=3, graphs=True)
    for batch, out in zip(batches, backend.pipeline(batches), strict=True):
        np.testing.assert_array_equal(out, expected(batch))
    ran = [e[0] for e in sim.log if e[0] in ("execute", "graph")]
    # slots 0-2 captured; the ragged batch runs on slot 0's context and drops only its graph; slots 1 and
    # 2 replay theirs, slot 0 recaptures, slot 1 replays again
    assert ran == ["execute"] * 4 + ["graph"] * 2 + ["execute", "graph"]


def test_one_pipeline_at_a_time_and_released_when_abandoned(sim: Any) -> None:
    backend = sim.make()
    gen = backend.pipeline(tiles(8, seed=i) for i in range(10))
    first = next(gen)
    np.testing.assert_array_equal(first, expected(tiles(8, seed=0)))
    with pytest.raises(BackendError, match="already running a pipeline"):
        backend.run(tiles(2))
    gen.close()  # a consumer that stops early (the Embedder does on errors)
    assert all(slot.held is None for slot in backend._slots)
    np.testing.assert_array_equal(backend.run(tiles(2)), expected(tiles(2)))


def test_closed_backend_refuses_work(sim: Any) -> None:
    backend = sim.make()
    backend.run(tiles(3))
    backend.close()
    backend.close()  # twice is fine
    assert backend._slots == []
    with pytest.raises(BackendError, match="closed"):
        backend.run(tiles(3))


def gpu_array(sim: Any, x: np.ndarray, offset: int = 0, stream: int | None = None) -> DeviceArray:
    """``x`` in fake GPU memory, ``offset`` bytes past an aligned allocation."""
    ptr = sim.mem.alloc(x.nbytes + offset) + offset
    sim.mem.at(ptr, x.nbytes)[:] = x.ravel()
    return DeviceArray(ptr, x.shape, x.dtype, stream, x)


def test_misaligned_gpu_arrays_are_copied_into_the_slot_on_the_gpu(sim: Any) -> None:
    x = tiles(5)
    backend = sim.make()
    out = backend.run(gpu_array(sim, x, offset=48, stream=7))  # one S×S×3 tile in: not 256-byte aligned
    np.testing.assert_array_equal(out, expected(x))
    assert [e for e in sim.log if e[0] == "copy" and e[1] != "d2h"] == [("copy", "d2d", x.nbytes)]
    slot = backend._slots[0]
    assert slot.h2d_done.recorded_on is backend._streams[0]  # compute waits for the GPU copy, which
    # waited for the producer's stream 7 (checked by the fake stream's wait)
    aligned = gpu_array(sim, x)
    np.testing.assert_array_equal(backend.run(aligned), expected(x))
    assert len([e for e in sim.log if e[:2] == ("copy", "d2d")]) == 1  # an aligned array is read in place


@pytest.mark.parametrize("offset", [0, 48], ids=["in-place", "misaligned"])
def test_a_producers_queued_writes_land_before_the_engine_reads(sim: Any, offset: int) -> None:
    x = tiles(5)
    ptr = sim.mem.alloc(x.nbytes + offset) + offset
    producer = sim.mem.producer(ptr, x)  # the tiles are written only when something waits for this stream
    out = sim.make().run(DeviceArray(ptr, x.shape, x.dtype, producer, x))
    np.testing.assert_array_equal(out, expected(x))


def test_an_address_tensorrt_refuses_is_an_error(sim: Any) -> None:
    backend = sim.make()
    backend._executor.alignment = 1  # let a misaligned array through to TensorRT's own check
    with pytest.raises(BackendError, match="refused the address .* of tensor 'tiles'.*256-byte"):
        backend.run(gpu_array(sim, tiles(2), offset=48))


def test_one_context_per_slot_sharing_one_scratch_block(sim: Any) -> None:
    backend = sim.make(slots=3)
    backend.run(tiles(20))
    contexts = [state.context for state in backend._executor._contexts]
    assert len(contexts) == 3 and len({id(c) for c in contexts}) == 3
    assert len({c.scratch for c in contexts}) == 1 and contexts[0].scratch[1] == 4096


def test_graphs_replay_six_full_batches_of_new_data(sim: Any) -> None:
    batches = [tiles(8, seed=i) for i in range(8)]
    backend = sim.make(slots=3, graphs=True)
    outs = list(backend.pipeline(batches))
    for batch, out in zip(batches, outs, strict=True):
        np.testing.assert_array_equal(out, expected(batch))  # replays read each batch's new data
    ran = [e[0] for e in sim.log if e[0] in ("execute", "graph")]
    assert ran == ["execute"] * 3 + ["graph"] * 5


def test_a_failed_context_leaves_nothing_half_made(sim: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = sim.make(slots=3)
    engine = backend._executor._engine
    made = engine.create_execution_context
    calls = []

    def third_fails(strategy: Any) -> Any:
        calls.append(strategy)
        return None if len(calls) % 3 == 0 else made(strategy)  # every third context

    monkeypatch.setattr(engine, "create_execution_context", third_fails)
    for _ in range(2):  # the second try starts from scratch too (no IndexError on missing contexts)
        with pytest.raises(BackendError, match="could not create an execution context"):
            backend.run(tiles(2))
        assert backend._slots == [] and backend._executor._contexts == []
    monkeypatch.setattr(engine, "create_execution_context", made)
    np.testing.assert_array_equal(backend.run(tiles(2)), expected(tiles(2)))


def test_a_per_thread_default_producer_stream_is_waited_for_through_the_legacy_stream(sim: Any) -> None:
    backend = sim.make()
    x = tiles(3)
    np.testing.assert_array_equal(backend.run(gpu_array(sim, x, stream=2)), expected(x))
    assert backend._slots[0].h2d_done.recorded_on == 1


def test_a_version_compatible_plan_runs_host_code_only_when_allowed(sim: Any) -> None:
    with pytest.raises(ModelFileError, match="version-compatible .*--allow-engine-host-code"):
        sim.make(version_compatible=True)
    assert "deserialized" not in sim.capture  # refused before TensorRT read the plan
    sim.make(version_compatible=True, allow_engine_host_code=True)
    sim.make()
    assert sim.capture["deserialized"] == [True, False]  # host code on only where allowed


def test_an_engine_file_whose_manifest_says_version_compatible_is_refused_without_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest beside a planted engine says version_compatible (and has the right sha256): that is no
    permission to run the engine's host code; the flag is, and it is checked before any GPU work."""
    engine = tmp_path / "planted.fp16.engine"
    engine.write_bytes(b"plan")
    artifact = {
        "path": engine.name,
        "format": "tensorrt",
        "sha256": sha256_file(engine),
        "version_compatible": True,
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"variant": "x", "artifacts": [artifact]}))
    monkeypatch.setattr(tb, "import_tensorrt", lambda name: types.SimpleNamespace(__name__="tensorrt"))
    with pytest.raises(
        ModelFileError, match="planted.fp16.engine is a version-compatible .*--allow-engine-host-code"
    ):
        tb.TensorRTBackend(engine)
    from virchow_rt.backends import open_backend

    with pytest.raises(ModelFileError, match="--allow-engine-host-code"):
        open_backend(engine)


def test_an_engine_file_is_the_backends_identity(sim: Any, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend opened from an engine file says which file it runs and its sha256 (checked at load),
    as the ONNX Runtime backend does: outputs record them (``embed``'s metadata, ``slides``' .h5)."""
    import hashlib

    from virchow_rt.contract import Artifact, Manifest
    from virchow_rt.registry import Preprocess

    sim.make()  # installs the stand-ins
    module = tb.import_tensorrt("tensorrt")
    module.__version__ = "10.13.0.35"
    monkeypatch.setattr(tb, "import_tensorrt", lambda name: module)
    gpu = types.SimpleNamespace(name="stand-in GPU", compute_capability="8.9")
    monkeypatch.setattr(tb.cuda, "device_info", lambda index: gpu, raising=False)
    engine = tmp_path / "stand-in.fp16.engine"
    engine.write_bytes(b"plan")
    sha = hashlib.sha256(b"plan").hexdigest()
    entry = Artifact.from_dict({
        "path": engine.name, "format": "tensorrt", "precision": "fp16", "sha256": sha,
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", E]}],
        "tensorrt_version": "10.13.0.35", "gpu": gpu.name, "compute_capability": "8.9",
    })  # fmt: skip
    manifest = Manifest(variant="stand-in", model_args={"embed_dim": E // 2}, preprocess=Preprocess(size=S))
    manifest.with_artifact(entry).write(tmp_path)
    with tb.TensorRTBackend(engine, slots=2) as backend:
        assert backend.path == engine and backend.model_sha256 == sha
        np.testing.assert_allclose(backend.run(tiles(3)), expected(tiles(3)), rtol=1e-6)
    assert sim.make().path is None and sim.make().model_sha256 is None  # a plan held in memory: no file
