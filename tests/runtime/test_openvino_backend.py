"""OpenVinoBackend: values, order, the bf16 gate (measured, cached, failing), the CPU default, bad files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from runtime_models import WIDTH, build_tiny_onnx, expected_embedding

from virchow_rt.backends import open_backend
from virchow_rt.compare import cosine_rows
from virchow_rt.embed import Embedder
from virchow_rt.errors import BackendError, InputError, MissingDependency, ModelFileError, ParityError

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'virchow-rt[openvino]')")

from virchow_rt.backends import openvino as openvino_backend  # noqa: E402 - only where OpenVINO is installed
from virchow_rt.backends.openvino import OpenVinoBackend, cpu_has_bf16  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units (AMX / AVX-512 BF16)")


def _export_folder(folder: Path, model: Path) -> Path:
    folder.mkdir()
    shutil.copy(model, folder / "virchow2-tiny.fp32.onnx")
    artifacts = [{"path": "virchow2-tiny.fp32.onnx", "format": "onnx", "precision": "fp32"}]
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "artifacts": artifacts}))
    return folder


def _fail_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cosine tolerance above 1: no measurement can pass it."""
    monkeypatch.setattr(openvino_backend, "bf16_tolerance", lambda variant: (1.5, 0.9))


def test_fp32_matches_the_model_exactly(models, tissue):
    with open_backend(models["fp32"], "openvino-fp32") as backend:
        assert backend.name == "openvino-cpu-fp32" and backend.gpu is None
        info = backend.info
        assert (info.variant, info.width, info.embedding_dim) == ("virchow2-tiny", WIDTH, 16)
        assert info.tile_size == 224
        assert info.precision == "fp32" and info.random_weights and info.weights_sha256 == "random"
        assert backend.parity is None and backend.optimization["inference_precision"] == "f32"
        out = backend.run(tissue[:5])
        assert out.dtype == np.float32 and out.shape == (5, 16)
        np.testing.assert_allclose(out, expected_embedding(tissue[:5]), atol=1e-5)


def test_pipeline_keeps_order_over_ragged_batches(models, tissue):
    with OpenVinoBackend(models["fp32"], "fp32", requests=3) as backend:
        sizes = [1, 7, 3, 8, 2, 5, 6, 8]  # 40 tiles, more batches than requests in flight
        starts = np.cumsum([0, *sizes])
        batches = [tissue[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        outs = list(backend.pipeline(batches))
        assert [len(o) for o in outs] == sizes
        np.testing.assert_allclose(np.concatenate(outs), expected_embedding(tissue), atol=1e-5)
        # a consumer that stops early leaves the backend usable (its requests are waited for and reused)
        stream = backend.pipeline(batches)
        next(stream)
        stream.close()
        np.testing.assert_allclose(backend.run(tissue[:9]), expected_embedding(tissue[:9]), atol=1e-5)
        assert len(backend._queues) == 1  # one queue, reused


def test_embedder_runs_it(models, tissue):
    with Embedder(models["fp32"], backend="openvino-fp32", batch_size=16) as embedder:
        assert embedder.backend.name == "openvino-cpu-fp32"
        np.testing.assert_allclose(embedder.embed(tissue), expected_embedding(tissue), atol=1e-5)


@needs_bf16
def test_bf16_passes_its_gate_once_then_reads_the_cached_verdict(models, tissue, private_cache):
    backend = open_backend(models["fp32"], "openvino")
    assert backend.name == "openvino-cpu-bf16" and backend.info.precision == "bf16"
    assert backend.gate == "measured" and backend.parity and backend.parity.n == 32
    assert backend.parity.min_cosine >= 0.999 and backend.parity.knn10_overlap >= 0.9
    assert backend.optimization["inference_precision"] == "bf16"
    out = backend.run(tissue)
    assert np.isfinite(out).all() and cosine_rows(out, expected_embedding(tissue)).min() > 0.999
    assert not np.allclose(out, expected_embedding(tissue), atol=1e-5)  # bf16 really ran
    verdicts = list((private_cache / "openvino-gate").glob("*.json"))
    assert len(verdicts) == 1 and json.loads(verdicts[0].read_text())["comparison"]["passed"]
    assert list((private_cache / "openvino").iterdir())  # the compiled model is cached on disk
    again = OpenVinoBackend(models["fp32"], "bf16")
    assert again.gate == "cached" and again.parity.min_cosine == backend.parity.min_cosine


@needs_bf16
def test_a_failing_gate_falls_back_to_fp32_or_refuses_with_its_numbers(models, tissue, tmp_path, monkeypatch):
    real_tolerance = openvino_backend.bf16_tolerance
    _fail_the_gate(monkeypatch)
    model = shutil.copy(models["fp32"], tmp_path / "gate.fp32.onnx")
    cache = tmp_path / "cache"  # its own: measured here, whatever other tests cached
    with pytest.warns(UserWarning, match=r"failed its parity gate.*FAIL: min cosine 0\.99.*tolerance 1\.5"):
        backend = OpenVinoBackend(model, "auto", cache_dir=cache)
    assert backend.gate == "measured"
    assert backend.name == "openvino-cpu-fp32" and backend.info.precision == "fp32"
    assert backend.parity is not None and not backend.parity
    np.testing.assert_allclose(backend.run(tissue[:4]), expected_embedding(tissue[:4]), atol=1e-5)
    with pytest.raises(ParityError, match=r"FAIL: min cosine .* over 32 tiles.*openvino-fp32"):
        OpenVinoBackend(model, "bf16", cache_dir=cache)  # the cached failing verdict, not remeasured
    # the cached measurement is judged by today's tolerance: with the real one it passes, unmeasured
    monkeypatch.setattr(openvino_backend, "bf16_tolerance", real_tolerance)
    assert OpenVinoBackend(model, "bf16", cache_dir=cache).gate == "cached"


@needs_bf16
def test_bf16_is_never_run_unchecked(models, tmp_path, monkeypatch):
    import virchow_rt.tissue

    def no_skimage(*args: object, **kwargs: object) -> None:
        raise MissingDependency("scikit-image is needed for the bundled real-tissue tiles: pip install ...")

    monkeypatch.setattr(virchow_rt.tissue, "tissue_tiles", no_skimage)
    model = shutil.copy(models["fp32"], tmp_path / "unchecked.fp32.onnx")
    cache = tmp_path / "cache"  # its own: the other tests' verdicts for this model are cached elsewhere
    with pytest.warns(UserWarning, match="not run unchecked: scikit-image"):
        assert OpenVinoBackend(model, cache_dir=cache).name == "openvino-cpu-fp32"
    with pytest.raises(MissingDependency, match="scikit-image"):
        OpenVinoBackend(model, "bf16", cache_dir=cache)


def test_no_bf16_units_means_fp32_or_a_refusal(models, monkeypatch):
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda core=None: False)
    backend = OpenVinoBackend(models["fp32"])
    assert backend.name == "openvino-cpu-fp32" and "no bf16 units" in backend.gate
    with pytest.raises(BackendError, match="bf16 asked for.*no bf16 units"):
        OpenVinoBackend(models["fp32"], "bf16")


@needs_bf16
def test_export_folder_default_on_a_cpu_is_openvino_bf16(models, tmp_path, monkeypatch):
    from virchow_rt.backends import open as runtime

    folder = _export_folder(tmp_path / "export", models["fp32"])
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: False)
    with open_backend(folder) as backend:
        assert backend.name == "openvino-cpu-bf16" and backend.info.precision == "bf16"
    with Embedder(folder) as embedder:
        assert embedder.backend.name == "openvino-cpu-bf16" and embedder.batch_size == 8
    assert open_backend(folder, "onnxruntime-cpu").name == "onnxruntime-cpu"  # asked by name
    assert open_backend(folder, "openvino-fp32").name == "openvino-cpu-fp32"


