"""The Python API: a slide's tissue tiles and their embeddings, without writing files.

>>> for batch in iter_tiles("slide.svs", mpp=0.5):  # doctest: +SKIP
...     batch.coords, batch.tiles  # (B, 2) level-0 x, y; uint8 (B, 224, 224, 3)
>>> result = embed_slide("slide.svs", "out/virchow2.fp32.onnx")  # doctest: +SKIP
>>> result.features.shape, result.coords.shape  # (N, 2560), (N, 2)  # doctest: +SKIP

Reading runs ahead of the model in worker threads (:mod:`virchow_rt.slides.tiles`); the model is any
:class:`~virchow_rt.backends.base.Backend` (or a model file opened with ``open_backend``).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo, embedding_dim
from virchow_rt.embed.embedder import default_batch_size
from virchow_rt.errors import BackendError
from virchow_rt.kernels.resize import needs_resize, resize_tiles
from virchow_rt.registry import check_pooling
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
    inner = getattr(model, "backend", None)  # an Embedder: its backend, which it owns and keeps open
    if isinstance(inner, Backend):
        model = inner
    if isinstance(model, Backend):
        yield model
        return
    from virchow_rt.backends import open_backend

    with open_backend(model, backend=backend) as opened:
        yield opened


class EmbeddingStream:
    """Embeds the tiles of a plan in order: iterate for (indices (B,) into the plan, features (B, E) float32).

    Tiles are read at the model's input size. Tiles that fail with ``skip_errors`` are missing from the
    indices (see ``read_stats.errors``). ``embed_s`` is the time spent in the model, waits for tiles excluded.
    """

    def __init__(
        self,
        slide: Slide,
        backend: Backend,
        plan: TilePlan,
        *,
        pooling: str | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        skip_errors: bool = False,
        prefetch_batches: int = 2,
        processes: bool | None = None,
    ) -> None:
        self.backend = backend
        self.plan = plan.resized(backend.info.tile_size)
        self.pooling = check_pooling(pooling or backend.info.pooling)
        self.dim = embedding_dim(backend.info, self.pooling)
        self.batch_size = default_batch_size(backend, batch_size)
        self.skip_errors = skip_errors
        self.reader = TileReader(
            slide, workers=workers, prefetch_batches=prefetch_batches, processes=processes
        )
        self.embed_s = 0.0

    @property
    def read_stats(self) -> ReadStats:
        return self.reader.stats

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        indices: deque[np.ndarray] = deque()
        batches = self.reader.batches(self.plan, self.batch_size, self.skip_errors)

        info = self.backend.info
        geometry = (info.tile_size, info.crop_pct, info.interpolation)
        reshape = needs_resize(info.tile_size, info.tile_size, info.tile_size, info.crop_pct)

        def arrays() -> Iterator[np.ndarray]:
            for batch in batches:
                indices.append(batch.indices)
                # the model's own transform of an S×S tile (Prov-GigaPath's: 256 then a 224 crop)
                yield resize_tiles(batch.tiles, *geometry) if reshape else batch.tiles

        feed = arrays()
        outputs = self.backend.pipeline(feed)
        try:
            while True:
                t0, waited = time.perf_counter(), self.reader.stats.wait_s
                out = next(outputs, None)
                self.embed_s += time.perf_counter() - t0 - (self.reader.stats.wait_s - waited)
                if out is None:
                    return
                rows = indices.popleft()
                if out.shape != (len(rows), self.backend.info.embedding_dim):
                    raise BackendError(
                        f"{self.backend.name} returned embeddings {out.shape} for {len(rows)} tiles; "
                        f"expected ({len(rows)}, {self.backend.info.embedding_dim}): the model file and its "
                        "metadata disagree; re-export the model"
                    )
                # "cls" is the first D columns of class token ‖ patch mean (the graph is the same)
                yield rows, np.ascontiguousarray(out[:, : self.dim], dtype=np.float32)
        finally:
            for gen in (outputs, feed, batches):
                close = getattr(gen, "close", None)
                if close is not None:
                    close()


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
    with opened_slide(slide, slide_mpp) as handle, opened_backend(model, backend) as runner:
        grid, plan = layout(handle)
        yield handle, runner, grid, EmbeddingStream(handle, runner, plan, **options)


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
