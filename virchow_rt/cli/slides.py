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

from virchow_rt.cli.common import Help, add_backend, csv_ints
from virchow_rt.registry import POOLINGS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slides",
        formatter_class=Help,
        help="whole slides -> tissue tiles -> embeddings (.h5, TRIDENT/CLAM layout)",
    )
    p.add_argument(
        "slides", nargs="+", help="slide files (any format OpenSlide or tifffile reads) or folders"
    )
    p.add_argument(
        "--model", required=True, help="exported model: an export folder, an .onnx or a TensorRT .engine"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="<slide>.h5 files and summary.json go here")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="target microns per pixel of the tiles (default 0.5; with --coords, the file's)",
    )
    target.add_argument(
        "--mag", type=float, default=None, help="target magnification, TRIDENT's spelling: 20 is --mpp 0.5"
    )
    p.add_argument(
        "--coords",
        metavar="FILE|DIR",
        default=None,
        help="reuse another tool's tiling, read as that tool reads it: a TRIDENT or CLAM coordinates .h5 "
        "(one slide; its name must be the slide's), or the folder they wrote (<slide>.h5 or "
        "<slide>_patches.h5, also in patches/); the file sets the magnification (a --mpp/--mag must agree); "
        "--min-tissue, --grid, --edge-tiles do not apply",
    )
    p.add_argument(
        "--grid",
        choices=("magnification", "mpp"),
        default="magnification",
        help="a tile's level-0 side: from TRIDENT's magnification bands (any scan at 0.2-0.3 µm/px is 40x: "
        "896 px for 224 px at 10x on a 0.2527 µm/px scan), or exact from the µm/px (886)",
    )
    p.add_argument(
        "--edge-tiles",
        action="store_true",
        help="also the tiles that run past the slide's right and bottom edges, their outside black "
        "(TRIDENT's grid)",
    )
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at --mpp")
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="level-0 µm/px when the slide does not record it"
    )
    p.add_argument(
        "--regions", type=csv_ints, default=None, help="magnifications for region sequences, e.g. 5,10,20"
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="0 keeps every tile that touches tissue (TRIDENT's selection), else the minimum tissue "
        "fraction of a kept tile",
    )
    p.add_argument("--batch", type=int, default=None, help="tiles per batch (default: the backend's fastest)")
    p.add_argument(
        "--workers", type=int, default=None, help="tile-reading workers (default: one per core, at most 8)"
    )
    p.add_argument(
        "--pooling", choices=POOLINGS, default=None, help="default: the model's own (see `virchow-rt list`)"
    )
    add_backend(p)
    p.add_argument(
        "--reader",
        choices=("auto", "openslide", "tiffslide"),
        default="auto",
        help="slide reader (auto: OpenSlide, else tiffslide)",
    )
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="skip unreadable tiles (a bad slide never stops the others)",
    )
    p.add_argument(
        "--recursive", action="store_true", help="find slides in sub-folders too (a TCGA/GDC download)"
    )
    p.add_argument(
        "--qc", action="store_true", help="also write <slide>.qc.png: thumbnail, tissue outline, kept tiles"
    )
    p.add_argument(
        "--also-pt",
        action="store_true",
        help="also write pt_files/<slide>.pt (CLAM's MIL loader; needs torch)",
    )
    p.add_argument(
        "--read-threads",
        action="store_true",
        help="read tiles with threads instead of worker processes (processes were measured faster)",
    )
    p.add_argument(
        "--clear-stale-locks",
        action="store_true",
        help="remove every slide lock in --out first (after a crashed run; no other run may write there). "
        "Without it, a lock whose process is gone (same host) or is 24 h old is taken over with a warning",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="spread the slides over Ray workers: local (a new Ray instance: every GPU of this machine), "
        "auto (the cluster started with `ray start`) or a Ray address; needs pip install 'virchow-rt[ray]'",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="Ray workers, each with the model open (default: one per GPU; without GPUs one per 8 CPUs)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs each Ray worker takes (default 1 where there are GPUs)",
    )
    p.set_defaults(handler=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``virchow-rt slides``: returns 0 when every slide is done or skipped, 1 when any failed."""
    from virchow_rt.slides import locks
    from virchow_rt.slides.grid import magnification_to_mpp
    from virchow_rt.slides.run import SUMMARY_NAME, SlideSettings, process_slides

    settings = SlideSettings(
        mpp=magnification_to_mpp(args.mag) if args.mag is not None else args.mpp,
        grid=args.grid,
        coords=args.coords,
        edge_tiles=args.edge_tiles,
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
