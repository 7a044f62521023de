"""Reading tiles fast: a pool of workers, each with its own slide handle, running ahead of the model.

Workers are threads or processes. Measured with ``bench/slides_throughput.py`` on JPEG-compressed
SVS-style slides, reading threads scale poorly (2-core CPU: 567 tiles/s with one thread, 775 with two;
OpenSlide's path through Python holds the GIL for part of each tile) while processes scale (544, then
1,153), so ``virchow-rt slides`` reads with processes when it has several workers. The library
defaults to threads (:data:`PROCESSES_BY_DEFAULT`): worker processes are started with ``spawn`` (safe
beside threads), which imports the caller's main script again in every worker, so a script calling
this without an ``if __name__ == "__main__":`` guard would run its own top-level code once per worker;
pass ``processes=True`` (``SlideSettings(read_processes=True)``) from a guarded script. The process
pool lives as long as the Python process, and each worker keeps its slide handles open between jobs;
tiles come back pickled (about 150 KB each); the pool's lifetime and the workers' signals are
:mod:`virchow_rt.slides.read_pool`'s, and a worker that dies fails only the slide whose tiles killed it.
At most
``prefetch_batches`` batches of tiles are in flight (bounded memory), in chunks so that every worker
stays busy; batches come out in plan order whatever order the chunks finish in.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from virchow_rt.errors import InputError, VirchowError
from virchow_rt.slides import read_pool
from virchow_rt.slides.grid import TilePlan
from virchow_rt.slides.reader import Slide, open_handle

Submit = Callable[[list], Future]
Close = Callable[[], None]
Again = Callable[[list], Any]

#: tiles per job handed to a worker (small: the order-preserving window stays short)
MAX_CHUNK = 16
#: read with processes when there are several workers and the caller does not say (module docstring)
PROCESSES_BY_DEFAULT = False
_HANDLES: dict[tuple[str, str], Slide] = {}  # in a worker process: (path, reader) -> its open slide
#: reading threads beyond this rarely help (OpenSlide holds the GIL for part of each tile)
MAX_THREADS = 8


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or a scheduler's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_workers(processes: bool = False) -> int:
    """Reading workers when none are asked for, from the usable CPUs. Processes: one per CPU, less one
    above 2 CPUs (the model's loop, the writer and the tiles' unpickling run in the main process); threads:
    one per CPU, at most :data:`MAX_THREADS`."""
    cpus = usable_cpus()
    if processes:
        return cpus - 1 if cpus > 2 else cpus
    return max(1, min(MAX_THREADS, cpus))


def _read_chunk(
    slide: Callable[[], Slide], drop: Callable[[], None], rows: list[tuple[int, int, int, int]], size: int,
    skip_errors: bool, name: str, fill: int = 255,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], float]:  # fmt: skip
    """Read ``rows`` of level-0 (x, y, size0, level) -> (tiles (c, S, S, 3), ok (c,), errors, seconds);
    ``fill``: the value outside the slide.

    ``slide()`` gives the worker's handle; ``drop()`` discards it after a failed tile (OpenSlide handles
    stay in an error state), so the next tile reads from a fresh one.
    """
    t0 = time.perf_counter()
    out = np.empty((len(rows), size, size, 3), np.uint8)  # (c, S, S, 3)
    ok = np.ones(len(rows), bool)
    errors: list[dict[str, Any]] = []
    for i, (x, y, size0, level) in enumerate(rows):
        try:
            out[i] = read_tile(slide(), x, y, size0, level, size, fill)
        except Exception as err:  # noqa: BLE001 - any decoder error is this tile's error
            reason = str(err) if isinstance(err, VirchowError) else f"{type(err).__name__}: {err}"
            if not skip_errors:
                raise InputError(f"{name}: tile at level-0 ({x}, {y}): {reason}") from err
            ok[i] = False
            errors.append({"x": x, "y": y, "reason": reason})
            drop()
    return out, ok, errors, time.perf_counter() - t0


def _read_in_process(
    source: tuple[str, str, float, str], rows: list[tuple[int, int, int, int]], size: int, skip_errors: bool,
    fill: int = 255,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], float]:  # fmt: skip
    """:func:`_read_chunk` in a worker process; ``source``: (path, reader, mpp, mpp source)."""
    key = source[:2]

    def drop() -> None:
        failed = _HANDLES.pop(key, None)
        if failed is not None:
            failed.close()

    return _read_chunk(lambda: _handle(*source), drop, rows, size, skip_errors, Path(source[0]).name, fill)


def _handle(path: str, reader: str, mpp: float, mpp_source: str) -> Slide:
    slide = _HANDLES.get((path, reader))
    if slide is None:
        for key in [k for k in _HANDLES if not os.path.exists(k[0])]:  # a local copy removed: free its disk
            _HANDLES.pop(key).close()
        if len(_HANDLES) >= 4:  # a worker moves on through slides: keep the few latest open
            _HANDLES.pop(next(iter(_HANDLES))).close()
        slide = _HANDLES[(path, reader)] = Slide(Path(path), reader, open_handle(reader, Path(path)), mpp,
                                                 mpp_source)  # fmt: skip
    return slide


def read_tile(
    slide: Slide, x: int, y: int, size0: int, level: int, out_size: int, fill: int = 255
) -> np.ndarray:
    """uint8 (out_size, out_size, 3): the level-0 square (x, y, size0) read at ``level``, resized if needed.

    The part of a square that lies outside the slide (past its right or bottom edge) is ``fill``: TRIDENT
    and CLAM read it black (0), glass is white (255). The resize is PIL's antialiased bicubic, the same as
    timm's eval transform on a square tile.
    """
    downsample = slide.level_downsamples[level]
    side = max(1, round(size0 / downsample))  # pixels at the read level
    width, height = slide.level_dimensions[level]
    # the read level's pixels inside the slide: OpenSlide maps level-0 x to x / downsample there
    inside_w = min(side, max(0, math.ceil(width - x / downsample)))
    inside_h = min(side, max(0, math.ceil(height - y / downsample)))
    if (inside_w, inside_h) == (side, side):
        tile = slide.read(x, y, level, side, side)  # (side, side, 3)
    else:
        tile = np.full((side, side, 3), fill, np.uint8)
        if inside_w and inside_h:
            tile[:inside_h, :inside_w] = slide.read(x, y, level, inside_w, inside_h)
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
    """Reads the tiles of a :class:`TilePlan` from ``slide`` with ``workers`` workers (their own handles).

    ``processes``: read in worker processes (None: when ``workers`` > 1 and :data:`PROCESSES_BY_DEFAULT`),
    else in threads.
    """

    def __init__(
        self,
        slide: Slide,
        workers: int | None = None,
        prefetch_batches: int = 2,
        processes: bool | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise InputError(f"--workers {workers} must be at least 1")
        if prefetch_batches < 1:
            raise InputError(f"prefetch_batches {prefetch_batches} must be at least 1")
        self.slide = slide
        self.workers = workers or default_workers(PROCESSES_BY_DEFAULT if processes is None else processes)
        self.prefetch_batches = prefetch_batches
        self.processes = PROCESSES_BY_DEFAULT and self.workers > 1 if processes is None else processes
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

        def rows(start: int) -> list[tuple[int, int, int, int]]:  # made per job: memory stays flat
            stop = min(n, start + chunk)
            coords, size0, level = plan.coords[start:stop], plan.size0[start:stop], plan.level[start:stop]
            return [
                (int(x), int(y), int(s), int(lv)) for (x, y), s, lv in zip(coords, size0, level, strict=True)
            ]

        submit, close, again = (
            self._processes(size, skip_errors, plan.fill)
            if self.processes
            else self._threads(size, skip_errors, plan.fill)
        )
        starts = iter(range(0, n, chunk))
        pending: deque[tuple[int, Future]] = deque()

        def fill() -> None:
            while len(pending) * chunk < window and (start := next(starts, None)) is not None:
                pending.append((start, submit(rows(start))))

        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (indices, tiles) not yet yielded
        buffered = 0
        try:
            fill()
            while pending:
                start, future = pending.popleft()
                t0 = time.perf_counter()
                try:
                    tiles, ok, errors, seconds = future.result()
                except BrokenProcessPool:  # a worker died, maybe over another slide's tiles: find out
                    if again is None:
                        raise
                    tiles, ok, errors, seconds = again(rows(start))
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
                    (taken, tiles), parts = _take(parts, batch_size)
                    buffered -= len(taken)
                    yield TileBatch(taken, plan.coords[taken], tiles)
        finally:
            for _, future in pending:
                future.cancel()
            close()

    def _processes(self, size: int, skip_errors: bool, fill: int) -> tuple[Submit, Close, Again]:
        """Jobs for the shared process pool: each worker opens the slide once and keeps it. A job lost to a
        worker that died (the whole pool breaks) is read again in a process of this reader's own: if that
        one dies too, this slide crashes its reader and fails; else another slide did, and this one goes on
        (later jobs go to a fresh shared pool)."""
        s = self.slide
        source = (str(s.path), s.reader, s.mpp, s.mpp_source)
        own: list[ProcessPoolExecutor] = []

        def submit(rows: list) -> Future:
            pool = read_pool.shared_pool(self.workers)
            try:
                return pool.submit(_read_in_process, source, rows, size, skip_errors, fill)
            except BrokenProcessPool:  # broken since this reader last used it
                pool = read_pool.shared_pool(self.workers, broken=pool)
                return pool.submit(_read_in_process, source, rows, size, skip_errors, fill)

        def again(rows: list) -> Any:
            if not own:
                own.append(read_pool.private_pool())
            try:
                return own[0].submit(_read_in_process, source, rows, size, skip_errors, fill).result()
            except BrokenProcessPool as err:
                raise InputError(
                    f"{s.path.name}: a tile-reading process died reading its tiles ({err}); the slide may "
                    "crash its reader: try --reader tiffslide"
                ) from err

        def close() -> None:  # the shared pool outlives this slide; pending jobs were cancelled
            for pool in own:
                pool.shutdown(wait=False, cancel_futures=True)

        return submit, close, again

    def _threads(self, size: int, skip_errors: bool, fill: int) -> tuple[Submit, Close, None]:
        """Jobs for a thread pool of this slide's, each thread with its own handle."""
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

        def drop() -> None:
            local.slide = None

        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="virchow-rt-tiles")
        name = self.slide.path.name

        def submit(rows: list) -> Future:
            return pool.submit(_read_chunk, handle, drop, rows, size, skip_errors, name, fill)

        def close() -> None:
            pool.shutdown(wait=True, cancel_futures=True)
            for slide in handles:
                slide.close()

        return submit, close, None


def _take(
    parts: list[tuple[np.ndarray, np.ndarray]], count: int
) -> tuple[tuple[np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The first ``count`` (or all) rows of the buffered parts as one (indices, tiles) pair, and the rest."""
    indices = np.concatenate([p[0] for p in parts])
    tiles = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])  # (n, S, S, 3)
    if len(indices) <= count:
        return (indices, tiles), []
    return (indices[:count], tiles[:count]), [(indices[count:], tiles[count:])]
