"""The engine builder's pure parts and argument checks (no TensorRT needed), and the CI removed-API check."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from virchow_rt.backends.tensorrt import LogBook, is_real_tensorrt
from virchow_rt.contract import Manifest
from virchow_rt.errors import BackendError, InputError, MissingDependency, ModelFileError
from virchow_rt.export.tensorrt_build import build_engine
from virchow_rt.export.tensorrt_prep import default_timing_cache, engine_name, network_flags, resolve_profile
from virchow_rt.files import sha256_file
from virchow_rt.registry import BatchProfile, get_variant

ROOT = Path(__file__).resolve().parents[2]


def test_profile_defaults_to_the_variant() -> None:
    v = get_variant("virchow2")
    assert resolve_profile(v) == v.batch == BatchProfile(1, 32, 64)
    assert resolve_profile(get_variant("virchow2g-mini")) == BatchProfile(1, 64, 256)


def test_max_batch_sets_the_max_and_caps_min_and_opt() -> None:
    v = get_variant("virchow2")
    assert resolve_profile(v, max_batch=128) == BatchProfile(1, 32, 128)
    assert resolve_profile(v, max_batch=16) == BatchProfile(1, 16, 16)
    assert resolve_profile(v, profile=(4, 8, 16), max_batch=2) == BatchProfile(2, 2, 2)


@pytest.mark.parametrize("profile", [(2, 8, 32), {"min": 2, "opt": 8, "max": 32}, BatchProfile(2, 8, 32)])
def test_profile_overrides(profile: Any) -> None:
    assert resolve_profile(get_variant("virchow2"), profile=profile) == BatchProfile(2, 8, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"profile": (8, 4, 16)}, "min=8, opt=4, max=16 is invalid"),
        ({"profile": (0, 1, 1)}, "is invalid"),
        ({"profile": {"min": 1}}, "not \\(min, opt, max\\)"),
        ({"profile": (1, 2)}, "not \\(min, opt, max\\)"),
        ({"max_batch": 0}, "max_batch is 0"),
    ],
)
def test_bad_profiles(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        resolve_profile(get_variant("virchow2"), **kwargs)


class Flag:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED's value in TensorRT 10


def test_strongly_typed_flag_on_10x_only() -> None:
    flag = Flag()
    assert network_flags("10.13.0.35", flag) == 1 << 1 and flag.calls == 1
    assert network_flags("10.12.0.36", flag) == 1 << 1
    eleven = Flag()
    assert network_flags("11.1.0.106", eleven) == 0  # implicit in 11: the flag is not even looked up
    assert eleven.calls == 0
    with pytest.raises(BackendError, match="too old"):
        network_flags("10.4.0.26", Flag())


def test_default_timing_cache_is_per_release_and_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VIRCHOW_RT_CACHE", str(tmp_path))
    path = default_timing_cache("10.13.0.35", "8.9")
    assert path == tmp_path / "tensorrt" / "timing-trt10.13.0-sm89.cache"
    assert default_timing_cache("10.13.0.99", "8.9") == path  # build number does not matter
    assert default_timing_cache("10.13.0.35", "9.0") != path


def test_logbook_quotes_tensorrt_errors() -> None:
    book = LogBook()
    assert book.quote() == "TensorRT logged no error"
    book.add("WARNING", "tactic skipped")
    book.add("ERROR", "IBuilder::buildSerializedNetwork: Error Code 4: out of memory")
    assert book.quote() == "TensorRT said: IBuilder::buildSerializedNetwork: Error Code 4: out of memory"
    assert book.errors() == ["IBuilder::buildSerializedNetwork: Error Code 4: out of memory"]


@pytest.fixture
def fake_export(tmp_path: Path) -> Path:
    """A folder that looks like an export (manifest + fp16/fp32 ONNX files); the graphs are placeholders."""
    entries = []
    for precision in ("fp32", "fp16"):
        path = tmp_path / f"virchow2-tiny.{precision}.onnx"
        path.write_bytes(f"not really onnx {precision}".encode())
        entries.append(
            {"path": path.name, "format": "onnx", "precision": precision, "sha256": sha256_file(path)}
        )
    v = get_variant("virchow2-tiny")
    manifest = {"variant": v.name, "model_args": dict(v.model_args), "preprocess": {"size": 224},
                "weights": {"random": True, "sha256": "random"}, "artifacts": entries}  # fmt: skip
    Manifest.from_dict(manifest).write(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimization_level": 6}, "levels are 0-5"),
        ({"workspace_gib": 0}, "positive size"),
        ({"exclude_lean_runtime": True}, "needs version_compatible"),
        ({"parity_tiles": 0}, "at least 1"),
        ({"max_batch": 0}, "max_batch is 0"),
    ],
)
def test_build_engine_checks_arguments_first(fake_export: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        build_engine(fake_export / "virchow2-tiny.fp16.onnx", fake_export, "virchow2-tiny", **kwargs)


def test_build_engine_wants_the_fp16_onnx_unchanged(fake_export: Path) -> None:
    with pytest.raises(InputError, match="not the fp16 ONNX"):
        build_engine(fake_export / "virchow2-tiny.fp32.onnx", fake_export, "virchow2-tiny")
    (fake_export / "virchow2-tiny.fp16.onnx").write_bytes(b"edited")
    with pytest.raises(ModelFileError, match="changed since it was exported"):
        build_engine(fake_export / "virchow2-tiny.fp16.onnx", fake_export, "virchow2-tiny")


def test_build_engine_writes_into_the_export_folder(fake_export: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="beside the ONNX and its manifest"):
        build_engine(fake_export / "virchow2-tiny.fp16.onnx", tmp_path / "elsewhere", "virchow2-tiny")


@pytest.mark.skipif(is_real_tensorrt(), reason="checks the message on a machine without TensorRT")
def test_build_engine_without_tensorrt_says_how_to_install_it(fake_export: Path) -> None:
    # here TensorRT is either absent or only its type stubs are installed (they import as an empty package)
    with pytest.raises(MissingDependency, match=r"TensorRT is needed to build TensorRT engines.*pip install"):
        build_engine(fake_export / "virchow2-tiny.fp16.onnx", fake_export, "virchow2-tiny")
    assert not (fake_export / engine_name(get_variant("virchow2-tiny"))).exists()


BAD = """
import tensorrt as trt
config.set_flag(trt.BuilderFlag.FP16)
config.max_workspace_size = 1 << 30
n = engine.num_bindings
shape = engine.get_binding_shape(0)
context.execute_async_v2(bindings, stream)
engine = builder.build_engine(network, config)
if hasattr(trt.BuilderFlag, "FP16"):
    pass
