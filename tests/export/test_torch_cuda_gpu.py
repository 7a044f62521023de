"""The torch-cuda backend on a real GPU: the shared CUDA pipeline with torch's kernels, against fp32.

Skipped where no CUDA GPU is visible (``gpu`` marker). This is the part of the pipeline that TensorRT
shares (slots, streams, events, CUDA graphs, GPU arrays) proven on hardware without TensorRT.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from virchow_rt.compare import compare
from virchow_rt.kernels.resize import resize_tiles
from virchow_rt.tissue import tissue_tiles

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from virchow_rt.export.pipeline import export_model

    folder = tmp_path_factory.mktemp("torch-cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(
            "virchow2-tiny", folder, random_weights=True, precisions=["fp32"], parity_tiles=8, max_batch=16
        )
    return folder


def reference(folder: Path, tiles: np.ndarray) -> np.ndarray:
    from virchow_rt.backends import open_backend

    with open_backend(folder / "virchow2-tiny.fp32.onnx", "onnxruntime-cpu") as ort:
        return ort.run(tiles)


def open_torch(folder: Path, **options: Any) -> Any:
    from virchow_rt.backends import open_backend

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RANDOM WEIGHTS
        return open_backend(folder, "torch-cuda", **options)


def test_matches_the_fp32_reference(export: Path) -> None:
    tiles = tissue_tiles(37, 224, seed=3)  # 16 + 16 + 5: a ragged last batch
    with open_torch(export) as backend:
        assert (backend.name, backend.info.precision, backend.max_batch, backend.gpu) == (
            "torch-cuda",
            "fp16",
            16,
            0,
        )
        got = backend.run(tiles)
    assert got.shape == (37, backend.info.embedding_dim) and got.dtype == np.float32
    result = compare(got, reference(export, tiles), 0.999)
    assert result, str(result)


def test_pipeline_keeps_order_with_ragged_and_empty_batches(export: Path) -> None:
    sizes = [16, 7, 16, 0, 1, 16, 3]
    batches = [tissue_tiles(n, 224, seed=10 + i) if n else np.zeros((0, 224, 224, 3), np.uint8)
               for i, n in enumerate(sizes)]  # fmt: skip
    with open_torch(export, cuda_graphs=False) as backend:
        one_by_one = [backend.run(b) for b in batches]
        piped = list(backend.pipeline(iter(batches)))
    for a, b, n in zip(one_by_one, piped, sizes, strict=True):
        assert a.shape == b.shape == (n, backend.info.embedding_dim)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_graphs_replay_full_batches_of_new_data(export: Path) -> None:
    batches = [tissue_tiles(16, 224, seed=40 + i) for i in range(7)]  # full batches only: nothing discards
    with open_torch(export, cuda_graphs=False) as plain, open_torch(export, cuda_graphs=True) as graphs:
        expected = [plain.run(b) for b in batches]
        replayed = list(graphs.pipeline(iter(batches)))
        captured = sorted(graphs._executor._graphs)
    assert captured == [0, 1, 2]  # one graph per slot, replayed for batches 3-6
    for got, want in zip(replayed, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    assert not np.allclose(replayed[3], replayed[0])  # new data, not the captured batch's result again


def test_gpu_arrays_are_read_in_place(export: Path) -> None:
    tiles = tissue_tiles(20, 224, seed=5)
    with open_torch(export) as backend:
        host = backend.run(tiles)
        on_gpu = torch.from_numpy(tiles).cuda()
        np.testing.assert_allclose(backend.run(on_gpu), host, rtol=0, atol=2e-3)  # the same batches
        # at an offset the rows batch differently (other fp16 kernels may run): compare by cosine
        result = compare(backend.run(on_gpu[3:]), host[3:], 0.9999)
        assert result, str(result)
        cupy = pytest.importorskip("cupy")
        np.testing.assert_allclose(backend.run(cupy.asarray(tiles)), host, rtol=0, atol=2e-3)


def test_embedder_resizes_on_the_gpu(export: Path) -> None:
    from virchow_rt.embed import Embedder

    big = resize_tiles(tissue_tiles(10, 224, seed=6), 448)  # 40x tiles
    with open_torch(export) as backend:
        with (
            Embedder(backend, batch_size=4, resize="gpu") as gpu,
            Embedder(backend, batch_size=4, resize="cpu") as cpu,
        ):
            assert gpu.resize == "gpu"
            np.testing.assert_allclose(gpu.embed(big), cpu.embed(big), rtol=0, atol=2e-3)


def test_compute_only_timing(export: Path) -> None:
    with open_torch(export) as backend:
        samples = backend.time_compute(tissue_tiles(16, 224, seed=7), repeats=5, warmup=2)
    assert len(samples) == 5 and all(0 < s < 1 for s in samples)


def test_embed_command_runs_torch_cuda(export: Path, tmp_path: Path) -> None:
    import json

    from virchow_rt.cli.main import main

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    tiles = tissue_tiles(20, 224, seed=8)
    np.save(tmp_path / "tiles.npy", tiles)
    out = tmp_path / "emb.npy"
    assert (
        main(
            ["embed", str(export), str(tmp_path / "tiles.npy"), "--backend", "torch-cuda", "--out", str(out)]
        )
        == 0
    )
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["backend"] == "torch-cuda" and meta["model"]["precision"] == "fp16" and meta["random_weights"]
    result = compare(np.load(out), reference(export, tiles), 0.999)
    assert result, str(result)
