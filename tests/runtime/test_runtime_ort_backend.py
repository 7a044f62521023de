"""OnnxRuntimeBackend: loading, metadata, input checks, bad files, fp16, and the CPU attention fusion."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from runtime_models import WIDTH, build_attention_onnx, expected_embedding

from virchow_rt.backends import open_backend
from virchow_rt.backends.capabilities import physical_cores
from virchow_rt.backends.onnxruntime import OnnxRuntimeBackend
from virchow_rt.backends.ort_fusion import evict, fuse_attention, read_result
from virchow_rt.compare import cosine_rows
from virchow_rt.errors import BackendError, InputError, MissingDependency, ModelFileError
from virchow_rt.files import sha256_file


def test_fp32_runs_and_reads_metadata(models, tissue):
    with open_backend(models["fp32"]) as backend:
        assert backend.name == "onnxruntime-cpu"
        info = backend.info
        assert (info.variant, info.width, info.embedding_dim) == ("virchow2-tiny", WIDTH, 16)
        assert info.tile_size == 224
        assert info.precision == "fp32" and info.random_weights and info.weights_sha256 == "random"
        out = backend.run(tissue[:5])
        assert out.dtype == np.float32 and out.shape == (5, 16)
        np.testing.assert_allclose(out, expected_embedding(tissue[:5]), atol=1e-5)
        assert backend.model_sha256 == sha256_file(models["fp32"])


def test_threads_default_to_physical_cores(models):
    backend = OnnxRuntimeBackend(models["fp32"], "cpu")
    assert backend._options.intra_op_num_threads == physical_cores()
    assert backend._options.inter_op_num_threads == 1


def test_fp16_graph_runs_on_cpu(models, tissue):
    backend = OnnxRuntimeBackend(models["fp16"], "cpu")
    assert backend.info.precision == "fp16"
    assert backend.optimization == {"skipped": "fp16 model"}
    out = backend.run(tissue[:4])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected_embedding(tissue[:4]), atol=5e-3)
    assert cosine_rows(out, expected_embedding(tissue[:4])).min() > 0.9999


def test_info_falls_back_to_graph_shapes(models, tissue):
    backend = OnnxRuntimeBackend(models["nometa"], "cpu")
    info = backend.info
    assert (info.variant, info.embedding_dim, info.width, info.tile_size) == ("unknown", 16, 8, 224)
    assert info.weights_sha256 == "unknown" and not info.random_weights
    assert backend.run(tissue[:2]).shape == (2, 16)


def test_info_falls_back_to_manifest(models, tmp_path):
    model = Path(shutil.copy(models["nometa"], tmp_path / "virchow2-tiny.fp32.onnx"))
    manifest = {
        "schema_version": 1,
        "variant": "virchow2-tiny",
        "model_args": {"embed_dim": 8},
        "preprocess": {"size": 224},
        "batch": {"min": 1, "opt": 4, "max": 8},
        "weights": {"random": True, "sha256": "random"},
        "artifacts": [{"path": model.name, "format": "onnx", "precision": "fp32"}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    info = OnnxRuntimeBackend(model, "cpu").info
    assert (info.variant, info.width, info.precision) == ("virchow2-tiny", 8, "fp32")
    assert info.random_weights
    # an export folder opens its fp32 ONNX
    assert open_backend(tmp_path).info.variant == "virchow2-tiny"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, ["does not exist", "virchow-rt export"]),
        (b"", ["empty", "truncated"]),
        ("half", ["truncated", "re-export"]),
        (b"\x00garbage\xff" * 300, ["not ONNX", "re-export"]),
    ],
    ids=["missing", "empty", "truncated", "garbage"],
)
def test_bad_model_files(models, tmp_path, content, words):
    path = tmp_path / "bad.onnx"
    if content == "half":
        data = models["fp32"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelFileError) as err:
        open_backend(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_non_contract_graph_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(ModelFileError, match="not a virchow-rt export.*tiles"):
        open_backend(tmp_path / "other.onnx")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda t: t.astype(np.float32), ["float32", "uint8"]),
        (lambda t: t[0], ["(224, 224, 3)", "x[None]"]),
        (lambda t: np.ascontiguousarray(t.transpose(0, 3, 1, 2)), ["(2, 3, 224, 224)", "transpose"]),
        (lambda t: np.zeros((2, 256, 256, 3), np.uint8), ["256x256", "resize_tiles"]),
        (lambda t: t[:0], ["batch of 0"]),
        (lambda t: t.tolist(), ["list", "numpy"]),
    ],
    ids=["dtype", "rank", "channels-first", "size", "empty", "not-array"],
)
def test_bad_tiles_are_named(models, tissue, make, words):
    backend = open_backend(models["fp32"])
    with pytest.raises(InputError) as err:
        backend.run(make(tissue[:2]))
    for word in words:
        assert word in str(err.value)


def test_non_contiguous_tiles_are_accepted(models, tissue):
    backend = open_backend(models["fp32"])
    view = tissue[:6:2]  # strided
    np.testing.assert_allclose(backend.run(view), expected_embedding(view), atol=1e-5)


def test_unavailable_provider_says_how_to_fix(models):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*onnxruntime-cpu"):
        open_backend(models["fp32"], "onnxruntime-cuda")


def test_unknown_backend_and_suffix(models, tmp_path):
    with pytest.raises(InputError, match="unknown backend 'fast'"):
        open_backend(models["fp32"], "fast")
    with pytest.raises(InputError, match="TensorRT engines"):
        open_backend(models["fp32"], "tensorrt")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="suffix '.pt'"):
        open_backend(tmp_path / "model.pt")


# --- CPU attention fusion ---------------------------------------------------------------------------
def test_attention_fusion_matches_and_is_cached(tmp_path, tissue, private_cache, monkeypatch):
    model = build_attention_onnx(tmp_path / "attn.onnx")
    plain = OnnxRuntimeBackend(model, "cpu", optimize=False)
    fused = OnnxRuntimeBackend(model, "cpu")
    assert fused.optimization["fused_attention"] == 1
    entry = Path(fused.optimization["cache"])
    assert entry.parent.parent == private_cache and (entry / "model.onnx").exists()
    result = json.loads((entry / "result.json").read_text())
    assert result["use"] and result["min_cosine"] >= 0.99999
    a, b = plain.run(tissue[:6]), fused.run(tissue[:6])
    assert cosine_rows(a, b).min() >= 0.99999 and np.abs(a - b).max() < 1e-4
    stamp = (entry / "model.onnx").stat().st_mtime_ns
    opened: list[str] = []
    real_open = OnnxRuntimeBackend._open

    def spy(self, path, providers):
        opened.append(Path(path).name)
        return real_open(self, path, providers)

    monkeypatch.setattr(OnnxRuntimeBackend, "_open", spy)
    again = OnnxRuntimeBackend(model, "cpu")  # second open: only the cached copy loads, nothing is rebuilt
    assert again.optimization["cache"] == str(entry) and (entry / "model.onnx").stat().st_mtime_ns == stamp
    assert opened == ["model.onnx"]


def test_fusion_cache_keeps_the_most_recently_used_entries(tmp_path):
    folder = tmp_path / "ort-cpu"
    for i in range(6):  # entry 0 used longest ago ... entry 5 most recently
        (folder / f"e{i}").mkdir(parents=True)
        (folder / f"e{i}" / "result.json").write_text("{}")
        os.utime(folder / f"e{i}" / "result.json", (1000 + i, 1000 + i))
    (folder / "half-made").mkdir()  # no result.json: goes first
    (folder / ".e9.tmp").mkdir()  # another process's entry being built: left alone
    assert read_result(folder / "e1") == {}  # reading an entry marks it used now
    removed = evict(folder, keep=folder / "e0", limit=4)
    assert sorted(p.name for p in removed) == ["e2", "e3", "half-made"]
    assert sorted(p.name for p in folder.iterdir()) == [".e9.tmp", "e0", "e1", "e4", "e5"]


@pytest.mark.parametrize("scale", [0.9, 0.02])
def test_constant_scales_are_carried_over(tmp_path, tissue, scale):
    model = build_attention_onnx(tmp_path / "scaled.onnx", scale=scale)  # not 1/sqrt(head dim)
    fused = OnnxRuntimeBackend(model, "cpu")
    assert fused.optimization.get("fused_attention") == 1, fused.optimization
    reference = OnnxRuntimeBackend(model, "cpu", optimize=False).run(tissue[:4])
    assert cosine_rows(fused.run(tissue[:4]), reference).min() >= 0.99999


def test_fusion_that_changes_results_is_refused(tmp_path, tissue):
    odd = [0.1, 0.9, 0.2, 0.5, 0.3, 0.7, 0.4, 0.6]  # a per-channel q factor: Attention has no such scale
    model = build_attention_onnx(tmp_path / "odd_scale.onnx", scale=odd)
    backend = OnnxRuntimeBackend(model, "cpu")
    assert "disagrees with the original" in backend.optimization["skipped"]
    reference = OnnxRuntimeBackend(model, "cpu", optimize=False).run(tissue[:2])
    np.testing.assert_array_equal(backend.run(tissue[:2]), reference)


def test_fusion_finds_nothing_in_plain_graphs(models):
    import onnx

    proto = onnx.load(str(models["fp32"]))
    assert fuse_attention(proto) == 0
    backend = OnnxRuntimeBackend(models["fp32"], "cpu")
    assert backend.optimization == {"skipped": "no timm attention pattern found"}


def test_broken_cache_entry_falls_back(tmp_path, tissue, caplog):
    model = build_attention_onnx(tmp_path / "attn.onnx")
    entry = Path(OnnxRuntimeBackend(model, "cpu").optimization["cache"])
    (entry / "model.onnx").write_bytes(b"broken")
    backend = OnnxRuntimeBackend(model, "cpu")
    assert backend.optimization["skipped"].startswith("failed")
    assert "running the original graph" in caplog.text
    reference = OnnxRuntimeBackend(model, "cpu", optimize=False).run(tissue[:2])
    np.testing.assert_allclose(backend.run(tissue[:2]), reference, atol=1e-6)
    assert not entry.exists()  # the damaged entry was dropped: the next open rebuilds it
    rebuilt = OnnxRuntimeBackend(model, "cpu")
    assert rebuilt.optimization == {"fused_attention": 1, "cache": str(entry)}


@pytest.mark.parametrize("fused_sdpa", [False, True], ids=["exportable-attention", "sdpa-attention"])
def test_fusion_on_a_real_timm_export(tmp_path, tissue, fused_sdpa):
    """The rewrite must match what torch really exports from timm (both attention code paths)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from virchow_rt.registry import get_variant

    variant = get_variant("virchow2-tiny")
    net = timm.create_model(variant.timm_arch, pretrained=False, **variant.model_args).eval()
    for module in net.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = fused_sdpa

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, tiles):  # (N, S, S, 3) uint8 -> (N, 2D)
            x = tiles.permute(0, 3, 1, 2).float() / 255.0
            t = self.net.forward_features(x)  # (N, T, D)
            return torch.cat([t[:, 0], t[:, variant.num_prefix_tokens :].mean(1)], dim=1)

    path = tmp_path / "timm_tiny.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python bools in timm
        torch.onnx.export(
            Wrapper().eval(),
            (torch.zeros(2, 224, 224, 3, dtype=torch.uint8),),
            str(path),
            input_names=["tiles"],
            output_names=["embedding"],
            dynamic_axes={"tiles": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    fused = OnnxRuntimeBackend(path, "cpu")
    assert fused.optimization.get("fused_attention") == variant.model_args["depth"], fused.optimization
    plain = OnnxRuntimeBackend(path, "cpu", optimize=False)
    a, b = plain.run(tissue[:4]), fused.run(tissue[:4])
    assert cosine_rows(a, b).min() >= 0.99999


def test_export_folder_picks_the_precision_for_the_device(models, tmp_path, monkeypatch):
    from virchow_rt.backends import open as runtime

    for precision in ("fp16", "fp32"):
        shutil.copy(models[precision], tmp_path / f"tiny.{precision}.onnx")
    artifacts = [{"path": f"tiny.{p}.onnx", "format": "onnx", "precision": p} for p in ("fp16", "fp32")]
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "artifacts": artifacts}))
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: False)
    assert runtime._pick_from_folder(tmp_path, "auto").name == "tiny.fp32.onnx"  # CPU kernels are fp32
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: True)
    assert runtime._pick_from_folder(tmp_path, "auto").name == "tiny.fp16.onnx"  # a GPU runs fp16
    assert runtime._pick_from_folder(tmp_path, "onnxruntime-cpu").name == "tiny.fp32.onnx"
    # a GPU provider listed, but no GPU to run it on: the session is on the CPU, which wants fp32
    backend = open_backend(tmp_path)
    assert (backend.name, backend.path.name) == ("onnxruntime-cpu", "tiny.fp32.onnx")


