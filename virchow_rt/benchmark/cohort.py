"""How busy the model stays across a cohort of slides, measured without a GPU.

:class:`StandInBackend` "computes" at a set rate without using the CPU: each batch sleeps for
batch / rate seconds, as a GPU leaves the CPU free while it computes, and notes when each batch started and
ended. Run a cohort through the real :func:`~virchow_rt.slides.process_slides` with it, then
:func:`cohort_timing` turns those notes and the summary into the model-busy fraction (model time / wall
time), slides per hour and the gaps between one slide's last batch and the next slide's first.
:func:`write_cohort` writes a cohort of synthetic slides of mixed sizes (many small biopsies, a few large
resections) once. :func:`reading_cost` is the CPU time one reading worker spends per tile, the figure that
says how many workers a faster model needs (:func:`workers_needed`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.benchmark.timing import percentile
from virchow_rt.contract import ModelInfo, WeightsInfo
from virchow_rt.errors import InputError
from virchow_rt.registry import get_variant


def stand_in_info(variant: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``variant`` (its embedding size, tile size, pooling) with random weights."""
    random = WeightsInfo(random=True, sha256="random", source="a stand-in model, no weights")
    return ModelInfo.from_variant(get_variant(variant), "fp16", random)


class StandInBackend(Backend):
    """A model at ``rate`` tiles/s that leaves the CPU free (it sleeps batch / rate s; None: no time at all).

    Returns zeros (B, E); ``batches`` holds (start, end, tiles) of every batch, in order (perf_counter s).
    """

    name = "stand-in"

    def __init__(self, info: ModelInfo, rate: float | None) -> None:
        if rate is not None and not rate > 0:
            raise InputError(f"stand-in rate {rate!r}: give tiles/s above 0, or None for no model time")
        self.info, self.rate = info, rate
        self.batches: list[tuple[float, float, int]] = []
        self._lock = threading.Lock()

    def run(self, tiles: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        if self.rate is not None:
            time.sleep(len(tiles) / self.rate)
        out = np.zeros((len(tiles), self.info.embedding_dim), np.float32)  # (B, E)
        with self._lock:
            self.batches.append((start, time.perf_counter(), len(tiles)))
        return out


@dataclass(frozen=True)
class CohortTiming:
    """What the model did over one cohort run (seconds; ``gaps_s``: one per pair of consecutive slides)."""

    wall_s: float
    model_s: float
    span_s: float  # first batch's start to last batch's end
    slides: int
    tiles: int
    gaps_s: tuple[float, ...]

    @property
    def busy(self) -> float:
        """Model time / wall time of the whole run (opening the first slide included)."""
        return self.model_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def busy_in_span(self) -> float:
        """Model time / time from its first batch to its last."""
        return self.model_s / self.span_s if self.span_s > 0 else 0.0

    @property
    def slides_per_hour(self) -> float:
        return 3600 * self.slides / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        gaps = self.gaps_s
        return {
            "wall_s": self.wall_s,
            "model_s": self.model_s,
            "model_busy": self.busy,
            "model_busy_from_first_to_last_batch": self.busy_in_span,
            "slides": self.slides,
            "tiles": self.tiles,
            "slides_per_hour": self.slides_per_hour,
            "tiles_per_s": self.tiles / self.wall_s if self.wall_s > 0 else 0.0,
            # where the model waited: for tiles inside a slide, between slides, before its first batch
            # (the first slide's opening) and after its last (the last file, the summary)
            "idle_within_slides_s": max(0.0, self.span_s - self.model_s - sum(gaps)),
            "idle_between_slides_s": sum(gaps),
            "outside_batches_s": max(0.0, self.wall_s - self.span_s),
            "gap_ms": {
                "median": percentile(gaps, 50) * 1e3 if gaps else None,
                "p90": percentile(gaps, 90) * 1e3 if gaps else None,
                "max": max(gaps) * 1e3 if gaps else None,
                "n": len(gaps),
            },
        }


def cohort_timing(
    batches: list[tuple[float, float, int]], slide_tiles: list[int], wall_s: float
) -> CohortTiming:
    """The model's busy time and the gaps between slides from the stand-in's ``batches`` (start, end, tiles)
    and the tiles of each embedded slide in the order they ran (a slide's batches never mix with another's).
    """
    slide_tiles = [n for n in slide_tiles if n > 0]
    if sum(slide_tiles) != sum(b[2] for b in batches):
        raise InputError(
            f"the slides' {sum(slide_tiles)} tiles do not match the {sum(b[2] for b in batches)} tiles the "
            "model ran: give the tiles of every slide embedded, in order"
        )
    gaps, i, left = [], 0, 0
    for count in slide_tiles:
        if i:  # the model's idle time from the previous slide's last batch to this slide's first
            gaps.append(max(0.0, batches[i][0] - batches[i - 1][1]))
        left = count
        while left > 0:
            left -= batches[i][2]
            i += 1
    model_s = sum(end - start for start, end, _ in batches)
    span = batches[-1][1] - batches[0][0] if batches else 0.0
    return CohortTiming(wall_s, model_s, span, len(slide_tiles), sum(slide_tiles), tuple(gaps))


#: level-0 size (px, 0.25 µm/px) and tissue pieces (fractions of the slide) of each kind of slide
_KINDS = {
    "biopsy": ((9216, 6144), ((0.08, 0.20, 0.84, 0.16), (0.10, 0.55, 0.70, 0.14))),
    "resection": ((16384, 12288), ((0.06, 0.08, 0.62, 0.70), (0.72, 0.30, 0.22, 0.45))),
}


def write_cohort(folder: Path, biopsies: int, resections: int, *, scan_mpp: float = 0.25) -> list[Path]:
    """Synthetic Aperio-style slides (JPEG tiles, levels 1, 4, 16 as a 40x scanner writes them, so 20x
    tiles are read at level 0 and resized), written once into ``folder``: the resections spread among the
    biopsies. ``scan_mpp`` 0.5 gives 20x scans (the tiles are read as they are)."""
    from virchow_rt._deps import is_importable
    from virchow_rt.slides.synthetic import write_synthetic_slide

    compression = "jpeg" if is_importable("imagecodecs") else "zlib"
    kinds = ["biopsy"] * biopsies
    for k in range(resections):  # evenly among the biopsies
        kinds.insert(round((k + 0.5) * len(kinds) / resections) if kinds else 0, "resection")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    scale = 0.25 / scan_mpp  # a 20x scan of the same tissue has half the pixels on each side
    for i, kind in enumerate(kinds):
        (w0, h0), pieces = _KINDS[kind]
        w, h = int(w0 * scale), int(h0 * scale)
        path = folder / f"{i:03d}-{kind}-{compression}-{scan_mpp:g}.svs"
        if not path.exists():
            boxes = [(int(x * w), int(y * h), int(bw * w), int(bh * h)) for x, y, bw, bh in pieces]
            write_synthetic_slide(path, w, h, boxes, mpp=scan_mpp, tile=256, compression=compression,
                                  seed=i, layout="svs", downsamples=(4, 16))  # fmt: skip
        paths.append(path)
    return paths


def reading_cost(path: Path, tiles: int = 200, mpp: float = 0.5, size: int = 224) -> dict[str, Any]:
    """CPU time (ms, this thread's, so other load on the machine barely counts) per tile of reading the
    slide's first ``tiles`` tissue tiles at ``mpp``, out ``size`` px: decoding alone and decoding + resizing
    (what one reading worker does per tile)."""
    from virchow_rt.slides import open_slide, read_tile, tile_grid

    with open_slide(path) as slide:
        grid = tile_grid(slide, mpp=mpp)
        plan = grid.plan.resized(size)
        rows = [(int(x), int(y), int(s0), int(lv)) for (x, y), s0, lv in
                zip(plan.coords[:tiles], plan.size0[:tiles], plan.level[:tiles], strict=True)]  # fmt: skip
        if not rows:
            raise InputError(f"{path.name} has no tissue tiles at {mpp} µm/px to time")
        side = round(grid.patch_size_level0 / slide.level_downsamples[grid.level])
        read_tile(slide, *rows[0], size)  # warm: the first read opens the level's index
        t0 = time.thread_time()
        for x, y, _, level in rows:
            slide.read(x, y, level, side, side)
        decode = time.thread_time() - t0
        t0 = time.thread_time()
        for x, y, s0, level in rows:
            read_tile(slide, x, y, s0, level, size)
        total = time.thread_time() - t0
    n = len(rows)
    return {"tiles": n, "read_px": side, "read_level": grid.level,
            "decode_cpu_ms_per_tile": 1e3 * decode / n, "cpu_ms_per_tile": 1e3 * total / n}  # fmt: skip


def workers_needed(rate: float, cpu_ms_per_tile: float) -> int:
    """Reading workers (one busy core each) that deliver ``rate`` tiles/s at ``cpu_ms_per_tile`` each."""
    return max(1, math.ceil(rate * cpu_ms_per_tile / 1e3))
