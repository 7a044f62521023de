"""The Python API: a slide's tissue tiles and their embeddings, without writing files.

>>> for batch in iter_tiles("slide.svs", mpp=0.5):  # doctest: +SKIP
...     batch.coords, batch.tiles  # (B, 2) level-0 x, y; uint8 (B, 224, 224, 3)
>>> result = embed_slide("slide.svs", "out/virchow2.fp32.onnx")  # doctest: +SKIP
>>> result.features.shape, result.coords.shape  # (N, 2560), (N, 2)  # doctest: +SKIP

Reading runs ahead of the model in worker threads (:mod:`virchow_rt.slides.tiles`); the batches go through
an :class:`~virchow_rt.embed.Embedder` (the one batch loop) over any
:class:`~virchow_rt.backends.base.Backend` (or a model file opened with ``open_backend``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.backends.open import open_backend
from virchow_rt.contract import ModelInfo
from virchow_rt.embed import Embedder, StreamStats
from virchow_rt.embed.embedder import Prefetcher
from virchow_rt.slides.grid import TileGrid, TilePlan, tile_grid
from virchow_rt.slides.reader import Slide, open_slide
from virchow_rt.slides.regions import RegionGrid, region_grid
from virchow_rt.slides.tiles import ReadStats, TileBatch, TileReader

G = TypeVar("G", TileGrid, RegionGrid)


@contextlib.contextmanager
def opened_slide(slide: str | Path | Slide, slide_mpp: float | None = None) -> Iterator[Slide]:
    """Yield ``slide`` itself, or open the path and close it afterwards."""
    if isinstance(slide, Slide):
        yield slide
        return
    with open_slide(slide, slide_mpp=slide_mpp) as handle:
        yield handle


@contextlib.contextmanager
def opened_backend(model: str | Path | Backend | Any, backend: str = "auto") -> Iterator[Backend]:
    """Yield ``model`` if it is a :class:`Backend` (an ``Embedder``'s own backend for an ``Embedder``), else
    the model file or export folder opened with ``open_backend`` (and closed after)."""
    if isinstance(model, Embedder):  # its backend, which it owns and keeps open
        model = model.backend
    if isinstance(model, Backend):
        yield model
        return
    with open_backend(model, backend=backend) as opened:
        yield opened


class EmbeddingStream:
    """Embeds the tiles of a plan in order: iterate for (indices (B,) into the plan, features (B, E) float32).

    Tiles are read at the model's input size by a :class:`TileReader`'s workers, running ahead; the
    :class:`~virchow_rt.embed.Embedder` pulls their batches in its reader thread (resizing by the model's
    geometry where that changes them) while the model runs. Tiles that fail with ``skip_errors`` are missing
    from the indices (see ``read_stats.errors``). ``embed_s``: time in the model, waits for tiles excluded;
    ``wait_s``: the model's wait for tiles. :meth:`start` begins reading before the model is free (the next
    slide of a cohort); :meth:`close` stops a stream that was started but not iterated to its end.
    """

    def __init__(
        self,
        slide: Slide,
        embedder: Embedder,
        plan: TilePlan,
        *,
        pooling: str | None = None,
        workers: int | None = None,
        skip_errors: bool = False,
        prefetch_batches: int = 2,
        processes: bool | None = None,
    ) -> None:
        self.embedder = embedder
        self.plan = plan.resized(embedder.info.tile_size)
        self.pooling = embedder.pooling(pooling)
        self.dim = embedder.embedding_dim(self.pooling)
        self.skip_errors = skip_errors
        self.reader = TileReader(
            slide, workers=workers, prefetch_batches=prefetch_batches, processes=processes
        )
        self.stats = StreamStats()
        self._prefetch_batches = prefetch_batches
        self._batches: Iterator[TileBatch] | None = None  # the reader's batches, once started
        self._ahead: Prefetcher | None = None  # the thread reading them ahead, once started

    def start(self) -> EmbeddingStream:
        """Begin reading now: a background thread pulls the first batches (at most ``prefetch_batches``
        of them, on top of the reader's own window) before the model asks for them. Returns ``self``."""
        if self._batches is None:
            self._batches = self.reader.batches(self.plan, self.embedder.batch_size, self.skip_errors)
            self._ahead = Prefetcher(self._batches, depth=self._prefetch_batches)
        return self

    def close(self) -> None:
        """Stop reading ahead and the reader's workers (a stream started but not iterated to its end).
        Safe to call twice."""
        if self._ahead is not None:
            self._ahead.close()  # joins its thread: then nothing runs the reader's generator
            self._ahead = None
        if self._batches is not None:
            self._batches.close()  # cancels the reader's pending work, stops its thread pool
            self._batches = None

    @property
    def read_stats(self) -> ReadStats:
        return self.reader.stats

    @property
    def embed_s(self) -> float:
        return self.stats.model_s

    @property
    def wait_s(self) -> float:
        return self.stats.wait_s

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        indices: deque[np.ndarray] = deque()  # appended in the embedder's reader thread, in order
        if self._ahead is None:  # not started: read as the model asks, without another thread
            self._batches = self.reader.batches(self.plan, self.embedder.batch_size, self.skip_errors)
        source: Iterable[TileBatch] = self._ahead if self._ahead is not None else self._batches

        def tiles() -> Iterator[np.ndarray]:
            for batch in source:
                indices.append(batch.indices)
                yield batch.tiles  # (B, S, S, 3)

        feed = tiles()
        outputs = self.embedder.embed_batches(feed, self.pooling, stats=self.stats)
        try:
            for features in outputs:  # (B, E) float32, one per batch of tiles
                yield indices.popleft(), features
        finally:
            outputs.close()  # joins the embedder's reader thread first: then nothing runs the tile reader
            feed.close()
            self.close()  # stops the read-ahead thread, then the tile reader's workers


def complete_groups(
    stream: Iterable[tuple[np.ndarray, np.ndarray]], group_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup an in-order (indices, rows) stream into whole groups of ``group_size`` consecutive indices.

    Yields (group ids (G,), rows (G, group_size, ...)); a group missing an index (a skipped tile) is dropped.
    """
    g = group_size
    pending: tuple[np.ndarray, np.ndarray] | None = None
    for idx, rows in stream:
        if pending is not None:
            idx, rows = np.concatenate([pending[0], idx]), np.concatenate([pending[1], rows])
            pending = None
        if not len(idx):
            continue
        gid = idx // g
        # every group before the last index's group is finished; that one too once its last member arrived
        finished = np.ones(len(idx), bool) if idx[-1] % g == g - 1 else gid < gid[-1]
        if not finished.all():
            pending = (idx[~finished], rows[~finished])
        if finished.any():
            groups, starts, counts = np.unique(gid[finished], return_index=True, return_counts=True)
            full = counts == g
            if full.any():
                take = starts[full][:, None] + np.arange(g)[None, :]  # (G, g) rows of each whole group
                yield groups[full], rows[finished][take]


@dataclass(frozen=True)
class SlideEmbedding:
    """The embedded tissue tiles of one slide."""

    name: str
    coords: np.ndarray  # (N, 2) int64 level-0 x, y
    features: np.ndarray  # (N, E) float32
    grid: TileGrid
    model: ModelInfo
    pooling: str
    read_stats: ReadStats
    embed_s: float


@dataclass(frozen=True)
class RegionEmbedding:
    """The embedded multi-magnification regions of one slide (layout: ``grid.layout``)."""

    name: str
    coords: np.ndarray  # (R, T, 2) int64 level-0 x, y of every tile
    features: np.ndarray  # (R, T, E) float32
    magnification: np.ndarray  # (T,) magnification of each position
    grid: RegionGrid
    model: ModelInfo
    pooling: str
    read_stats: ReadStats
    embed_s: float


def iter_tiles(
    slide: str | Path | Slide,
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    skip_errors: bool = False,
) -> Iterator[TileBatch]:
    """Yield the slide's tissue tiles as :class:`TileBatch` es (coords (B, 2) level-0, uint8 (B, S, S, 3))."""
    with opened_slide(slide, slide_mpp) as handle:
        grid = tile_grid(handle, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue)
        yield from TileReader(handle, workers=workers).batches(grid.plan, batch_size, skip_errors)


@contextlib.contextmanager
def _streaming(
    slide: str | Path | Slide,
    model: str | Path | Backend,
    backend: str,
    slide_mpp: float | None,
    layout: Callable[[Slide], tuple[G, TilePlan]],
    **options: Any,
) -> Iterator[tuple[Slide, Backend, G, EmbeddingStream]]:
    """Open the slide and the model, lay out its tiles (``layout``: grid and plan), start their stream."""
    batch_size = options.pop("batch_size", None)
    with (
        opened_slide(slide, slide_mpp) as handle,
        opened_backend(model, backend) as runner,
        Embedder(runner, batch_size=batch_size) as embedder,
    ):
        grid, plan = layout(handle)
        yield handle, runner, grid, EmbeddingStream(handle, embedder, plan, **options)


def _tiling(mpp: float, tile_size: int, min_tissue: float) -> Callable[[Slide], tuple[TileGrid, TilePlan]]:
    def layout(handle: Slide) -> tuple[TileGrid, TilePlan]:
        grid = tile_grid(handle, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue)
        return grid, grid.plan

    return layout


def iter_embeddings(
    slide: str | Path | Slide,
    model: str | Path | Backend,
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    pooling: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    backend: str = "auto",
    skip_errors: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (coords (B, 2) int64 level-0, features (B, E) float32) per batch of the slide's tissue tiles."""
    options = {"pooling": pooling, "batch_size": batch_size, "workers": workers, "skip_errors": skip_errors}
    layout = _tiling(mpp, tile_size, min_tissue)
    with _streaming(slide, model, backend, slide_mpp, layout, **options) as (_, _, grid, stream):
        for rows, features in stream:
            yield grid.coords[rows], features


def embed_slide(
    slide: str | Path | Slide,
    model: str | Path | Backend,
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    pooling: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    backend: str = "auto",
    skip_errors: bool = False,
) -> SlideEmbedding:
    """Embed all tissue tiles of a slide in memory (use :func:`process_slides` for .h5 files).

    ``slide``: a path or an open :class:`Slide`. ``model``: an export folder, an .onnx or engine file
    (opened with ``backend`` and closed after), or an open :class:`Backend` or ``Embedder`` (kept open).
    ``mpp`` / ``tile_size``: the tile grid; ``min_tissue``: the tissue fraction a kept tile needs;
    ``slide_mpp``: level-0 µm/px for a slide that records none; ``pooling``: None for the model's own.
    Returns coords (N, 2) level-0 x, y and features (N, E) float32, with the grid and read statistics.
    """
    options = {"pooling": pooling, "batch_size": batch_size, "workers": workers, "skip_errors": skip_errors}
    layout = _tiling(mpp, tile_size, min_tissue)
    with _streaming(slide, model, backend, slide_mpp, layout, **options) as (handle, runner, grid, stream):
        parts = list(stream)
        rows = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        features = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, stream.dim), np.float32)
        return SlideEmbedding(
            handle.name,
            grid.coords[rows],
            features,
            grid,
            runner.info,
            stream.pooling,
            stream.read_stats,
            stream.embed_s,
        )


def embed_regions(
    slide: str | Path | Slide,
    model: str | Path | Backend,
    magnifications: Iterable[float] = (5, 10, 20),
    *,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    pooling: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    backend: str = "auto",
    skip_errors: bool = False,
) -> RegionEmbedding:
    """Embed every tissue region's tiles at each magnification: features (R, T, E) in the layout's order."""
    options = {"pooling": pooling, "batch_size": batch_size, "workers": workers, "skip_errors": skip_errors}

    def layout(handle: Slide) -> tuple[RegionGrid, TilePlan]:
        grid = region_grid(handle, tuple(magnifications), tile_size=tile_size, min_tissue=min_tissue)
        return grid, grid.plan(handle)

    with _streaming(slide, model, backend, slide_mpp, layout, **options) as (handle, runner, grid, stream):
        t = grid.layout.tiles_per_region
        parts = list(complete_groups(stream, t))
        ids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        features = (
            np.concatenate([p[1] for p in parts]) if parts else np.empty((0, t, stream.dim), np.float32)
        )
        return RegionEmbedding(
            name=handle.name,
            coords=grid.tile_coords()[ids],
            features=features,
            magnification=grid.layout.magnification,
            grid=grid,
            model=runner.info,
            pooling=stream.pooling,
            read_stats=stream.read_stats,
            embed_s=stream.embed_s,
        )
