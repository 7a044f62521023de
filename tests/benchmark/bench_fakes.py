"""Fake backends for benchmark tests: deterministic embeddings, no model, milliseconds to run."""

from __future__ import annotations

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo

EMBED_DIM = 16


def fake_embed(tiles: np.ndarray) -> np.ndarray:
    """A fixed function of the tiles: per-channel statistics through a fixed random projection -> (B, 16)."""
    x = tiles.astype(np.float64) / 255.0  # (B, S, S, 3)
    feats = np.concatenate(
        [x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, ::7, ::7].mean(axis=1).reshape(len(x), -1)[:, :10]], 1
    )
    proj = np.random.default_rng(123).standard_normal((feats.shape[1], EMBED_DIM))
    return (feats @ proj).astype(np.float32)  # (B, 16)


class FakeBackend(Backend):
    """Embeds with :func:`fake_embed`, plus relative noise ``noise`` (a lower-precision stand-in)."""

    def __init__(
        self, name: str = "fake", noise: float = 0.0, max_batch: int | None = None, fail: bool = False
    ):
        self.name = name
        self.noise = noise
        self.max_batch = max_batch
        self.fail = fail
        self.calls = 0
        self.closed = False
        self.info = ModelInfo("fake", EMBED_DIM, EMBED_DIM // 2, 224, "fp32", True, "random")

    def run(self, tiles: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("fake backend failure")
        self.calls += 1
        out = fake_embed(tiles)
        if self.noise:
            rng = np.random.default_rng(self.calls)
            out = out + self.noise * np.abs(out).mean() * rng.standard_normal(out.shape).astype(np.float32)
        return out

    def close(self) -> None:
        self.closed = True
