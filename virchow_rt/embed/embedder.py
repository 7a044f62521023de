"""The :class:`Embedder`: any number of tiles in, float32 embeddings (N, E) out, in input order.

A background reader thread reads and preprocesses batch k+1 (memory-mapped .npy rows, image decoding,
resizing) while the backend runs batch k. The queue between them is bounded (memory stays flat), an
exception on either side reaches the caller, and the thread is always stopped and joined, so an error
never deadlocks or leaks a thread. The embedder talks to the model only through
:meth:`Backend.pipeline <virchow_rt.backends.base.Backend.pipeline>`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.contract import check_tile_array, embedding_dim
from virchow_rt.embed.tiles import TileSource
from virchow_rt.errors import BackendError, InputError, VirchowError
from virchow_rt.kernels.resize import needs_resize, resize_tiles
from virchow_rt.registry import check_pooling, get_variant

log = logging.getLogger(__name__)
DEFAULT_BATCH = 32
RESIZE = ("auto", "cpu", "gpu")
PREFETCH = 2  # batches read ahead: one being filled, one waiting; more only costs memory


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead; iterate it in the caller's thread.

    An exception raised by the source is re-raised by the consumer at that position. :meth:`close`
    (also on ``with`` exit) stops the thread even when the consumer stopped early, and joins it.
    """

    _DONE = object()

    def __init__(self, source: Iterable[Any], depth: int = PREFETCH) -> None:
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="virchow-rt-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._put(_Failure(err))
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


@dataclass
class StreamStats:
    """What embedding a stream of batches cost (pass one to :meth:`Embedder.embed_batches`).

    ``model_s``: time in the backend, waits for input excluded; ``wait_s``: time the backend waited for
    the reader thread's next batch (reading was the bottleneck then).
    """

    batches: int = 0
    tiles: int = 0
    model_s: float = 0.0
    wait_s: float = 0.0


