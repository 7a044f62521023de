"""``virchow-rt slides``: the command-line adapter over :func:`~virchow_rt.slides.run.process_slides`.

It turns parsed arguments into :class:`~virchow_rt.slides.run.SlideSettings`, makes a scheduler's SIGTERM
stop the run as Ctrl-C does, and prints the run's totals.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from virchow_rt.slides import locks
from virchow_rt.slides.grid import magnification_to_mpp
from virchow_rt.slides.run import SUMMARY_NAME, SlideSettings, process_slides


def run_cli(args: argparse.Namespace) -> int:
    """``virchow-rt slides``: returns 0 when every slide is done or skipped, 1 when any failed."""
    settings = SlideSettings(
        mpp=magnification_to_mpp(args.mag) if args.mag is not None else args.mpp,
        grid=args.grid,
        coords=args.coords,
        tile_size=args.tile_size,
        slide_mpp=args.slide_mpp,
        regions=tuple(args.regions) if args.regions else None,
        min_tissue=args.min_tissue,
        batch_size=args.batch,
        workers=args.workers,
        pooling=args.pooling,
        skip_errors=args.skip_errors,
        reader=args.reader,
        read_processes=not args.read_threads,  # measured faster; the console entry point is guarded
        recursive=args.recursive,
        also_pt=args.also_pt,
        qc=args.qc,
    )
    if args.clear_stale_locks and Path(args.out).is_dir():
        for path, holder in locks.clear_locks(Path(args.out)):
            print(f"virchow-rt slides: removed lock {path.name} ({holder.describe()})", file=sys.stderr)
    try:
        with _sigterm_as_interrupt():
            if args.ray:
                from virchow_rt.slides.distributed import process_slides_ray

                summary = process_slides_ray(
                    args.slides,
                    args.model,
                    args.out,
                    settings,
                    address=args.ray,
                    workers=args.ray_workers,
                    gpus_per_worker=args.gpus_per_worker,
                    backend=args.backend,
                )
            else:
                summary = process_slides(args.slides, args.model, args.out, settings, backend=args.backend)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"nothing half-written was left in {args.out}; rerun the same command to resume (complete slides "
            "are kept and skipped)"
        ) from None
    totals = summary["totals"]
    rate = f", {totals['job_tiles_per_s']:.1f} tiles/s" if totals["tiles_embedded"] else ""
    print(
        f"{totals['done']} done, {totals['skipped']} skipped (complete), {totals['failed']} failed; "
        f"{totals['tiles_embedded']} tiles embedded{rate}; summary: {Path(args.out) / SUMMARY_NAME}"
    )
    return 1 if totals["failed"] else 0  # each failure was printed once, as it happened


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler's SIGTERM stops the run as Ctrl-C does: the slide in progress is abandoned cleanly."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
