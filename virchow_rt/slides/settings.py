"""How slides are tiled and embedded: :class:`SlideSettings`, the one place each setting's default lives.

Each field that ``virchow-rt slides`` exposes carries its flag and help text as field metadata
(:func:`option`); the CLI builds its parser from them (:mod:`virchow_rt.cli.slides`), so a new setting is
one field here and its use where slides are processed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.errors import InputError
from virchow_rt.registry import POOLINGS, check_pooling
from virchow_rt.slides.grid import (
    DEFAULT_MPP,
    GRID_RULES,
    MPP_AT_1X,
    check_tile_settings,
    magnification_to_mpp,
)
from virchow_rt.slides.locks import DEFAULT_LEASE_S, MAX_LEASE_S, MIN_LEASE_S
from virchow_rt.slides.regions import parse_magnifications

#: how long a slide's lock lasts without renewal before another run may take the slide over (seconds)
DEFAULT_LOCK_LEASE_S = DEFAULT_LEASE_S
READERS = ("auto", "openslide", "tiffslide")
#: most slides prepared ahead of the one in the model (each holds its read-ahead batches and open handles)
MAX_PREFETCH_SLIDES = 8
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from ``20G``, ``512M``, ``1.5T`` or a plain number (binary units: 1K = 1024)."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise InputError(f"--cache-size {text!r} is not a size; give bytes or e.g. 20G, 512M") from None
    if not number > 0 or number == float("inf"):
        raise InputError(f"--cache-size {text!r} must be above 0, e.g. 20G")
    return int(number * _SIZE_UNITS[unit])


def option(default: Any, flag: str | None = None, help: str = "", **cli: Any) -> Any:
    """A setting with its default and, when ``flag`` is given, its CLI flag, help and argparse keywords
    (``cli``; ``cli_default`` is the default on the command line where it differs from the library's)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "cli": cli})


@dataclass(frozen=True)
class SlideSettings:
    """How slides are tiled and embedded (the flags of ``virchow-rt slides``)."""

    #: target µm/px; None: 0.5 (20x), or with coords the coords file's (:attr:`grid_mpp`)
    mpp: float | None = option(
        None, "--mpp", "target microns per pixel of the tiles (default 0.5; with --coords, the file's)"
    )
    #: another tool's tiling to reuse: a TRIDENT or CLAM .h5 (one slide) or a folder of them (by slide name)
    coords: str | None = option(
        None,
        "--coords",
        "reuse another tool's tiling, read as that tool reads it: a TRIDENT or CLAM coordinates .h5 "
        "(one slide; its name must be the slide's), or the folder they wrote (<slide>.h5 or "
        "<slide>_patches.h5, also in patches/); the file sets the magnification (a --mpp/--mag must agree); "
        "--min-tissue, --grid, --edge-tiles do not apply",
        metavar="FILE|DIR",
    )
    #: how a tile's level-0 side is derived: TRIDENT's rule, or "mpp" (exact)
    grid: str = option(
        "magnification",
        "--grid",
        "a tile's level-0 side: from TRIDENT's magnification bands (any scan at 0.2-0.3 µm/px is 40x: "
        "896 px for 224 px at 10x on a 0.2527 µm/px scan), or exact from the µm/px (886)",
        choices=GRID_RULES,
    )
    #: the grid also has the tiles that run past the slide's right and bottom edges (TRIDENT's)
    edge_tiles: bool = option(
        False,
        "--edge-tiles",
        "also the tiles that run past the slide's right and bottom edges, their outside black "
        "(TRIDENT's grid)",
    )
    tile_size: int = option(224, "--tile-size", "tile side in pixels at --mpp")
    slide_mpp: float | None = option(None, "--slide-mpp", "level-0 µm/px when the slide does not record it")
    regions: tuple[float, ...] | None = option(
        None, "--regions", "magnifications for region sequences, e.g. 5,10,20"
    )
    min_tissue: float = option(
        0.5,
        "--min-tissue",
        "0 keeps every tile that touches tissue (TRIDENT's selection), else the minimum tissue fraction of "
        "a kept tile",
    )
    batch_size: int | None = option(
        None, "--batch", "tiles per batch (default: the backend's fastest)", metavar="BATCH"
    )
    workers: int | None = option(
        None,
        "--workers",
        "tile-reading workers (default, from the CPUs this run may use: reading processes one per CPU, less "
        "one above 2 CPUs; reading threads one per CPU, at most 8)",
    )
    #: None: the model's own (ModelInfo.pooling)
    pooling: str | None = option(
        None, "--pooling", "default: the model's own (see `virchow-rt list`)", choices=POOLINGS
    )
    reader: str = option(
        "auto", "--reader", "slide reader (auto: OpenSlide, else tiffslide)", choices=READERS
    )
    skip_errors: bool = option(
        False, "--skip-errors", "skip unreadable tiles (a bad slide never stops the others)"
    )
    recursive: bool = option(False, "--recursive", "find slides in sub-folders too (a TCGA/GDC download)")
    mirror_folders: bool = option(
        False,
        "--mirror-folders",
        "with --recursive: write <out>/<sub/folder>/<slide>.h5, each slide's folder under the folder given "
        "mirrored (same-named slides in different folders); --coords DIR, --qc, the states and the summary "
        "follow. A folder keeps the setting it was first run with",
    )
    qc: bool = option(False, "--qc", "also write <slide>.qc.png: thumbnail, tissue outline, kept tiles")
    also_pt: bool = option(
        False, "--also-pt", "also write pt_files/<slide>.pt (CLAM's MIL loader; needs torch)"
    )
    #: read tiles in worker processes (the CLI's default; None: the library's, threads: see slides.tiles)
    read_processes: bool | None = option(
        None,
        "--read-threads",
        "read tiles with threads instead of worker processes (the default: processes were measured faster)",
        action="store_false",
        cli_default=True,
    )
    lock_lease: float = option(
        DEFAULT_LOCK_LEASE_S,
        "--lock-lease",
        "seconds a slide's lock lasts unless renewed (its holder renews it every third of that; 2 to "
        "86400); a run stopped or a host lost for longer has its slides taken over by other runs on any host",
        metavar="SECONDS",
    )
    prefetch_slides: int = option(
        1,
        "--prefetch-slides",
        "slides opened, masked, gridded and read ahead while the model runs the current one, so that it "
        "never waits between slides (0: one slide after another)",
        metavar="N",
    )
    cache_dir: str | None = option(
        None,
        "--cache-dir",
        "copy the next slides to this local folder ahead of use and read the copies (slides on network "
        "storage); each copy is removed once its slide is done or failed, and on Ctrl-C. A copy that fails "
        "or finds no room falls back to reading in place, with one warning",
        metavar="DIR",
    )
    cache_size: int | None = option(
        None,
        "--cache-size",
        "most bytes of slide copies in --cache-dir at once, e.g. 20G (default: what its disk has free, less "
        "1 GiB); a slide larger than this is read in place",
        metavar="SIZE",
        type=parse_size,
    )
    prefetch_batches: int = 2
    #: tiles done / total, tiles/s and ETA inside each slide (None: on a terminal)
    progress: bool | None = None

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> SlideSettings:
        """Settings from ``values`` by field name (parsed CLI arguments; other names are ignored)."""
        given = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        if given.get("regions") is not None:
            given["regions"] = tuple(given["regions"])
        return cls(**given)

    def check(self) -> None:
        """Raise :class:`InputError` for settings no slide could use (before any slide is opened)."""
        mpp = self.grid_mpp
        check_tile_settings(mpp, self.tile_size, self.min_tissue)
        if self.grid not in GRID_RULES:
            raise InputError(f"--grid {self.grid!r} is not one of: {', '.join(GRID_RULES)}")
        if self.pooling is not None:
            check_pooling(self.pooling)
        if not (math.isfinite(self.lock_lease) and MIN_LEASE_S <= self.lock_lease <= MAX_LEASE_S):
            raise InputError(
                f"--lock-lease {self.lock_lease:g}: give a number of seconds from {MIN_LEASE_S:g} to "
                f"{MAX_LEASE_S:g} (one day), e.g. {DEFAULT_LEASE_S:g}"
            )
        if not (isinstance(self.prefetch_slides, int) and 0 <= self.prefetch_slides <= MAX_PREFETCH_SLIDES):
            raise InputError(
                f"--prefetch-slides {self.prefetch_slides!r}: give 0 (one slide after another) to "
                f"{MAX_PREFETCH_SLIDES}; 1 keeps the model busy"
            )
        if self.mirror_folders and not self.recursive:
            raise InputError(
                "--mirror-folders mirrors the sub-folders that --recursive looks in; add --recursive"
            )
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise InputError(f"--cache-dir {self.cache_dir} is a file; give a folder (it is made if missing)")
        if self.cache_size is not None:
            if self.cache_dir is None:
                raise InputError("--cache-size needs --cache-dir (the local folder the slides are copied to)")
            parse_size(self.cache_size)
        if self.regions:
            mags = parse_magnifications(self.regions)
            if not any(np.isclose(magnification_to_mpp(m), mpp) for m in mags):
                raise InputError(
                    f"--mpp {mpp} ({MPP_AT_1X / mpp:g}x) is not one of the --regions "
                    f"magnifications {','.join(f'{m:g}' for m in mags)}: the file's features/coords are the "
                    f"region tiles at --mpp; add {MPP_AT_1X / mpp:g} to --regions or pass "
                    f"--mpp {magnification_to_mpp(mags[-1]):g}"
                )

    @property
    def grid_mpp(self) -> float:
        """µm/px of the tile grid: ``mpp``, else 0.5 (with coords, the file's decides instead)."""
        return DEFAULT_MPP if self.mpp is None else self.mpp

    @property
    def regions_text(self) -> str:
        return ",".join(f"{m:g}" for m in parse_magnifications(self.regions)) if self.regions else ""