import pycuda.autoinit
"""

GOOD = """
import tensorrt as trt
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
context.set_input_shape("tiles", (8, 224, 224, 3))
context.execute_async_v3(stream)
entry = tensorrt_build.build_engine(onnx_path, out_dir, variant, max_batch=64)
dtype = trt.DataType.HALF  # a data type, not a builder flag
"""


def _api_check(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sample.py"
    path.write_text(source)
    cmd = ["bash", str(ROOT / ".ci" / "typecheck"), "--api", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_removed_api_check_catches_every_removed_call(tmp_path: Path) -> None:
    done = _api_check(tmp_path, BAD)
    assert done.returncode == 1
    for needle in ("FP16", "max_workspace_size", "num_bindings", "get_binding_shape", "execute_async_v2",
                   "build_engine(network, config)", "hasattr(..., 'FP16')", "import pycuda"):  # fmt: skip
        assert needle in done.stdout, (needle, done.stdout)
    assert "8 problem(s)" in done.stdout


def test_removed_api_check_passes_todays_api_and_this_package(tmp_path: Path) -> None:
    assert _api_check(tmp_path, GOOD).returncode == 0
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "typecheck"), "--api", str(ROOT / "virchow_rt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


def _uint8_graph(path: Path, cast_first: bool) -> None:
    """tiles uint8 (N, 4, 4, 3) -> [Transpose -> Cast | Cast -> Transpose] -> *2 -> embedding."""
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    cast = h.make_node("Cast", ["tiles"] if cast_first else ["b"], ["a"] if cast_first else ["c"], to=1)
    if cast_first:
        perm = h.make_node("Transpose", ["a"], ["c"], perm=[0, 3, 1, 2])
    else:
        perm = h.make_node("Transpose", ["tiles"], ["b"], perm=[0, 3, 1, 2])
    two = h.make_tensor("two", onnx.TensorProto.FLOAT, [], [2.0])
    mul = h.make_node("Mul", ["c", "two"], ["embedding"])
    graph = h.make_graph(
        [cast, perm, mul] if cast_first else [perm, cast, mul],
        "g",
        [h.make_tensor_value_info("tiles", onnx.TensorProto.UINT8, ["batch", 4, 4, 3])],
        [h.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [two],
    )
    if not cast_first:  # what shape inference records in real exports: the transposed tiles are uint8
        graph.value_info.append(h.make_tensor_value_info("b", onnx.TensorProto.UINT8, ["batch", 3, 4, 4]))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_uint8_input_is_cast_before_anything_else(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from virchow_rt.export.tensorrt_prep import cast_input_first

    path = tmp_path / "transpose_first.onnx"
    _uint8_graph(path, cast_first=False)
    rewritten = cast_input_first(path)
    assert rewritten is not None
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(rewritten)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if "tiles" in n.input] == ["Cast"]  # all TensorRT accepts
    tiles = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tiles": tiles})[
        0
    ]
    after = ort.InferenceSession(rewritten, providers=["CPUExecutionProvider"]).run(None, {"tiles": tiles})[0]
    np.testing.assert_array_equal(after, before)  # same numbers: uint8 -> float32 is exact
    cast_first = tmp_path / "cast_first.onnx"
    _uint8_graph(cast_first, cast_first=True)
    assert cast_input_first(cast_first) is None  # already what TensorRT wants: parsed from the file as it is
