"""Fixtures of the slide tests: synthetic pyramidal TIFFs of real IHC tissue on glass, a fake backend.

The slides come from :func:`virchow_rt.slides.synthetic.write_synthetic_slide` (tifffile, zlib, µm/px
in the resolution tags); each distinct one is written once per session and copied into the test.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from slide_helpers import STANDARD_PATCHES, FakeBackend

from virchow_rt._deps import is_importable
from virchow_rt.slides.synthetic import SyntheticSlide, write_synthetic_slide

_NEEDED = (("h5py", "h5py"), ("skimage", "scikit-image"), ("tifffile", "tifffile"))

_MISSING = [name for module, name in _NEEDED if not is_importable(module)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's tests, with the reason, where the ``slides`` extra is not installed."""
    if not _MISSING:
        return
    here = Path(__file__).parent
    reason = f"the slides extra is missing {', '.join(_MISSING)}: pip install 'virchow-rt[slides]'"
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def _slide_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"dir": tmp_path_factory.mktemp("slide-cache"), "slides": {}}


@pytest.fixture
def make_slide(tmp_path: Path, _slide_cache: dict) -> Callable[..., SyntheticSlide]:
    """``make(name, width, height, patches, mpp=, levels=, seed=)`` -> a slide in ``tmp_path/slides``.

    Each distinct slide is written once per session and copied."""

    def make(
        name: str = "slide.tif", width: int = 1792, height: int = 1344, patches=STANDARD_PATCHES, **kw
    ) -> SyntheticSlide:
        key = (width, height, tuple(patches), tuple(sorted(kw.items())))
        cached = _slide_cache["slides"].get(key)
        if cached is None:
            path = _slide_cache["dir"] / f"{len(_slide_cache['slides'])}.tif"
            cached = _slide_cache["slides"][key] = write_synthetic_slide(path, width, height, patches, **kw)
        folder = tmp_path / "slides"
        folder.mkdir(exist_ok=True)
        target = folder / name
        shutil.copyfile(cached.path, target)
        return dataclasses.replace(cached, path=target)

    return make


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder exported to an fp32 ONNX file with random weights (once per session)."""
    from virchow_rt.export import pipeline as export

    out = tmp_path_factory.mktemp("tiny-model")
    manifest = export.export_model(
        "virchow2g-mini-tiny", out, random_weights=True, precisions=["fp32"], parity_tiles=2
    )
    return out / manifest.select("onnx", "fp32")[0].path