@needs_bf16
def test_export_folder_default_keeps_onnx_runtime_when_the_gate_fails(models, tmp_path, monkeypatch):
    from virchow_rt.backends import open as runtime

    folder = _export_folder(tmp_path / "export", models["fp32"])
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: False)
    _fail_the_gate(monkeypatch)
    with pytest.warns(UserWarning, match=r"FAIL: min cosine.*running ONNX Runtime fp32 instead"):
        backend = open_backend(folder)
    assert backend.name == "onnxruntime-cpu" and backend.info.precision == "fp32"


def test_export_folder_default_without_bf16_units_or_openvino_is_onnx_runtime(models, tmp_path, monkeypatch):
    from virchow_rt.backends import open as runtime

    folder = _export_folder(tmp_path / "export", models["fp32"])
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: False)
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda core=None: False)  # an AVX2-only CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_backend(folder).name == "onnxruntime-cpu"
    monkeypatch.setattr(runtime, "is_importable", lambda module: module != "openvino")
    assert open_backend(folder).name == "onnxruntime-cpu"


def test_bad_files_and_inputs(models, tissue, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="OpenVINO cannot read .*junk.onnx"):
        open_backend(tmp_path / "junk.onnx", "openvino")
    with pytest.raises(ModelFileError, match="does not exist"):
        open_backend(tmp_path / "missing.onnx", "openvino")
    with pytest.raises(ModelFileError, match="fp16 graph.*fp32 ONNX"):
        open_backend(models["fp16"], "openvino")
    with pytest.raises(InputError, match="unknown OpenVINO precision 'int4'"):
        OpenVinoBackend(models["fp32"], "int4")
    with OpenVinoBackend(models["fp32"], "fp32") as backend:
        with pytest.raises(InputError, match="the model takes 224x224"):
            backend.run(np.zeros((2, 256, 256, 3), np.uint8))
        with pytest.raises(InputError, match="uint8"):
            backend.run(tissue[:2].astype(np.float32))
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.run(tissue[:2])


def test_graph_without_metadata_reads_its_shapes(models, tissue):
    backend = OpenVinoBackend(models["nometa"], "fp32")
    info = backend.info
    assert (info.variant, info.embedding_dim, info.width, info.tile_size) == ("unknown", 16, 8, 224)
    assert backend.run(tissue[:2]).shape == (2, 16)


def test_missing_openvino_names_the_extra(models, monkeypatch):
    real = __import__("importlib").import_module

    def no_openvino(name: str, *args: object) -> object:
        if name.split(".")[0] == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr("importlib.import_module", no_openvino)
    with pytest.raises(MissingDependency, match=r"OpenVINO is needed .*virchow-rt\[openvino\]"):
        OpenVinoBackend(models["fp32"], "fp32")


def test_importing_the_backend_module_does_not_import_openvino():
    code = (
        "import sys; import virchow_rt.runtime, virchow_rt.backends.openvino; "
        "assert 'openvino' not in sys.modules, 'imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tiny_model_of_another_width(tmp_path, tissue):
    model = build_tiny_onnx(tmp_path / "wide.fp32.onnx", width=32)
    with OpenVinoBackend(model, "fp32") as backend:
        assert backend.info.embedding_dim == 64
        np.testing.assert_allclose(backend.run(tissue[:3]), expected_embedding(tissue[:3], 32), atol=1e-5)
