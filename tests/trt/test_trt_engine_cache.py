"""When an engine can be used here and when it must be rebuilt: pure logic on fake manifest metadata."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest

from virchow_rt.backends.engine_cache import (
    EngineKey,
    check_io,
    check_version,
    lean_runtime,
    parse_version,
    rebuild_command,
    release,
    runtime_problems,
    stale_reasons,
)
from virchow_rt.contract import Artifact, Manifest, ModelInfo, TensorSpec, buffer_nbytes, check_batch
from virchow_rt.errors import BackendError, InputError, ModelFileError


def _entry(artifact: dict[str, Any]) -> Artifact:
    """The typed manifest entry of a JSON one, as the runtime reads it."""
    return Artifact.from_dict(artifact)


def _manifest(manifest: dict[str, Any]) -> Manifest:
    return Manifest.from_dict(manifest)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("10.13.0.35", (10, 13, 0, 35)), ("11.0.0rc1", (11, 0, 0)), ("10.12", (10, 12)), (" 8.6.1", (8, 6, 1))],
)
def test_parse_version(text: str, parsed: tuple[int, ...]) -> None:
    assert parse_version(text) == parsed


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ModelFileError, match="version number"):
        parse_version("unknown")


def test_release_ignores_the_build_number() -> None:
    assert release("10.13.0.35") == release("10.13.0.99") == (10, 13, 0)
    assert release("11.1") == (11, 1, 0)


def test_check_version_refuses_old_tensorrt() -> None:
    assert check_version("10.12.0.36")[:2] == (10, 12)
    assert check_version("11.1.0.106")[0] == 11
    with pytest.raises(BackendError, match=r"TensorRT 10\.8\.0 is too old.*10\.12"):
        check_version("10.8.0")


def test_engine_key_round_trip(trt_artifact: dict[str, Any]) -> None:
    key = EngineKey.from_artifact(_entry(trt_artifact))
    assert key.profile == (1, 32, 64)
    assert key.compute_capability == "8.9"
    assert EngineKey.from_artifact(_entry({**trt_artifact, **key.to_dict()})) == key
    assert len(key.digest()) == 16
    assert key.digest() == EngineKey.from_artifact(_entry(dict(trt_artifact))).digest()
    assert key.digest() != dataclasses.replace(key, profile=(1, 32, 128)).digest()


def test_engine_key_from_incomplete_entry_names_what_is_missing(trt_artifact: dict[str, Any]) -> None:
    del trt_artifact["onnx_sha256"]
    with pytest.raises(ModelFileError, match="onnx_sha256.*--tensorrt"):
        EngineKey.from_artifact(_entry(trt_artifact))


def test_same_key_is_not_stale(trt_artifact: dict[str, Any]) -> None:
    key = EngineKey.from_artifact(_entry(trt_artifact))
    assert stale_reasons(key, key) == []
    # another build number of the same release builds the same engines
    assert stale_reasons(key, dataclasses.replace(key, tensorrt_version="10.13.0.99")) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"onnx_sha256": "c" * 64}, "ONNX graph changed"),
        ({"tensorrt_version": "10.14.1.48"}, r"built with TensorRT 10\.13\.0\.35, this is 10\.14\.1\.48"),
        ({"compute_capability": "9.0"}, r"compute capability 8\.9, this GPU is 9\.0"),
        ({"profile": (1, 16, 32)}, r"batch profile .* \(1, 32, 64\), wanted \(1, 16, 32\)"),
        ({"version_compatible": True}, "version_compatible is False, wanted True"),
        ({"onnx_data_sha256": "d" * 64}, "external data"),
        ({"optimization_level": 5}, "optimization level 3, wanted 5"),
    ],
)
def test_each_change_makes_the_engine_stale(trt_artifact: dict[str, Any], change: dict, reason: str) -> None:
    built = EngineKey.from_artifact(_entry(trt_artifact))
    reasons = stale_reasons(built, dataclasses.replace(built, **change))
    assert len(reasons) == 1
    assert re.search(reason, reasons[0]), reasons


def test_version_compatible_engine_is_reused_by_later_tensorrt_only(trt_artifact: dict[str, Any]) -> None:
    built = EngineKey.from_artifact(_entry({**trt_artifact, "version_compatible": True}))
    assert stale_reasons(built, dataclasses.replace(built, tensorrt_version="11.1.0.106")) == []
    older = stale_reasons(built, dataclasses.replace(built, tensorrt_version="10.12.0.36"))
    assert older and "newer than this 10.12.0.36" in older[0]


def test_lean_runtime_choice_is_part_of_a_version_compatible_key(trt_artifact: dict[str, Any]) -> None:
    assert lean_runtime(False, False) is None and lean_runtime(True, True) == "excluded"
    built = EngineKey.from_artifact(
        _entry({**trt_artifact, "version_compatible": True, "lean_runtime": "embedded"})
    )
    assert built.lean_runtime == "embedded"
    reasons = stale_reasons(built, dataclasses.replace(built, lean_runtime="excluded"))
    assert reasons == ["its lean runtime is embedded, wanted excluded"]


def test_runtime_accepts_the_machine_it_was_built_on(trt_artifact: dict[str, Any]) -> None:
    assert runtime_problems(_entry(trt_artifact), "tensorrt", "10.13.0.35", "NVIDIA L4", "8.9") == ([], [])


def test_runtime_refuses_another_tensorrt_version(trt_artifact: dict[str, Any]) -> None:
    errors, _ = runtime_problems(_entry(trt_artifact), "tensorrt", "10.14.1.48", "NVIDIA L4", "8.9")
    assert errors == ["it was built with TensorRT 10.13.0.35 and this runtime is 10.14.1.48"]


def test_runtime_refuses_another_compute_capability(trt_artifact: dict[str, Any]) -> None:
    errors, _ = runtime_problems(
        _entry(trt_artifact), "tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0"
    )
    assert len(errors) == 1
    assert "compute capability 8.9 (NVIDIA L4)" in errors[0] and "NVIDIA H100 80GB HBM3" in errors[0]


def test_same_capability_other_gpu_is_a_warning(trt_artifact: dict[str, Any]) -> None:
    errors, notes = runtime_problems(_entry(trt_artifact), "tensorrt", "10.13.0.35", "NVIDIA RTX 4090", "8.9")
    assert errors == []
    assert len(notes) == 1 and "tuned on a NVIDIA L4" in notes[0] and "rebuild it here" in notes[0]


def test_lean_runtime_needs_a_version_compatible_engine(trt_artifact: dict[str, Any]) -> None:
    errors, _ = runtime_problems(_entry(trt_artifact), "tensorrt_lean", "10.13.0.35", "NVIDIA L4", "8.9")
    assert any("loads only version-compatible engines" in e for e in errors)
    vc = {**trt_artifact, "version_compatible": True}
    assert runtime_problems(_entry(vc), "tensorrt_lean", "10.14.1.48", "NVIDIA L4", "8.9") == ([], [])
    errors, _ = runtime_problems(_entry(vc), "tensorrt_lean", "10.12.0.36", "NVIDIA L4", "8.9")
    assert errors and "only works forwards" in errors[0]


@pytest.mark.parametrize("module", ["tensorrt", "tensorrt_lean"])
def test_excluded_lean_runtime_needs_the_same_version_or_its_library(
    trt_artifact: dict[str, Any], module: str
) -> None:
    excluded = {**trt_artifact, "version_compatible": True, "lean_runtime": "excluded"}
    assert runtime_problems(_entry(excluded), module, "10.13.0.35", "NVIDIA L4", "8.9") == ([], [])
    errors, _ = runtime_problems(_entry(excluded), module, "10.14.1.48", "NVIDIA L4", "8.9")
    assert len(errors) == 1 and "lean runtime excluded" in errors[0] and "lean_library=PATH" in errors[0]
    library = "/opt/trt-10.13/libnvinfer_lean.so.10"
    loaded = runtime_problems(
        _entry(excluded), module, "10.14.1.48", "NVIDIA L4", "8.9", lean_library=library
    )
    assert loaded == ([], [])
    embedded = {**excluded, "lean_runtime": "embedded"}
    assert runtime_problems(_entry(embedded), module, "10.14.1.48", "NVIDIA L4", "8.9") == ([], [])


def test_rebuild_command(trt_manifest: dict[str, Any], tmp_path) -> None:
    cmd = rebuild_command(_manifest(trt_manifest), tmp_path)
    assert cmd.startswith(f"virchow-rt export virchow2 --out {tmp_path} --weights ")
    assert cmd.endswith("--tensorrt")
    trt_manifest["weights"] = {"random": True, "sha256": "random", "source": "timm init"}
    assert "--random-weights" in rebuild_command(_manifest(trt_manifest), tmp_path)
    trt_manifest["weights"] = {"random": False, "sha256": "x", "source": str(tmp_path)}
    assert f"--weights {tmp_path} " in rebuild_command(_manifest(trt_manifest), tmp_path)


def _specs(size: int = 224, dim: int = 2560) -> dict[str, TensorSpec]:
    return {
        "tiles": TensorSpec("tiles", True, np.dtype(np.uint8), (-1, size, size, 3)),
        "embedding": TensorSpec("embedding", False, np.dtype(np.float32), (-1, dim)),
        "patch_tokens": TensorSpec("patch_tokens", False, np.dtype(np.float32), (-1, 256, 1280)),
    }


def _info(**kw: Any) -> ModelInfo:
    base = dict(variant="virchow2", embedding_dim=2560, width=1280, tile_size=224, precision="fp16",
                random_weights=False, weights_sha256="b" * 64)  # fmt: skip
    return ModelInfo(**{**base, **kw})


def test_buffer_sizing() -> None:
    specs = _specs()
    assert specs["tiles"].nbytes(64) == 64 * 224 * 224 * 3
    assert specs["embedding"].nbytes(64) == 64 * 2560 * 4
    assert specs["patch_tokens"].nbytes(7) == 7 * 256 * 1280 * 4
    assert buffer_nbytes((-1, 10), 0, 4) == 0
    with pytest.raises(BackendError, match="dynamic dimension"):
        buffer_nbytes((-1, -1, 3), 4, 1)


@pytest.mark.parametrize(("size", "dim"), [(224, 2560), (448, 768)])
def test_check_io_accepts_the_export_contract(size: int, dim: int) -> None:
    """uint8 tiles (B, S, S, 3) in, float32 (B, E) out, for the model's own S and E; outputs besides the
    embedding (patch tokens) are allowed; the same engine for another S or E is not."""
    specs = _specs(size, dim)
    assert "patch_tokens" in specs and check_io(specs, _info(tile_size=size, embedding_dim=dim)) is None
    with pytest.raises(ModelFileError, match=f"expected uint8 \\(batch, {size + 1}, {size + 1}, 3\\)"):
        check_io(specs, _info(tile_size=size + 1, embedding_dim=dim))
    with pytest.raises(ModelFileError, match=f"expected float32 \\(batch, {dim * 2}\\)"):
        check_io(specs, _info(tile_size=size, embedding_dim=dim * 2))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (TensorSpec("tiles", True, np.dtype(np.float32), (-1, 224, 224, 3)), "expected uint8"),
        (TensorSpec("tiles", True, np.dtype(np.uint8), (-1, 3, 224, 224)), "expected uint8"),
        (TensorSpec("embedding", False, np.dtype(np.float16), (-1, 2560)), "expected float32"),
        (TensorSpec("embedding", False, np.dtype(np.float32), (-1, 1280)), r"float32 \(batch, 2560\)"),
        (TensorSpec("mask", True, np.dtype(np.uint8), (-1,)), "besides 'tiles'"),
    ],
)
def test_check_io_refuses_other_engines(spec: TensorSpec, match: str) -> None:
    specs = {**_specs(), spec.name: spec}
    with pytest.raises(ModelFileError, match=match):
        check_io(specs, _info())


def test_check_batch() -> None:
    assert check_batch((5, 224, 224, 3), np.uint8, 224, 64) == 5
    with pytest.raises(InputError, match=r"resize_tiles\(tiles, 224\)"):
        check_batch((5, 256, 256, 3), np.uint8, 224, 64)
    with pytest.raises(InputError, match="uint8"):
        check_batch((5, 224, 224, 3), np.float32, 224, 64)
    with pytest.raises(InputError, match="max batch 64.*--max-batch 65"):
        check_batch((65, 224, 224, 3), np.uint8, 224, 64)


def test_model_info_from_manifest(trt_manifest: dict[str, Any], trt_artifact: dict[str, Any]) -> None:
    info = ModelInfo.from_manifest(_manifest(trt_manifest), _entry(trt_artifact))
    assert info == _info()
    trt_manifest["weights"] = {"random": True, "sha256": "random"}
    assert ModelInfo.from_manifest(_manifest(trt_manifest), _entry(trt_artifact)).random_weights
    del trt_manifest["preprocess"]
    with pytest.raises(ModelFileError, match="preprocess"):
        ModelInfo.from_manifest(_manifest(trt_manifest), _entry(trt_artifact))
