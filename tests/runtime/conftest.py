"""Fixtures for runtime tests: tiny contract-shaped ONNX models, a private cache folder, real tissue tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime_models import build_tiny_onnx

from virchow_rt.tissue import tissue_tiles


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own cache (ONNX Runtime optimizations, OpenVINO compiles and gate verdicts), out of the
    user's ~/.cache and out of other tests' way: a verdict one test cached must not decide another's."""
    cache = tmp_path / "virchow-rt-cache"
    monkeypatch.setenv("VIRCHOW_RT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ONNX models: fp32, fp16, without metadata, and with real (non-random) weights."""
    folder = tmp_path_factory.mktemp("models")
    return {
        "fp32": build_tiny_onnx(folder / "tiny.fp32.onnx"),
        "fp16": build_tiny_onnx(folder / "tiny.fp16.onnx", precision="fp16"),
        "nometa": build_tiny_onnx(folder / "nometa.onnx", with_metadata=False),
        "real": build_tiny_onnx(folder / "real.fp32.onnx", random=False),
    }


@pytest.fixture(scope="session")
def tissue() -> np.ndarray:
    """40 real-tissue tiles, uint8 (40, 224, 224, 3)."""
    return tissue_tiles(40, 224, seed=3)
