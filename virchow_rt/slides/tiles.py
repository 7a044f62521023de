"""Reading tiles fast: a pool of threads, each with its own slide handle, running ahead of the model.

OpenSlide and the tifffile codecs release the GIL, so threads decode in parallel. At most
``prefetch_batches`` batches of tiles are in flight (bounded memory), in chunks so that every worker
stays busy; batches come out in plan order whatever order the chunks finish in.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from virchow_rt.errors import InputError, VirchowError
from virchow_rt.slides.grid import TilePlan
from virchow_rt.slides.reader import Slide

#: tiles per job handed to a worker (small: the order-preserving window stays short)
MAX_CHUNK = 16


def default_workers() -> int:
    """Reading threads when none are asked for: one per core, at most 8 (decoding rarely scales further)."""
    return max(1, min(8, os.cpu_count() or 1))


def read_tile(slide: Slide, x: int, y: int, size0: int, level: int, out_size: int) -> np.ndarray:
    """uint8 (out_size, out_size, 3): the level-0 square (x, y, size0) read at ``level``, resized if needed.

    The resize is PIL's antialiased bicubic, the same as timm's eval transform on a square tile.
    """
    side = max(1, round(size0 / slide.level_downsamples[level]))  # pixels at the read level
    tile = slide.read(x, y, level, side, side)  # (side, side, 3)
    if side != out_size:
        tile = np.asarray(Image.fromarray(tile).resize((out_size, out_size), Image.Resampling.BICUBIC))
    return tile


@dataclass(frozen=True)
class TileBatch:
    """Tiles in plan order: ``indices`` (B,) int64 into the plan, ``coords`` (B, 2) int64 level-0 x, y,
    ``tiles`` uint8 (B, S, S, 3), a new array per batch (safe to keep)."""

    indices: np.ndarray
    coords: np.ndarray
    tiles: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class ReadStats:
    """What reading cost: ``read_s`` summed over the workers, ``wait_s`` the consumer's wait for tiles."""

    tiles: int = 0
    failed: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0
    errors: list[dict] = field(default_factory=list)  # {"x", "y", "reason"} of each skipped tile


class TileReader:
    """Reads the tiles of a :class:`TilePlan` from ``slide`` with ``workers`` threads (their own handles)."""

    def __init__(self, slide: Slide, workers: int | None = None, prefetch_batches: int = 2) -> None:
        if workers is not None and workers < 1:
            raise InputError(f"--workers {workers} must be at least 1")
        if prefetch_batches < 1:
            raise InputError(f"prefetch_batches {prefetch_batches} must be at least 1")
        self.slide = slide
        self.workers = workers or default_workers()
        self.prefetch_batches = prefetch_batches
        self.stats = ReadStats()

    def batches(self, plan: TilePlan, batch_size: int, skip_errors: bool = False) -> Iterator[TileBatch]:
        """Yield :class:`TileBatch` es of ``batch_size`` tiles (the last may be smaller) in plan order.

        A tile that cannot be read raises :class:`InputError` naming the slide and position, or with
        ``skip_errors`` is left out and recorded in ``stats.errors`` (its batch is then smaller).
        """
        if batch_size < 1:
            raise InputError(f"--batch {batch_size} must be at least 1")
        n, size = len(plan), plan.out_size
        if n == 0:
            return
        chunk = max(1, min(MAX_CHUNK, batch_size // self.workers))
        window = max(self.prefetch_batches * batch_size, 2 * self.workers * chunk)  # tiles in flight
        local = threading.local()
        handles: list[Slide] = []
        lock = threading.Lock()

        def handle() -> Slide:
            slide = getattr(local, "slide", None)
            if slide is None:
                slide = local.slide = self.slide.reopen()
                with lock:
                    handles.append(slide)
            return slide

        def job(start: int) -> tuple[np.ndarray, np.ndarray, list[dict], float]:
            t0 = time.perf_counter()
            stop = min(n, start + chunk)
            out = np.empty((stop - start, size, size, 3), np.uint8)  # (c, S, S, 3)
            ok = np.ones(stop - start, bool)
            errors: list[dict] = []
            for i in range(start, stop):
                x, y = (int(v) for v in plan.coords[i])
                try:
                    out[i - start] = read_tile(handle(), x, y, int(plan.size0[i]), int(plan.level[i]), size)
                except Exception as err:  # noqa: BLE001 - any decoder error is this tile's error
                    reason = str(err) if isinstance(err, VirchowError) else f"{type(err).__name__}: {err}"
                    if not skip_errors:
                        raise InputError(
                            f"{self.slide.path.name}: tile at level-0 ({x}, {y}): {reason}"
                        ) from err
                    ok[i - start] = False
                    errors.append({"x": x, "y": y, "reason": reason})
                    local.slide = None  # OpenSlide handles stay in an error state: the next tile reopens
            return out, ok, errors, time.perf_counter() - t0

        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="virchow-rt-tiles")
        starts = iter(range(0, n, chunk))
        pending: deque[tuple[int, Future]] = deque()

        def fill() -> None:
            while len(pending) * chunk < window and (start := next(starts, None)) is not None:
                pending.append((start, pool.submit(job, start)))

        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (indices, tiles) not yet yielded
        buffered = 0
        try:
            fill()
            while pending:
                start, future = pending.popleft()
                t0 = time.perf_counter()
                tiles, ok, errors, seconds = future.result()
                self.stats.wait_s += time.perf_counter() - t0
                fill()
                self.stats.read_s += seconds
                self.stats.tiles += int(ok.sum())
                self.stats.failed += len(errors)
                self.stats.errors += errors
                indices = np.arange(start, start + len(ok), dtype=np.int64)
                if not ok.all():
                    indices, tiles = indices[ok], tiles[ok]
                parts.append((indices, tiles))
                buffered += len(indices)
                while buffered >= batch_size or (not pending and buffered):
                    (rows, tiles), parts = _take(parts, batch_size)
                    buffered -= len(rows)
                    yield TileBatch(rows, plan.coords[rows], tiles)
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            for slide in handles:
                slide.close()


def _take(
    parts: list[tuple[np.ndarray, np.ndarray]], count: int
) -> tuple[tuple[np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The first ``count`` (or all) rows of the buffered parts as one (indices, tiles) pair, and the rest."""
    indices = np.concatenate([p[0] for p in parts])
    tiles = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])  # (n, S, S, 3)
    if len(indices) <= count:
        return (indices, tiles), []
    return (indices[:count], tiles[:count]), [(indices[count:], tiles[count:])]
