"""Shared test settings: markers that skip with a reason where hardware or a library is missing."""

from __future__ import annotations

import pytest

from virchow_rt._deps import is_importable


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size models)")


def _cuda_visible() -> bool:
    if not is_importable("cuda.bindings.runtime"):
        return False
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {
        "slow": None
        if config.getoption("--runslow")
        else "slow (full-size model or torch.compile): run with --runslow",
        "tensorrt": None if is_importable("tensorrt") else "TensorRT is not importable on this machine",
    }
    if any("gpu" in item.keywords for item in items):
        skips["gpu"] = None if _cuda_visible() else "no CUDA GPU visible (cuda-python missing or no device)"
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
