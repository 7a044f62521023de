"""A real TensorRT engine built from a tiny export, run on a GPU, checked against the fp32 reference.

Skipped where TensorRT is missing (or only its type stubs are installed) or no GPU is visible.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from virchow_rt.backends.cuda import api as cuda
from virchow_rt.backends.tensorrt import TensorRTBackend
from virchow_rt.compare import compare
from virchow_rt.contract import Manifest
from virchow_rt.errors import ModelFileError
from virchow_rt.files import sha256_file
from virchow_rt.tissue import tissue_tiles

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]  # conftest skips them, with the reason, where missing


def reference(export: tuple[str, Path, dict[str, Any]], tiles: np.ndarray) -> np.ndarray:
    """fp32 ONNX in ONNX Runtime CPU (the export checked it is within 0.99999 cosine of PyTorch)."""
    from virchow_rt.backends import open_backend

    name, folder, _ = export
    with open_backend(folder / f"{name}.fp32.onnx", backend="onnxruntime-cpu") as ort:
        return ort.run(tiles)


def open_engine(path: Path, **options: Any) -> TensorRTBackend:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RANDOM WEIGHTS
        return TensorRTBackend(path, **options)


def test_entry_records_what_the_engine_is_tied_to(
    tiny_engine: tuple[Path, dict], tiny_onnx_export: Any
) -> None:
    import tensorrt as trt

    path, entry = tiny_engine
    name, folder, _ = tiny_onnx_export
    gpu = cuda.device_info(0)
    assert entry["format"] == "tensorrt" and entry["precision"] == "fp16" and entry["strongly_typed"]
    assert entry["tensorrt_version"] == trt.__version__
    assert (entry["gpu"], entry["compute_capability"]) == (gpu.name, gpu.compute_capability)
    assert entry["profile"] == {"min": 1, "opt": 16, "max": 16}
    assert entry["onnx_sha256"] == sha256_file(folder / f"{name}.fp16.onnx")
    assert entry["sha256"] == sha256_file(path) and entry["size_bytes"] == path.stat().st_size
    assert entry["parity"]["passed"] and entry["parity"]["min_cosine"] >= 0.999
    manifest = Manifest.read(folder)
    assert [a.path for a in manifest.artifacts].count(path.name) == 1


@pytest.mark.parametrize("slots", [2, 3])
def test_engine_matches_the_fp32_reference(tiny_engine: Any, tiny_onnx_export: Any, slots: int) -> None:
    tiles = tissue_tiles(37, 224, seed=3)  # 16 + 16 + 5: a ragged last batch
    with open_engine(tiny_engine[0], slots=slots) as engine:
        assert engine.max_batch == 16 and engine.info.precision == "fp16" and engine.info.random_weights
        got = engine.run(tiles)
    assert got.shape == (37, engine.info.embedding_dim) and got.dtype == np.float32
    result = compare(got, reference(tiny_onnx_export, tiles), 0.999)
    assert result, str(result)


def test_pipeline_keeps_order_and_graphs_change_nothing(tiny_engine: Any) -> None:
    sizes = [16, 7, 16, 16, 1, 16, 3]
    batches = [tissue_tiles(n, 224, seed=10 + i) for i, n in enumerate(sizes)]
    with open_engine(tiny_engine[0]) as plain, open_engine(tiny_engine[0], cuda_graphs=True) as graphs:
        one_by_one = [plain.run(b) for b in batches]
        piped = list(plain.pipeline(iter(batches)))
        replayed = list(graphs.pipeline(iter(batches)))
    for a, b, c, n in zip(one_by_one, piped, replayed, sizes, strict=True):
        assert a.shape == b.shape == c.shape == (n, plain.info.embedding_dim)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-3)


def test_graphs_replay_full_batches_of_new_data(tiny_engine: Any) -> None:
    batches = [tissue_tiles(16, 224, seed=40 + i) for i in range(7)]  # full batches only: nothing discards
    with open_engine(tiny_engine[0]) as plain, open_engine(tiny_engine[0], cuda_graphs=True) as graphs:
        expected = [plain.run(b) for b in batches]
        replayed = list(graphs.pipeline(iter(batches)))
        captured = [state.graph is not None for state in graphs._executor._contexts]  # type: ignore[union-attr]
    assert captured == [True, True, True]  # one graph per slot, each replayed for batches 3-6
    for got, want in zip(replayed, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert not np.allclose(replayed[3], replayed[0])  # new data, not the captured batch's result again


def test_gpu_arrays_are_read_in_place(tiny_engine: Any) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    tiles = tissue_tiles(20, 224, seed=5)
    with open_engine(tiny_engine[0]) as engine:
        host = engine.run(tiles)
        on_gpu = torch.from_numpy(tiles).cuda()
        device = engine.run(on_gpu)
        piped = np.concatenate(list(engine.pipeline([on_gpu[:16], on_gpu[16:]])))
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-5)
    np.testing.assert_allclose(piped, host, rtol=0, atol=1e-5)


def copy_export(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def edit_entry(folder: Path, engine: str, **changes: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["artifacts"]:
        if entry["path"] == engine:
            entry.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"compute_capability": "1.0"}, r"compute capability 1\.0"),
        # a version no installed TensorRT has
        ({"tensorrt_version": "9.0.0.1"}, r"built with TensorRT 9\.0\.0\.1 and this runtime is"),
        ({"sha256": "0" * 64}, "does not match the sha256"),
    ],
)
def test_engines_from_elsewhere_are_refused_with_the_rebuild_command(
    tiny_engine: Any, tmp_path: Path, changes: dict, match: str
) -> None:
    path = tiny_engine[0]
    folder = copy_export(path.parent, tmp_path / "copy")
    edit_entry(folder, path.name, **changes)
    with pytest.raises(ModelFileError, match=match) as err:
        open_engine(folder / path.name)
    assert "virchow-rt export virchow2-tiny" in str(err.value) and "--tensorrt" in str(err.value)


def test_ensure_engine_rebuilds_only_when_needed(tiny_engine: Any, tmp_path: Path) -> None:
    from virchow_rt.export.tensorrt_build import ensure_engine

    path = tiny_engine[0]
    folder = copy_export(path.parent, tmp_path / "copy")
    onnx = folder / "virchow2-tiny.fp16.onnx"
    before = (folder / path.name).stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = ensure_engine(onnx, folder, "virchow2-tiny", max_batch=16, timing_cache=None)
        assert same.sha256 == tiny_engine[1]["sha256"] and (folder / path.name).stat().st_mtime_ns == before
        cache = tmp_path / "timing.cache"
        rebuilt = ensure_engine(onnx, folder, "virchow2-tiny", max_batch=8, timing_cache=cache)
    assert rebuilt.profile is not None and rebuilt.profile.max == 8 and cache.stat().st_size > 0
    assert [a.path for a in Manifest.read(folder).artifacts].count(path.name) == 1


def test_version_compatible_engine_runs(tiny_engine: Any, tiny_onnx_export: Any, tmp_path: Path) -> None:
    from virchow_rt.export.tensorrt_build import build_engine

    folder = copy_export(tiny_engine[0].parent, tmp_path / "vc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = build_engine(
            folder / "virchow2-tiny.fp16.onnx", folder, "virchow2-tiny", max_batch=16,
            version_compatible=True, timing_cache=None,
        )  # fmt: skip
    assert entry.extra["version_compatible"] and entry.extra["lean_runtime"] == "embedded"
    tiles = tissue_tiles(9, 224, seed=4)
    with pytest.raises(ModelFileError, match="--allow-engine-host-code"):  # never because a manifest says so
        open_engine(folder / entry.path)
    with open_engine(folder / entry.path, allow_engine_host_code=True) as engine:
        assert compare(engine.run(tiles), reference(tiny_onnx_export, tiles), 0.999)


def test_open_backend_runs_engines(tiny_engine: Any, tiny_onnx_export: Any) -> None:
    """The engine file and its export folder both open the engine, which matches the fp32 reference."""
    from virchow_rt.backends import open_backend

    tiles = tissue_tiles(2, 224, seed=1)
    want = reference(tiny_onnx_export, tiles)
    for path in (tiny_engine[0], tiny_engine[0].parent):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend = open_backend(path)
        with backend:
            assert isinstance(backend, TensorRTBackend) and backend.name == "tensorrt"
            result = compare(backend.run(tiles), want, 0.999)
        assert result, f"{path.name}: {result}"
