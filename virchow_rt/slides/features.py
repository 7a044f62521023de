"""One open slide through the model into a new ``.h5``: its tile grid (or another tool's tiles), the regions
with ``--regions``, the QC picture with ``--qc``, and every root attribute of the file's layout
(:mod:`virchow_rt.slides.writer`). The tile grid never depends on ``--regions``.

:class:`SlideFeatures` does it in three steps that a cohort runs on different threads, so that the model
never waits between slides: making it lays out the tiles, draws the QC picture (kept in memory) and
(``read_ahead``) starts reading the first batches; :meth:`~SlideFeatures.embed` runs the model into the
temporary file; :meth:`~SlideFeatures.finish` writes the attributes that mark the file complete. The QC
picture is written by :meth:`~SlideFeatures.write_qc` once the file is in place, so a slide stopped before
that leaves no picture.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from virchow_rt._version import __version__
from virchow_rt.backends.base import Backend
from virchow_rt.embed import Embedder
from virchow_rt.errors import OutputError
from virchow_rt.files import atomic_path, sha256_file
from virchow_rt.slides.coords import coords_sha256, coords_tiling
from virchow_rt.slides.embed import EmbeddingStream, complete_groups
from virchow_rt.slides.grid import TilePlan, grid_name, tile_grid
from virchow_rt.slides.mask import qc_png
from virchow_rt.slides.reader import Slide
from virchow_rt.slides.regions import region_grid
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import MAX_LISTED_ERRORS, SlideRecord, now
from virchow_rt.slides.writer import FeatureWriter

#: room a slide's file must leave on its disk (HDF5's chunks and metadata, the other files a run writes)
DISK_MARGIN = 16 << 20


class NoRoom(OSError):
    """The disk has no room for the rest of a slide's file (``ENOSPC``, said before HDF5 meets it)."""


def _check_room(tmp: Path, need: int, free: int | None = None) -> None:
    """:class:`NoRoom` unless ``free`` (default: asked of the disk now) leaves ``need`` bytes and margin."""
    free = shutil.disk_usage(tmp.parent).free if free is None else free
    if free < need + DISK_MARGIN:
        raise NoRoom(
            errno.ENOSPC,
            f"the file still needs about {need / 2**20:.1f} MiB and {DISK_MARGIN >> 20} MiB are kept free; "
            f"{free / 2**20:.1f} MiB are free",
        )


@dataclass(frozen=True)
class ModelIdentity:
    """The model as every output records it: the file the backend runs and its sha256."""

    file: str
    sha256: str

    @classmethod
    def of(cls, model: str | Path | Backend | Any, backend: Backend) -> ModelIdentity:
        # the file the backend runs (an export folder resolves to one of its artifacts), else the argument
        file = backend.path or (None if isinstance(model, Backend | Embedder) else model)
        if file is not None and Path(file).is_file():
            return cls(str(file), sha256_file(file))
        # no file to hash (a Backend object): the model's own description identifies it
        info = json.dumps(asdict(backend.info), sort_keys=True).encode()
        return cls("", "backend:" + hashlib.sha256(info).hexdigest())


