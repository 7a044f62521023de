"""Fixtures for the TensorRT / CUDA tests: fake engine metadata (CPU) and a tiny real export (TensorRT)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def trt_artifact() -> dict[str, Any]:
    """A TensorRT manifest entry as the builder writes it (values of an imaginary L4 build)."""
    return {
        "path": "virchow2.fp16.engine",
        "format": "tensorrt",
        "precision": "fp16",
        "sha256": "0" * 64,
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 2560]}],
        "tensorrt_version": "10.13.0.35",
        "gpu": "NVIDIA L4",
        "compute_capability": "8.9",
        "profile": {"min": 1, "opt": 32, "max": 64},
        "onnx_sha256": "a" * 64,
        "version_compatible": False,
    }


@pytest.fixture
def trt_manifest(trt_artifact: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "variant": "virchow2",
        "model_args": {"embed_dim": 1280},
        "preprocess": {"size": 224},
        "weights": {
            "random": False,
            "sha256": "b" * 64,
            "source": "hf://paige-ai/Virchow2@abc (model.safetensors)",
        },
        "artifacts": [trt_artifact],
    }


@pytest.fixture(scope="session")
def tiny_onnx_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, Any]]:
    """(variant, folder, manifest) of a random-weights virchow2-tiny fp32 + fp16 ONNX export."""
    from virchow_rt.export.pipeline import export_model

    out = tmp_path_factory.mktemp("trt-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = export_model("virchow2-tiny", out, random_weights=True, parity_tiles=8, max_batch=16)
    return "virchow2-tiny", out, manifest


@pytest.fixture(scope="session")
def tiny_engine(tiny_onnx_export: tuple[str, Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """(engine path, its manifest entry as JSON) of an engine built from the tiny export (max batch 16)."""
    from virchow_rt.export.tensorrt_build import build_engine

    name, folder, _ = tiny_onnx_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = build_engine(folder / f"{name}.fp16.onnx", folder, name, max_batch=16, timing_cache=None)
    return folder / entry.path, entry.to_dict()
