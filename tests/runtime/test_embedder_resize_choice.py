"""Where the Embedder resizes tiles, and with what: written from the mutants ``mutmut`` left alive in its
resize choice (``Embedder.__init__``, ``_gpu_resizer``, ``_needs_resize``, ``_resize``; README: Tests).

A stand-in GPU resizer (no GPU here) gives the CPU reference with red and blue swapped, so a test sees
which resizer's pixels reached the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo
from virchow_rt.embed import Embedder
from virchow_rt.errors import InputError
from virchow_rt.kernels.resize import resize_tiles

S = 28  # tile size


class Means(Backend):
    """Embeds a tile as its mean RGB twice (E = 6, width 3)."""

    name = "means"

    def __init__(self, gpu: int | None = None, crop_pct: float = 1.0, interpolation: str = "bicubic") -> None:
        info = ModelInfo("unknown-variant", 6, 3, S, "fp32", True, "random")
        self.info = dataclasses.replace(info, crop_pct=crop_pct, interpolation=interpolation)
        self.gpu = gpu

    def run(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.shape[1:] == (S, S, 3), tiles.shape
        mean = tiles.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)  # (B, 3)
        return np.concatenate([mean, mean + 1000], axis=1)  # (B, 6)


class SwappedResizer:
    """Stands in for CudaResizer: records where it was made and its calls; swaps red and blue."""

    def __init__(self, size: int, device: int) -> None:
        self.size, self.device, self.calls = size, device, 0
        made.append(self)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.ascontiguousarray(resize_tiles(tiles, self.size)[..., ::-1])

    def close(self) -> None:
        pass


made: list[SwappedResizer] = []


@pytest.fixture(autouse=True)
def stand_in_resizer(monkeypatch: pytest.MonkeyPatch) -> None:
    from virchow_rt.kernels import cuda_resize

    made.clear()
    monkeypatch.setattr(cuda_resize, "CudaResizer", SwappedResizer)


def _tiles(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _means(tiles: np.ndarray) -> np.ndarray:
    return tiles.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)  # (B, 3)


def test_the_resizer_is_made_on_the_backends_own_gpu_even_gpu_0():
    tiles = _tiles(2, 40, 40)
    with Embedder(Means(gpu=0), resize="gpu") as embedder:
        embedder.embed(tiles)
    assert [(r.size, r.device, r.calls) for r in made] == [(S, 0, 1)]


def test_tiles_of_the_model_width_but_another_height_are_resized_on_the_gpu():
    tiles = _tiles(2, 40, S)  # W is already S; H is not
    with Embedder(Means(gpu=0)) as embedder:
        out = embedder.embed(tiles)
    assert made and made[0].calls == 1
    np.testing.assert_allclose(out[:, :3], _means(resize_tiles(tiles, S)[..., ::-1]), rtol=1e-5)


def test_a_stream_of_tiles_already_at_the_model_size_never_goes_through_the_gpu_resizer():
    tiles = _tiles(3, S, S)
    with Embedder(Means(gpu=0)) as embedder:
        assert embedder.resize == "gpu"
        (out,) = embedder.embed_batches([tiles])
    assert not made  # a slide's tile reader hands S×S tiles: nothing to resize, no resizer made
    np.testing.assert_allclose(out[:, :3], _means(tiles), rtol=1e-5)


def test_an_encoder_that_crops_resizes_tiles_of_its_own_size_too():
    tiles = _tiles(2, S, S)  # timm: resize to S / 0.875, centre crop S: not the tile as it is
    with Embedder(Means(crop_pct=0.875, interpolation="bilinear")) as embedder:
        out = embedder.embed(tiles)
    want = _means(resize_tiles(tiles, S, 0.875, "bilinear"))
    np.testing.assert_allclose(out[:, :3], want, rtol=1e-5)
    assert not np.allclose(want, _means(tiles), rtol=1e-3)


def test_an_embedder_opens_a_model_with_the_backend_and_options_given(monkeypatch: pytest.MonkeyPatch):
    from virchow_rt import backends

    opened = []

    def open_backend(model, backend="auto", **options):
        opened.append((model, backend, options))
        return Means()

    monkeypatch.setattr(backends, "open_backend", open_backend)
    with Embedder("model.onnx", backend="onnxruntime", allow_engine_host_code=True):
        pass
    assert opened == [("model.onnx", "onnxruntime", {"allow_engine_host_code": True})]


def test_bad_resize_choices_say_the_choices_and_the_fix():
    with pytest.raises(InputError, match=r"^unknown resize 'fast'; use one of: auto, cpu, gpu$"):
        Embedder(Means(), resize="fast")
    with pytest.raises(InputError, match=r"runs on the CPU \(use resize='cpu' or 'auto'\)$"):
        Embedder(Means(), resize="gpu")
