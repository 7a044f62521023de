"""Embedder: order, ragged batches, pooling, resizing, the reader thread (overlap, errors, no deadlock)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from runtime_models import WIDTH, expected_embedding

from virchow_rt.backends import open_backend
from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo
from virchow_rt.embed import Embedder, StreamStats, open_tiles
from virchow_rt.embed.embedder import Prefetcher, default_batch_size
from virchow_rt.errors import BackendError, InputError
from virchow_rt.kernels.resize import resize_tiles
from virchow_rt.registry import VARIANTS


class FakeBackend(Backend):
    """Embeds a tile as its mean RGB twice (E = 6, width 3); can fail on a given batch."""

    name = "fake"

    def __init__(self, fail_on: int | None = None, max_batch: int | None = None, delay: float = 0.0) -> None:
        self.info = ModelInfo("unknown-variant", 6, 3, 224, "fp32", True, "random")
        self.fail_on, self.max_batch, self.delay = fail_on, max_batch, delay
        self.sizes: list[int] = []
        self.closed = False

    def run(self, tiles: np.ndarray) -> np.ndarray:
        if self.fail_on is not None and len(self.sizes) == self.fail_on:
            raise BackendError("fake failure")
        self.sizes.append(len(tiles))
        time.sleep(self.delay)  # a model's compute time, for the stream's statistics
        mean = tiles.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)  # (B, 3)
        return np.concatenate([mean, mean + 1000], axis=1)  # (B, 6)

    def close(self) -> None:
        self.closed = True


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "virchow-rt-reader"]


def test_order_ragged_batches_and_values(models, tissue):
    with Embedder(models["fp32"], batch_size=16) as embedder:
        out = embedder.embed(tissue)  # 40 = 16 + 16 + 8
        assert out.shape == (40, 2 * WIDTH) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected_embedding(tissue), atol=1e-5)
        cls = embedder.embed(tissue, pooling="cls")
        np.testing.assert_array_equal(cls, out[:, :WIDTH])
        assert embedder.embedding_dim("cls") == WIDTH and embedder.embedding_dim() == 2 * WIDTH


def test_batch_size_defaults(models):
    with Embedder(models["fp32"]) as embedder:
        assert embedder.batch_size == 8  # ONNX Runtime on CPU prefers small batches (measured)
    backend = FakeBackend()
    backend.info = ModelInfo("virchow2g-mini-tiny", 6, 3, 224, "fp32", True, "random")
    assert Embedder(backend).batch_size == 64  # the registry's batch opt for the model's variant
    assert Embedder(FakeBackend()).batch_size == 32  # unknown variant
    assert Embedder(FakeBackend(max_batch=8)).batch_size == 8
    with pytest.raises(InputError, match="batch size 0"):
        Embedder(FakeBackend(), batch_size=0)


def test_fake_backend_sees_exact_batches(tissue):
    backend = FakeBackend()
    out = Embedder(backend, batch_size=7).embed(tissue[:20])
    assert backend.sizes == [7, 7, 6]
    np.testing.assert_allclose(out[:, :3], tissue[:20].mean(axis=(1, 2)), rtol=1e-5)


def test_other_sizes_are_resized(models):
    tiles = np.random.default_rng(1).integers(0, 256, (5, 256, 300, 3), dtype=np.uint8)
    out = Embedder(models["fp32"], batch_size=2).embed(tiles)
    np.testing.assert_allclose(out, expected_embedding(resize_tiles(tiles, 224)), atol=1e-5)


def test_tile_source_equals_array(models, tissue, tmp_path):
    np.save(tmp_path / "t.npy", tissue)
    embedder = Embedder(models["fp32"], batch_size=6)
    np.testing.assert_array_equal(embedder.embed(open_tiles([tmp_path / "t.npy"])), embedder.embed(tissue))


@pytest.mark.parametrize(
    ("tiles", "pooling", "match"),
    [
        (np.zeros((0, 224, 224, 3), np.uint8), "cls_mean", "no tiles to embed"),
        (np.zeros((2, 224, 224, 3), np.float64), "cls_mean", "float64"),
        (np.zeros((2, 224, 224), np.uint8), "cls_mean", r"\(2, 224, 224\)"),
        ([np.zeros((224, 224, 3), np.uint8)], "cls_mean", "list"),
        (np.zeros((2, 224, 224, 3), np.uint8), "mean", "unknown pooling"),
    ],
    ids=["zero", "dtype", "rank", "list", "pooling"],
)
def test_bad_inputs(tiles, pooling, match):
    with pytest.raises(InputError, match=match):
        Embedder(FakeBackend()).embed(tiles, pooling=pooling)


def test_reading_overlaps_inference():
    """The backend's run of batch k waits until batch k+1 has been read: only a reader running ahead of
    the backend (in another thread) lets the embedder finish; run one after the other, it would fail."""
    read = [threading.Event() for _ in range(4)]
    read_threads: set[int] = set()

    def batches():
        for k in range(4):
            read_threads.add(threading.get_ident())
            read[k].set()
            yield np.full((2, 224, 224, 3), k, np.uint8)

    class WaitsForTheNextRead(FakeBackend):
        def run(self, tiles: np.ndarray) -> np.ndarray:
            k = len(self.sizes)
            assert read[k].is_set()
            if k + 1 < len(read):
                assert read[k + 1].wait(timeout=60), f"batch {k + 1} was not read while batch {k} ran"
            return super().run(tiles)

    outs = list(Embedder(WaitsForTheNextRead()).embed_batches(batches()))
    assert [o[0, 0] for o in outs] == [0, 1, 2, 3]
    assert read_threads and threading.get_ident() not in read_threads


def test_reader_error_propagates_and_thread_is_joined(tissue):
    def batches():
        yield tissue[:2]
        yield tissue[2:4]
        raise InputError("tile 5 is broken")

    with pytest.raises(InputError, match="tile 5 is broken"):
        list(Embedder(FakeBackend()).embed_batches(batches()))
    assert not _reader_threads()


def test_backend_error_does_not_deadlock(tissue):
    """The backend fails while the reader is blocked on a full queue of an endless source."""

    def endless():
        while True:
            yield tissue[:2]

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            list(Embedder(FakeBackend(fail_on=2)).embed_batches(endless()))
        except BackendError as err:
            outcome.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "deadlock: embed_batches did not return after a backend error"
    assert outcome and "fake failure" in str(outcome[0])
    assert not _reader_threads()


def test_consumer_stopping_early_stops_the_reader(tissue):
    def endless():
        while True:
            yield tissue[:2]

    reader = Prefetcher(endless())
    for i, _ in enumerate(reader):
        if i == 3:
            break
    reader.close()
    assert not reader.alive


def test_embed_batches_splits_batches_above_max(tissue):
    backend = FakeBackend(max_batch=4)
    outs = list(Embedder(backend).embed_batches([tissue[:10], tissue[10:13]]))
    assert [len(o) for o in outs] == [10, 3] and backend.sizes == [4, 4, 2, 3]
    np.testing.assert_allclose(outs[0][:, :3], tissue[:10].mean(axis=(1, 2)), rtol=1e-5)


def test_batches_are_read_ahead_in_the_reader_thread_also_with_a_max_batch(tissue):
    """A backend with a batch limit (every TensorRT engine) still reads the next batch while one runs."""
    read_threads: set[int] = set()

    def batches():
        for start in range(0, 12, 3):
            read_threads.add(threading.get_ident())
            yield tissue[start : start + 3]

    backend = FakeBackend(max_batch=4)
    outs = list(Embedder(backend).embed_batches(batches()))
    assert [len(o) for o in outs] == [3] * 4 and backend.sizes == [3] * 4
    assert read_threads and threading.get_ident() not in read_threads


def test_stream_stats_count_model_time_apart_from_waiting_for_input(tissue):
    def slow_batches():
        for start in range(0, 8, 2):
            time.sleep(0.1)  # reading is the bottleneck: the backend waits
            yield tissue[start : start + 2]

    stats = StreamStats()
    start = time.perf_counter()
    outs = list(Embedder(FakeBackend(delay=0.05)).embed_batches(slow_batches(), stats=stats))
    elapsed = time.perf_counter() - start
    assert (stats.batches, stats.tiles) == (4, 8) and sum(len(o) for o in outs) == 8
    assert stats.model_s >= 4 * 0.05 * 0.95 and stats.wait_s >= 0.1 * 0.9  # at least the sleeps
    assert stats.model_s + stats.wait_s <= elapsed + 1e-3


def test_embeddings_of_the_wrong_shape_are_a_backend_error(tissue):
    class Wrong(FakeBackend):
        def run(self, tiles):
            return super().run(tiles)[:, :5]  # (B, 5): not the (B, 6) its metadata says

    with pytest.raises(BackendError, match=r"returned embeddings \(4, 5\) for 4 tiles; expected \(4, 6\)"):
        Embedder(Wrong(), batch_size=4).embed(tissue[:8])
    assert not _reader_threads()


def test_progress_bar_only_when_asked(tissue, capsys):
    Embedder(FakeBackend(), batch_size=8).embed(tissue[:16])
    assert "tile" not in capsys.readouterr().err
    Embedder(FakeBackend(), batch_size=8, progress=True).embed(tissue[:16])
    assert "16/16" in capsys.readouterr().err


def test_owned_backend_is_closed_passed_backend_is_not(models):
    backend = FakeBackend()
    with Embedder(backend):
        pass
    assert not backend.closed
    embedder = Embedder(models["fp32"])
    embedder.close()
    with pytest.raises(BackendError, match="is closed"):
        embedder.backend.run(np.zeros((1, 224, 224, 3), np.uint8))
    embedder.close()  # twice is fine
    assert open_backend(models["fp32"]).info.width == WIDTH


def test_default_batch_prefers_the_backends_measured_batch(models):
    backend = open_backend(models["fp32"])  # ONNX Runtime on the CPU: measured fastest at 8
    assert backend.preferred_batch == 8 and default_batch_size(backend) == 8
    assert default_batch_size(backend, 48) == 48
    backend.preferred_batch = None
    assert default_batch_size(backend) == 32  # virchow2-tiny: the registry's opt batch
    backend.max_batch = 16
    assert default_batch_size(backend) == 16 and default_batch_size(backend, 64) == 16
    with pytest.raises(InputError, match="at least 1"):
        default_batch_size(backend, 0)


def gpu_pixels(tiles: np.ndarray, size: int) -> np.ndarray:
    """What the stand-in GPU resizer gives: the CPU reference with red and blue swapped, so that a test
    sees which resizer's pixels reached the model (the real kernel's pixels are checked on a GPU)."""
    return np.ascontiguousarray(resize_tiles(tiles, size)[..., ::-1])


class FakeResizer:
    """Stands in for CudaResizer (no GPU here): records its calls, returns :func:`gpu_pixels`."""

    made: list[FakeResizer] = []

    def __init__(self, size: int, device: int) -> None:
        self.size, self.device, self.calls, self.closed = size, device, 0, False
        FakeResizer.made.append(self)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        return gpu_pixels(tiles, self.size)

    def close(self) -> None:
        self.closed = True


def test_resize_on_the_gpu_is_chosen_for_gpu_backends(tissue, monkeypatch):
    from virchow_rt.kernels import cuda_resize

    monkeypatch.setattr(cuda_resize, "CudaResizer", FakeResizer)
    big = resize_tiles(tissue[:6], 256)  # 256 px tiles, as a 20x scan at 0.4 um/px gives them
    gpu = FakeBackend()
    gpu.gpu = 1
    made = len(FakeResizer.made)
    with Embedder(gpu, batch_size=4) as embedder:
        assert embedder.resize == "gpu"
        embedder.embed(tissue[:5])
        assert len(FakeResizer.made) == made  # 224 px tiles need no resizer: none was made
        out = embedder.embed(big)
        resizer = FakeResizer.made[-1]
        assert (resizer.size, resizer.device, resizer.calls) == (224, 1, 2)  # batches of 4 + 2
        assert list(embedder.embed_batches([big[:3]]))[0].shape == (3, 6) and resizer.calls == 3
    assert resizer.closed and not gpu.closed  # the embedder frees its resizer, not a backend it was given
    with pytest.raises(BackendError, match="Embedder was closed"):
        embedder.embed(big)
    np.testing.assert_allclose(out[:, :3], gpu_pixels(big, 224).mean(axis=(1, 2)), rtol=1e-5)  # its pixels
    with Embedder(FakeBackend(), batch_size=4) as cpu:
        assert cpu.resize == "cpu"
        np.testing.assert_allclose(cpu.embed(big)[:, :3], resize_tiles(big, 224).mean(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [v for v in VARIANTS.values() if (v.preprocess.crop_pct, v.preprocess.interpolation) != (1.0, "bicubic")],
    ids=lambda v: f"{v.name}-{v.preprocess.interpolation}-crop{v.preprocess.crop_pct}",
)
def test_encoders_the_gpu_kernel_does_not_fit_resize_on_the_cpu(variant, monkeypatch):
    """The kernel does timm's bicubic with crop_pct 1: a bilinear or crop_pct 0.875 encoder on a GPU
    backend resizes on the CPU under "auto" (its own filter and crop) and refuses "gpu"."""
    from virchow_rt.kernels import cuda_resize

    monkeypatch.setattr(cuda_resize, "CudaResizer", FakeResizer)
    pre = variant.preprocess
    gpu = FakeBackend()
    gpu.gpu = 0
    gpu.info = dataclasses.replace(
        gpu.info, variant=variant.name, crop_pct=pre.crop_pct, interpolation=pre.interpolation
    )
    big = np.random.default_rng(2).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    made = len(FakeResizer.made)
    with Embedder(gpu, batch_size=2) as embedder:
        assert embedder.resize == "cpu"
        out = embedder.embed(big)
    assert len(FakeResizer.made) == made  # no GPU resizer was made
    want = resize_tiles(big, 224, pre.crop_pct, pre.interpolation).mean(axis=(1, 2))
    np.testing.assert_allclose(out[:, :3], want, rtol=1e-5)
    match = (
        rf"resize='gpu' does bicubic with crop_pct 1.0; {variant.name} preprocesses with "
        rf"{pre.interpolation}, crop_pct {pre.crop_pct}: use resize='cpu'"
    )
    with pytest.raises(InputError, match=match):
        Embedder(gpu, resize="gpu")


def test_resize_choice_errors_and_fallback(monkeypatch, caplog):
    from virchow_rt.kernels import cuda_resize

    with pytest.raises(InputError, match="resize='gpu' needs a backend that runs on a GPU.*fake"):
        Embedder(FakeBackend(), resize="gpu")
    with pytest.raises(InputError, match="unknown resize 'fast'"):
        Embedder(FakeBackend(), resize="fast")

    def unavailable(size: int, device: int) -> None:
        raise BackendError("no CUDA GPU is visible")

    monkeypatch.setattr(cuda_resize, "CudaResizer", unavailable)
    gpu = FakeBackend()
    gpu.gpu = 0
    with pytest.raises(BackendError, match="cannot resize on GPU 0: no CUDA GPU.*resize='cpu'"):
        Embedder(gpu, resize="gpu")
    embedder = Embedder(gpu)
    assert embedder.resize == "gpu"  # auto: the kernel is loaded when first needed
    big = np.zeros((2, 256, 256, 3), np.uint8)
    with caplog.at_level("WARNING", logger="virchow_rt.embed.embedder"):
        assert embedder.embed(big).shape == (2, 6)
    assert embedder.resize == "cpu" and "resize kernel is unavailable" in caplog.text  # fell back, said why


def test_a_missing_nvrtc_library_is_a_missing_dependency_everywhere(monkeypatch, caplog):
    """cuda-python finds libnvrtc at the first call and raises cuda.pathfinder's RuntimeError there."""
    import types

    from virchow_rt.backends.capabilities import gpu_resize
    from virchow_rt.backends.cuda import api as cuda_api
    from virchow_rt.errors import MissingDependency
    from virchow_rt.kernels import cuda_resize

    def version() -> None:
        raise RuntimeError("Failure finding 'libnvrtc.so': no such file")  # as DynamicLibNotFoundError

    fake = types.SimpleNamespace(nvrtcVersion=version)
    monkeypatch.setattr(cuda_api, "optional_import", lambda name, purpose: fake)
    with pytest.raises(MissingDependency, match=r"NVRTC library .*libnvrtc.*virchow-rt\[cuda\]"):
        cuda_api.load_nvrtc()
    cuda_resize.compile_kernels.cache_clear()
    with pytest.raises(MissingDependency, match="NVRTC library"):
        cuda_resize.compile_kernels("sm_90")
    assert gpu_resize(["NVIDIA H200"]).startswith("unavailable (needs NVRTC")  # `info` no longer says present

    def resizer(size: int, device: int) -> None:  # CudaResizer compiles its kernels when made
        cuda_resize.compile_kernels("sm_90")

    monkeypatch.setattr(cuda_resize, "CudaResizer", resizer)
    gpu = FakeBackend()
    gpu.gpu = 0
    big = np.zeros((3, 256, 256, 3), np.uint8)
    logger = "virchow_rt.embed.embedder"
    with Embedder(gpu, batch_size=2) as embedder, caplog.at_level("WARNING", logger=logger):
        assert embedder.embed(big).shape == (3, 6)  # the reader thread fell back instead of dying
    assert embedder.resize == "cpu" and "NVRTC library" in caplog.text
    cuda_resize.compile_kernels.cache_clear()