@pytest.mark.parametrize("error", [ModelFileError, BackendError, MissingDependency])
def test_auto_falls_back_to_onnx_when_the_engine_is_refused(models, tmp_path, monkeypatch, caplog, error):
    from virchow_rt.backends import open as runtime
    from virchow_rt.backends import tensorrt as tensorrt_backend

    shutil.copy(models["fp32"], tmp_path / "tiny.fp32.onnx")
    (tmp_path / "tiny.fp16.engine").write_bytes(b"plan")
    artifacts = [{"path": "tiny.fp16.engine", "format": "tensorrt", "precision": "fp16"},
                 {"path": "tiny.fp32.onnx", "format": "onnx", "precision": "fp32"}]  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "artifacts": artifacts}))

    class Refused:
        def __init__(self, path: Path, **options: object) -> None:
            raise error(f"{path.name}: built with TensorRT 10.13.0.35, this runtime is 10.14.1.48")

    monkeypatch.setattr(runtime, "is_importable", lambda module: True)
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", Refused)
    with caplog.at_level("WARNING", logger="virchow_rt.backends.open"):
        backend = open_backend(tmp_path, slots=2)  # a TensorRT option, not passed on to ONNX Runtime
    assert backend.name == "onnxruntime-cpu" and backend.path.name == "tiny.fp32.onnx"
    assert "tiny.fp16.engine" in caplog.text and "10.14.1.48" in caplog.text and "ONNX Runtime" in caplog.text
    with pytest.raises(error, match="10.14.1.48"):  # asked for TensorRT by name: no fallback
        open_backend(tmp_path, "tensorrt")
