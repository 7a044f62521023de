"""Helpers of the slide tests (imported by name: every test folder has its own conftest).

A fake backend that is cheap yet sensitive to tile content, cosine per row, timm-like square resize, and the
check that two runs wrote the same ``.h5``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo


class FakeBackend(Backend):
    """A cheap deterministic 'model': block means of the tile (14×14×3) times a fixed random matrix.

    Sensitive to tile content (cosine between different tissue tiles is well below 1), exact for equal tiles.
    """

    name = "fake-cpu"

    def __init__(
        self, width: int = 24, tile_size: int = 224, random_weights: bool = True, max_batch: int | None = None
    ):
        rng = np.random.default_rng(1234)
        self.proj = rng.standard_normal((14 * 14 * 3, 2 * width)).astype(np.float32)
        self.info = ModelInfo(
            "virchow2g-mini-tiny", 2 * width, width, tile_size, "fp32", random_weights, "random"
        )
        self.max_batch = max_batch
        self.batches: list[int] = []
        self.closed = False

    def run(self, tiles: np.ndarray) -> np.ndarray:
        s = self.info.tile_size
        assert tiles.dtype == np.uint8 and tiles.shape[1:] == (s, s, 3) and tiles.flags.c_contiguous, (
            tiles.shape
        )
        assert self.max_batch is None or len(tiles) <= self.max_batch
        self.batches.append(len(tiles))
        blocks = (
            tiles.reshape(len(tiles), 14, s // 14, 14, s // 14, 3).mean(axis=(2, 4)) / 255.0 - 0.5
        )  # (B, 14, 14, 3)
        return (blocks.reshape(len(tiles), -1).astype(np.float32) @ self.proj).astype(np.float32)  # (B, 2W)

    def close(self) -> None:
        self.closed = True


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def resize_square(tile: np.ndarray, size: int) -> np.ndarray:
    """PIL antialiased bicubic, as timm's eval transform (square tiles: no crop)."""
    if tile.shape[0] == size:
        return tile
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BICUBIC))


#: a 1792 × 1344 slide at 0.5 µm/px (8 × 6 tiles of 224 px) with two tissue pieces off the tile grid
STANDARD_PATCHES = ((250, 200, 900, 700), (1230, 760, 450, 430))


def same_outputs(a, b) -> None:
    """Assert the ``.h5`` files ``a`` and ``b`` hold the same coords, features (to 1e-5) and attributes."""
    from virchow_rt.slides import read_features

    x, y = read_features(a), read_features(b)
    np.testing.assert_array_equal(x["coords"], y["coords"])
    np.testing.assert_allclose(x["features"], y["features"], rtol=0, atol=1e-5)
    skip = {"created", "model_file", "timings"}
    assert {k: v for k, v in x["attrs"].items() if k not in skip} == {
        k: v for k, v in y["attrs"].items() if k not in skip
    }


def crashing_read(source, rows, size, skip_errors, fill=255):  # noqa: ANN001, ANN201 - tiles' signature
    """``tiles._read_in_process`` in a reading process, except that a slide named ``crash*`` kills the process
    (as a decoder crash does), leaving ``<slide>.crashed`` beside the slide first."""
    from virchow_rt.slides import tiles

    path = Path(source[0])
    if path.stem.startswith("crash"):
        path.with_suffix(".crashed").touch()
        os._exit(1)
    return tiles._read_in_process(source, rows, size, skip_errors, fill)