class Embedder:
    """Embed tiles with an exported model (a path, opened with :func:`open_backend`) or a :class:`Backend`.

    ``batch_size`` defaults to the backend's ``preferred_batch`` when it has one (ONNX Runtime on CPU:
    8), else the variant's optimal batch (the engine profile's ``opt``), or 32 for an unknown variant;
    capped at the backend's ``max_batch``. ``progress`` shows a tqdm bar on stderr. ``resize``: where
    arrays of tiles that are not S×S are resized: "cpu" (:func:`~virchow_rt.kernels.resize.resize_tiles`),
    "gpu" (:class:`~virchow_rt.kernels.cuda_resize.CudaResizer` on the backend's GPU, the same pixels)
    or "auto" (the GPU when the backend runs on one and NVRTC is installed); :attr:`resize` says which.
    A backend passed in stays open on :meth:`close`; one opened here is closed.
    """

    def __init__(
        self,
        model_or_backend: str | os.PathLike | Backend,
        backend: str = "auto",
        batch_size: int | None = None,
        progress: bool = False,
        resize: str = "auto",
        **options: Any,
    ) -> None:
        if resize not in RESIZE:
            raise InputError(f"unknown resize {resize!r}; use one of: {', '.join(RESIZE)}")
        if isinstance(model_or_backend, Backend):
            self.backend, self._owns_backend = model_or_backend, False
        else:
            from virchow_rt.backends import open_backend

            self.backend, self._owns_backend = open_backend(model_or_backend, backend, **options), True
        self._resizer: Any = None  # the CudaResizer, made on first need
        self._resizer_lock = threading.Lock()
        self._closed = False
        try:
            self.info = self.backend.info
            self.batch_size = default_batch_size(self.backend, batch_size)
            self.progress = progress
            on_gpu = self.backend.gpu is not None
            if resize == "gpu" and not on_gpu:
                raise InputError(
                    f"resize='gpu' needs a backend that runs on a GPU; {self.backend.name} runs on the CPU "
                    "(use resize='cpu' or 'auto')"
                )
            # the GPU kernel does timm's bicubic, crop_pct 1 geometry; other encoders resize on the CPU
            kernel_fits = (self.info.crop_pct, self.info.interpolation) == (1.0, "bicubic")
            if resize == "gpu" and not kernel_fits:
                raise InputError(
                    f"resize='gpu' does bicubic with crop_pct 1.0; {self.info.variant} preprocesses with "
                    f"{self.info.interpolation}, crop_pct {self.info.crop_pct}: use resize='cpu' or 'auto'"
                )
            on_gpu = on_gpu and kernel_fits
            #: where tiles that are not S×S are resized: "cpu" or "gpu" ("auto" falls back to "cpu", with
            #: a warning, if the GPU kernel cannot be loaded when first needed)
            self.resize = "gpu" if resize == "gpu" or (resize == "auto" and on_gpu) else "cpu"
            self._strict_gpu = resize == "gpu"
            if self._strict_gpu:
                self._gpu_resizer()  # asked for by name: fail now, not in the middle of a run
        except BaseException:
            self.close()
            raise

    def _gpu_resizer(self) -> Any:
        """The CUDA resizer on the backend's GPU (made once), or None when resizing falls back to the CPU."""
        with self._resizer_lock:
            if self._closed:
                raise BackendError("this Embedder was closed; make a new one")
            if self._resizer is None and self.resize == "gpu":
                gpu = self.backend.gpu
                try:
                    from virchow_rt.kernels.cuda_resize import CudaResizer

                    self._resizer = CudaResizer(self.info.tile_size, device=gpu or 0)
                except VirchowError as err:  # cuda-python or NVRTC missing, or the kernel failed to load
                    if self._strict_gpu:
                        raise BackendError(f"cannot resize on GPU {gpu}: {err}; use resize='cpu'") from err
                    log.warning("resizing tiles on the CPU: the GPU resize kernel is unavailable (%s)", err)
                    self.resize = "cpu"
            return self._resizer

    def _needs_resize(self, tiles: np.ndarray) -> bool:
        return needs_resize(tiles.shape[1], tiles.shape[2], self.info.tile_size, self.info.crop_pct)

    def _resize(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> (B, S, S, 3) by the model's geometry, on the GPU or CPU (:attr:`resize`)."""
        info = self.info
        resizer = self._gpu_resizer() if self.resize == "gpu" and self._needs_resize(tiles) else None
        if resizer is not None:
            return resizer(tiles)  # type: ignore[no-any-return]
        return resize_tiles(tiles, info.tile_size, info.crop_pct, info.interpolation)

    def pooling(self, pooling: str | None = None) -> str:
        """``pooling`` checked, or the model's own (:attr:`ModelInfo.pooling`: what its authors use)."""
        return check_pooling(pooling or self.info.pooling)

    def embedding_dim(self, pooling: str | None = None) -> int:
        """Columns of the output for ``pooling``: 2·D for "cls_mean", D for "cls" (None: the model's)."""
        return embedding_dim(self.info, self.pooling(pooling))

    def embed(self, tiles: np.ndarray | TileSource, pooling: str | None = None) -> np.ndarray:
        """Embed uint8 tiles (N, H, W, 3) or a :class:`TileSource`; returns a new float32 (N, E) array.

        Tiles are resized by the model's geometry (timm's eval transform) where it changes them; ``pooling``
        None gives the model's own (:attr:`ModelInfo.pooling`). Zero tiles raise :class:`InputError`.
        """
        pooling = self.pooling(pooling)
        if isinstance(tiles, TileSource):
            tiles.tile_size = self.info.tile_size
            batches: Iterable[np.ndarray] = tiles.batches(self.batch_size, resize=self._prepare)
            total = len(tiles)
        elif isinstance(tiles, np.ndarray):
            check_tile_array(tiles)
            batches, total = self._array_batches(tiles), len(tiles)
        else:
            raise InputError(
                f"tiles are a {type(tiles).__name__}; pass a uint8 numpy array (N, H, W, 3) or "
                "virchow_rt.embed.open_tiles([...])"
            )
        if total == 0:
            raise InputError("no tiles to embed (0 given); pass at least one uint8 (H, W, 3) tile")
        parts = list(self._run(batches, pooling, total))
        if not parts:  # every image was skipped while reading
            raise InputError(
                "no tiles to embed: every input was skipped as unreadable (see the skipped list)"
            )
        return np.concatenate(parts) if len(parts) > 1 else parts[0]  # (N, E)

    def embed_batches(
        self, batches: Iterable[np.ndarray], pooling: str | None = None, stats: StreamStats | None = None
    ) -> Iterator[np.ndarray]:
        """Embed a stream of uint8 batches (B, H, W, 3); yields one float32 (B, E) array per batch, in order.

        The batches are pulled, validated and resized in the reader thread, ahead of the model (a lazy
        source, such as a slide's tile reader, keeps reading while the model runs). Batches larger than
        the backend's ``max_batch`` are split there and their embeddings joined again. ``stats``, when
        given, accumulates what the stream cost (:class:`StreamStats`).
        """
        pooling = self.pooling(pooling)
        limit = self.backend.max_batch
        pieces: deque[int] = deque()  # pieces of each caller's batch, appended in the reader thread

        def prepared() -> Iterator[np.ndarray]:
            for batch in batches:
                if not isinstance(batch, np.ndarray):
                    raise InputError(
                        f"a batch is a {type(batch).__name__}; pass uint8 numpy arrays (B, H, W, 3)"
                    )
                check_tile_array(batch)
                batch = self._resize(batch)  # (B, S, S, 3)
                parts = [batch]
                if limit and len(batch) > limit:  # rare: a batch bigger than the engine profile
                    parts = [batch[start : start + limit] for start in range(0, len(batch), limit)]
                pieces.append(len(parts))
                yield from parts

        outputs = self._run(prepared(), pooling, None, stats)
        try:
            for out in outputs:
                count = pieces.popleft()
                yield out if count == 1 else np.concatenate([out, *(next(outputs) for _ in range(count - 1))])
        finally:
            outputs.close()

    # --- internals ---------------------------------------------------------------------------
    def _array_batches(self, tiles: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(tiles), self.batch_size):
            rows = tiles[start : start + self.batch_size]  # (b, H, W, 3)
            yield self._prepare(rows)

    def _prepare(self, rows: np.ndarray) -> np.ndarray:
        """Rows (b, H, W, 3) -> a new (b, S, S, 3) array: resized, or copied (a strided/memory-mapped view)
        here, in the reader thread."""
        return self._resize(rows) if self._needs_resize(rows) else np.array(rows, order="C")

    def _run(
        self,
        batches: Iterable[np.ndarray],
        pooling: str,
        total: int | None,
        stats: StreamStats | None = None,
    ) -> Iterator[np.ndarray]:
        """Feed ``batches`` to the backend through the reader thread; yield pooled (B, E) float32 arrays.

        Each output is checked against its batch: (B, E), E the model's ``embedding_dim``.
        """
        stats = stats if stats is not None else StreamStats()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tile", desc=f"embed ({self.backend.name})", dynamic_ncols=True)
        width, dim = self.info.width, self.info.embedding_dim
        reader = Prefetcher(batches)
        sizes: deque[int] = deque()  # rows of each batch handed to the backend and not yet returned

        def fed() -> Iterator[np.ndarray]:  # pulled by the backend: time blocked here is waiting for input
            items = iter(reader)
            while True:
                t0 = time.perf_counter()
                batch = next(items, None)
                stats.wait_s += time.perf_counter() - t0
                if batch is None:
                    return
                sizes.append(len(batch))
                yield batch

        outputs = self.backend.pipeline(fed())
        try:
            while True:
                t0, waited = time.perf_counter(), stats.wait_s
                out = next(outputs, None)  # (B, E) float32
                stats.model_s += time.perf_counter() - t0 - (stats.wait_s - waited)
                if out is None:
                    return
                rows = sizes.popleft()
                if out.shape != (rows, dim):
                    raise BackendError(
                        f"{self.backend.name} returned embeddings {out.shape} for {rows} tiles; expected "
                        f"({rows}, {dim}): the model file and its metadata disagree; re-export the model"
                    )
                out = out[:, :width] if pooling == "cls" else out
                stats.batches += 1
                stats.tiles += rows
                if bar is not None:
                    bar.update(len(out))
                yield np.ascontiguousarray(out, dtype=np.float32)
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()  # stop the backend's pipeline generator (frees its in-flight work)
            reader.close()
            if bar is not None:
                bar.close()

    def close(self) -> None:
        """Free the GPU resizer, and close the backend if this embedder opened it. Safe to call twice."""
        lock = getattr(self, "_resizer_lock", None)
        if lock is not None:
            with lock:  # waits for a resize in progress in the reader thread
                self._closed = True
                if self._resizer is not None:
                    self._resizer.close()
                    self._resizer = None
        if self._owns_backend:
            self.backend.close()
            self._owns_backend = False

    def __enter__(self) -> Embedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def default_batch_size(backend: Backend, batch_size: int | None = None) -> int:
    """``batch_size``, else the backend's measured fastest batch (:attr:`Backend.preferred_batch`, e.g.
    8 for ONNX Runtime on a CPU), else the variant's optimal batch (:data:`DEFAULT_BATCH` for a variant
    the registry does not know); never above the backend's ``max_batch``."""
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1")
    if batch_size is None:
        try:
            variant_batch = get_variant(backend.info.variant).batch.opt
        except InputError:
            variant_batch = DEFAULT_BATCH
        batch_size = backend.preferred_batch or variant_batch
    return min(batch_size, backend.max_batch) if backend.max_batch else batch_size