class SlideFeatures:
    """One open slide's features into a new ``.h5``: tiling (at construction), :meth:`embed`, :meth:`finish`.

    ``settings.pooling`` must be resolved; ``check`` is called before each write and raises to abandon the
    slide (a lost lease); ``qc``: where :meth:`write_qc` puts the QC picture (drawn now, written once the file
    is complete); ``source``: the slide as the file records it (path and size) when ``slide`` reads a local
    copy of it; ``read_ahead``: start reading the first batches now, before :meth:`embed` is called;
    ``key``: the slide's key, its coordinates file's name in a ``--coords`` folder (default: its name).
    ``record`` gets the counts, timings and read level. :meth:`close` stops reading and closes the file
    (safe at any step, and twice).
    """

    def __init__(
        self,
        slide: Slide,
        embedder: Embedder,
        settings: SlideSettings,
        model: ModelIdentity,
        record: SlideRecord,
        *,
        qc: Path | None = None,
        check: Callable[[], None] = lambda: None,
        progress: bool = False,
        source: Path | None = None,
        read_ahead: bool = False,
        key: str | None = None,
    ) -> None:
        s = self.settings = settings
        self.slide, self.embedder, self.model, self.record = slide, embedder, model, record
        self.source = source or slide.path
        self.check, self.progress = check, progress
        self.writer: FeatureWriter | None = None
        self.streams: list[EmbeddingStream] = []
        self.write_s = 0.0
        t0 = time.perf_counter()
        self.coords_sha256 = ""
        if s.coords:  # TRIDENT's or CLAM's tiles, tile for tile, read as that tool reads them
            self.coords_sha256 = coords_sha256(s.coords, key or slide.name)  # first: a later change redoes
            self.tiles = coords_tiling(slide, s.coords, s.tile_size, s.mpp, key=key)
        else:
            self.tiles = tile_grid(slide, s.grid_mpp, s.tile_size, s.min_tissue, rule=s.grid,
                                   edge_tiles=s.edge_tiles)  # fmt: skip
        self.grid = (
            region_grid(slide, s.regions, tile_size=s.tile_size, min_tissue=s.min_tissue)
            if s.regions
            else None
        )
        self.layout = self.grid.layout if self.grid is not None else None
        record.timings["mask_s"] = time.perf_counter() - t0
        self.qc = qc
        #: the QC picture's PNG, drawn here (the slide is open, the model busy with another)
        self.qc_png = (
            qc_png(slide, self.tiles.mask, self.tiles.coords, self.tiles.patch_size_level0)
            if qc is not None
            else None
        )
        self.dim = embedder.embedding_dim(s.pooling)
        self._first = self._stream(self.tiles.plan)
        if read_ahead:
            self._first.start()

    def _stream(self, plan: TilePlan) -> EmbeddingStream:
        s = self.settings
        stream = EmbeddingStream(self.slide, self.embedder, plan, pooling=s.pooling, workers=s.workers,
                                 skip_errors=s.skip_errors, prefetch_batches=s.prefetch_batches,
                                 processes=s.read_processes)  # fmt: skip
        self.streams.append(stream)
        return stream

    def _embed(self, stream: EmbeddingStream, group: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with tqdm(total=len(stream.plan), unit="tile", desc=self.slide.name, disable=not self.progress,
                  leave=False, dynamic_ncols=True) as bar:  # fmt: skip
            for ids, features in complete_groups(stream, group):  # features (G, group, E)
                bar.update(features.shape[0] * features.shape[1])
                self.check()
                yield ids, features

    def output_bytes(self) -> int:
        """About what the slide's file will weigh: its features and coordinates (tiles, then regions)."""
        rows = len(self.tiles.plan)
        if self.grid is not None and self.layout is not None:
            rows += len(self.grid) * self.layout.tiles_per_region
        return rows * self._row_bytes

    @property
    def _row_bytes(self) -> int:
        return 4 * self.dim + 16  # float32 features, two int64 coordinates

    def embed(self, tmp: Path) -> None:
        """Run the slide's tiles (then its regions) through the model into the new file ``tmp``.

        Room for what is still to be written is checked before the file is begun (a slide too large for
        what is free fails alone) and before every write (:class:`NoRoom`): HDF5 meeting a full disk
        part-way leaves a file it cannot close (and h5py can crash freeing it). A quota, or another writer
        filling the disk between two checks, can still reach HDF5; that is a full disk too (``SlideTask``)."""
        left = self.output_bytes()
        free = shutil.disk_usage(tmp.parent).free
        if DISK_MARGIN <= free < left + DISK_MARGIN:  # this slide does not fit; smaller ones may
            raise OutputError(
                f"its features need about {left / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free "
                f"({DISK_MARGIN >> 20} MiB kept free): free some space and rerun to do it; the other slides "
                "go on"
            )
        _check_room(tmp, left, free)  # below the margin: the disk is full for every slide
        writer = self.writer = FeatureWriter(tmp, self.dim, self.layout)
        for ids, features in self._embed(self._first, 1):
            t1 = time.perf_counter()
            _check_room(tmp, left)
            writer.append(self.tiles.coords[ids], features[:, 0])
            left -= features.shape[0] * self._row_bytes
            self.write_s += time.perf_counter() - t1
        if self.grid is not None and self.layout is not None:
            region_coords = self.grid.tile_coords()
            stream = self._stream(self.grid.plan(self.slide))
            for ids, features in self._embed(stream, self.layout.tiles_per_region):
                t1 = time.perf_counter()
                _check_room(tmp, left)
                writer.append_regions(region_coords[ids], features)  # (G, T, 2), (G, T, E)
                left -= features.shape[0] * features.shape[1] * self._row_bytes
                self.write_s += time.perf_counter() - t1

    def finish(self) -> None:
        """Write every attribute and mark the file complete (after :meth:`embed`); fill the record."""
        assert self.writer is not None, "finish() before embed()"
        s, tiles, writer, record = self.settings, self.tiles, self.writer, self.record
        streams, layout = self.streams, self.layout
        failed = sum(st.read_stats.failed for st in streams)
        record.tiles = writer.num_tiles
        record.embedded_tiles = sum(st.read_stats.tiles for st in streams)
        record.regions = writer.num_regions if layout is not None else None
        width, height = self.slide.dimensions
        info = self.embedder.info
        size0 = tiles.patch_size_level0
        writer.finish(
            {
                "name": self.slide.name,
                "patch_size": s.tile_size,
                "patch_size_level0": size0,
                "level0_magnification": tiles.level0_magnification,
                "target_magnification": tiles.target_magnification,
                "overlap": tiles.overlap,
                "level0_width": width,
                "level0_height": height,
                "encoder": info.variant,
                "pooling": s.pooling,
                "embedding_dim": self.dim,
                "model_sha256": self.model.sha256,
                "model_file": Path(self.model.file).name,
                "weights_sha256": info.weights_sha256,
                "precision": info.precision,
                "random_weights": bool(info.random_weights),
                "backend": self.embedder.backend.name,
                "reader": self.slide.reader,
                "slide_path": str(self.source),
                "slide_size_bytes": self.source.stat().st_size,
                "level0_mpp": self.slide.mpp,
                "mpp_source": self.slide.mpp_source,
                "target_mpp": float(tiles.mpp),
                "effective_mpp": size0 * self.slide.mpp / s.tile_size,
                "read_level": tiles.level,
                "min_tissue": float(s.min_tissue),
                "tissue_threshold": tiles.mask.threshold,
                "regions": s.regions_text,
                "grid_rule": grid_name(s.grid, s.edge_tiles),
                "coords_source": str(s.coords or ""),
                "coords_sha256": self.coords_sha256,
                "edge_fill": tiles.edge_fill,
                "region_size_level0": layout.region_size0 if layout is not None else 0,
                "skipped_tiles": failed,
                "created": now(),
                "virchow_rt_version": __version__,
            },
            coords_attrs=tiles.coords_attrs(),
        )
        record.skipped_tiles = failed
        record.skipped_tile_errors = [e for st in streams for e in st.read_stats.errors][:MAX_LISTED_ERRORS]
        record.read_level = tiles.level
        record.timings.update(
            read_s=sum(st.read_stats.read_s for st in streams),
            read_wait_s=sum(st.wait_s for st in streams),
            embed_s=sum(st.embed_s for st in streams),
            write_s=self.write_s,
        )

    def write_qc(self) -> None:
        """Write the QC picture (with ``qc``), atomically: call once the ``.h5`` is complete and in place."""
        if self.qc is not None and self.qc_png is not None:
            with atomic_path(self.qc) as tmp:
                tmp.write_bytes(self.qc_png)

    def close(self) -> None:
        """Stop reading and close the file (an unfinished one stays incomplete), each even if one before it
        fails. Safe to call twice."""
        with contextlib.ExitStack() as steps:  # last-in first-out: the streams first, then the file
            if self.writer is not None:
                steps.callback(self.writer.close)
            for stream in self.streams:
                steps.callback(stream.close)


def embed_to_file(
    slide: Slide,
    embedder: Embedder,
    settings: SlideSettings,
    model: ModelIdentity,
    tmp: Path,
    record: SlideRecord,
    *,
    qc: Path | None = None,
    check: Callable[[], None] = lambda: None,
    progress: bool = False,
) -> None:
    """Embed ``slide`` into the new file ``tmp`` and fill ``record`` (the steps of :class:`SlideFeatures`);
    the QC picture (``qc``) is written once ``tmp`` is complete."""
    features = SlideFeatures(slide, embedder, settings, model, record, qc=qc, check=check, progress=progress)
    try:
        features.embed(tmp)
        features.finish()
        features.write_qc()
    finally:
        features.close()
