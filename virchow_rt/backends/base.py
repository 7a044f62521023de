"""The one small interface every backend implements (ONNX Runtime, TensorRT, PyTorch reference).

Batching, pipelining, parity and benchmarks talk only to :class:`Backend`. This module imports
only the standard library and numpy.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from virchow_rt.contract import ModelInfo
from virchow_rt.files import sha256_file


class Backend(abc.ABC):
    """Runs uint8 tiles (B, S, S, 3) through one exported model and returns float32 embeddings (B, E)."""

    #: short name shown to users and in reports, e.g. "onnxruntime-cpu", "tensorrt", "torch-eager"
    name: str
    info: ModelInfo
    #: largest batch the backend accepts in one call (None: no limit)
    max_batch: int | None = None
    #: the batch it runs fastest at, measured (None: use the variant's default batch)
    preferred_batch: int | None = None
    #: index of the CUDA GPU it computes on; None when it runs on the CPU
    gpu: int | None = None
    #: the model file it runs (an ``.onnx`` or an engine); None for a model held in memory (PyTorch)
    path: Path | None = None
    #: what opening the model did to its graph (ONNX Runtime's CPU attention fusion:
    #: ``{"fused_attention": n, "cache": folder}`` or ``{"skipped": reason}``); None: nothing to say
    optimization: dict[str, Any] | None = None
    #: whether :meth:`run` takes tiles of any size and applies the model's own transform itself (the
    #: PyTorch reference); else tiles must already be S×S (``info.tile_size``)
    transforms_tiles: bool = False
    #: slots :meth:`pipeline` takes in turn from the first in every pass, each of which a warm-up must
    #: reach (torch-cuda captures a slot's CUDA graph on its first full batch); 0 where none need it
    slots: int = 0

    @abc.abstractmethod
    def run(self, tiles: np.ndarray) -> np.ndarray:
        """Embed one batch synchronously.

        ``tiles``: C-contiguous uint8 (B, S, S, 3). Returns a new (B, E) float32 array.
        """

    def pipeline(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Embed a stream of batches in order, overlapping work where the backend can.

        The default runs them one after another; a GPU backend overlaps the copy of batch k+1 and the
        readback of batch k-1 with the compute of batch k. Yields one (B, E) float32 array per batch.
        """
        for batch in batches:
            yield self.run(batch)

    @property
    def model_sha256(self) -> str | None:
        """Hex SHA-256 of :attr:`path`, the file that identifies the model; None without a file."""
        return None if self.path is None else sha256_file(self.path)

    def time_compute(self, tiles: np.ndarray, *, repeats: int = 10, warmup: int = 2) -> list[float] | None:
        """Seconds of device time per run of one batch, without host copies (CUDA events), for the last
        ``repeats`` of ``warmup`` + ``repeats`` runs; None (the default) where the backend cannot time its
        device work apart from the host (a CPU backend)."""
        return None

    def graph_use(self) -> dict[str, int] | None:
        """Runs so far that replayed a CUDA graph and that ran eager, and the slots captured
        (``{"replayed", "eager", "slots_captured"}``); None (the default) for a backend that does not count
        them (all but torch-cuda)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: a backend holding nothing need not override it
        """Free sessions, streams and buffers. Safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
