"""Tile grids at a target µm/px, kept where the tissue mask covers enough, and the read plan behind them.

Coordinates are always level-0 pixels (x, y) of a tile's top-left corner, as TRIDENT and CLAM store them.
A tile of ``tile_size`` px at ``mpp`` µm/px covers ``patch_size_level0`` level-0 pixels, by one of two
rules (:data:`GRID_RULES`):

- "magnification" (the default, TRIDENT's): both µm/px are read as nominal magnifications (0.2527 µm/px
  is 40x, 0.5 is 20x) and ``patch_size_level0 = round(tile_size · level-0 magnification / target
  magnification)`` (896 for 224 px at 10x on a 40x scan), so coordinates line up with TRIDENT's and can
  be reused across tools and encoders;
- "mpp": exact, ``round(tile_size · mpp / slide.mpp)`` (886 for the same slide).

The rules agree on slides whose µm/px is a nominal value. Tiles are read from the coarsest pyramid level
at or finer than their µm/px, then resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.errors import InputError
from virchow_rt.slides.mask import MaskConfig, TissueMask, tissue_mask
from virchow_rt.slides.reader import Slide

#: microns per pixel at 1x: 20x is 0.5 µm/px, 10x is 1.0, 5x is 2.0 (the usual scanner convention)
MPP_AT_1X = 10.0
#: a pyramid level up to 1% coarser than the target still counts as "at the target" (downsamples like 2.002)
LEVEL_TOLERANCE = 0.01
GRID_RULES = ("magnification", "mpp")


def magnification_to_mpp(magnification: float) -> float:
    """µm/px of a magnification: ``10 / magnification`` (20x -> 0.5)."""
    if not magnification > 0:
        raise InputError(f"magnification {magnification!r} must be positive, e.g. 5, 10, 20 or 40")
    return MPP_AT_1X / magnification


def nominal_magnification(mpp: float) -> int | float:
    """Magnification of ``mpp`` µm/px as TRIDENT records it: an integer when within 2% (0.2527 -> 40)."""
    mag = MPP_AT_1X / mpp
    return int(round(mag)) if abs(mag - round(mag)) <= 0.02 * mag else round(mag, 3)


def pick_level(slide: Slide, mpp: float) -> int:
    """The coarsest pyramid level whose µm/px is at or finer than ``mpp`` (level 0 when none is)."""
    fine_enough = [
        i for i in range(len(slide.level_downsamples)) if slide.level_mpp(i) <= mpp * (1 + LEVEL_TOLERANCE)
    ]
    return max(fine_enough, key=lambda i: slide.level_downsamples[i]) if fine_enough else 0


def check_tile_settings(mpp: float, tile_size: int, min_tissue: float) -> None:
    """Raise :class:`InputError` for a bad µm/px, a tiny tile, or a tissue fraction outside [0, 1]."""
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise InputError(f"--mpp {mpp!r} must be a positive number of microns per pixel (0.5 is 20x)")
    if not (isinstance(tile_size, int) and tile_size >= 8):
        raise InputError(f"--tile-size {tile_size!r} must be an integer of at least 8 px (224 for Virchow)")
    if not 0.0 <= min_tissue <= 1.0:
        raise InputError(f"--min-tissue {min_tissue!r} must be a fraction between 0 and 1")


@dataclass(frozen=True)
class TilePlan:
    """What to read: every tile comes out ``out_size`` px square.

    ``coords`` (N, 2) int64 level-0 x, y; ``size0`` (N,) int64 level-0 side; ``level`` (N,) int64 level.
    """

    coords: np.ndarray
    size0: np.ndarray
    level: np.ndarray
    out_size: int

    def __len__(self) -> int:
        return len(self.coords)

    def resized(self, out_size: int) -> TilePlan:
        """The same tiles delivered at another pixel size (the model's input size)."""
        return TilePlan(self.coords, self.size0, self.level, int(out_size))


def plan_tiles(slide: Slide, coords: np.ndarray, size0: int, out_size: int) -> TilePlan:
    """Square tiles of level-0 side ``size0`` at ``coords``, read at the level nearest ``out_size`` px."""
    tile_mpp = size0 * slide.mpp / out_size
    n = len(coords)
    return TilePlan(
        coords=np.asarray(coords, dtype=np.int64).reshape(n, 2),
        size0=np.full(n, size0, np.int64),
        level=np.full(n, pick_level(slide, tile_mpp), np.int64),
        out_size=int(out_size),
    )


def grid_coords(width: int, height: int, step: int) -> np.ndarray:
    """(N, 2) int64 x, y of every full ``step``-sized square in a ``width`` × ``height`` image, row by row."""
    xs = np.arange(0, width - step + 1, step, dtype=np.int64)
    ys = np.arange(0, height - step + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # (rows, cols)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


@dataclass(frozen=True)
class TileGrid:
    """The tissue tiles of one slide at one µm/px."""

    plan: TilePlan  # tiles of ``tile_size`` px
    mpp: float  # requested µm/px
    tile_size: int
    patch_size_level0: int
    slide_mpp: float  # level-0 µm/px of the slide
    tissue: np.ndarray  # (N,) tissue fraction of each kept tile
    mask: TissueMask

    @property
    def coords(self) -> np.ndarray:
        return self.plan.coords

    @property
    def level(self) -> int:
        return int(self.plan.level[0]) if len(self.plan) else 0

    @property
    def effective_mpp(self) -> float:
        """µm/px after rounding the tile to whole level-0 pixels."""
        return self.patch_size_level0 * self.slide_mpp / self.tile_size


def patch_size_level0(slide: Slide, mpp: float, tile_size: int, rule: str = "magnification") -> int:
    """Level-0 pixels along a tile of ``tile_size`` px at ``mpp`` µm/px, by ``rule`` (module docstring)."""
    if rule not in GRID_RULES:
        raise InputError(f"unknown grid rule {rule!r}; use one of: {', '.join(GRID_RULES)}")
    if rule == "magnification":
        size0 = round(tile_size * nominal_magnification(slide.mpp) / nominal_magnification(mpp))
    else:
        size0 = round(tile_size * mpp / slide.mpp)
    if size0 < 1:
        raise InputError(f"a {tile_size}-px tile at {mpp} µm/px is smaller than one pixel of {slide.name}")
    return size0


def tile_grid(
    slide: Slide,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    mask: TissueMask | None = None,
    mask_config: MaskConfig | None = None,
    rule: str = "magnification",
) -> TileGrid:
    """Non-overlapping ``tile_size`` tiles at ``mpp`` µm/px with at least ``min_tissue`` tissue; ``rule``:
    how a tile's level-0 side is derived (module docstring)."""
    check_tile_settings(mpp, tile_size, min_tissue)
    size0 = patch_size_level0(slide, mpp, tile_size, rule)
    if mask is None:
        mask = tissue_mask(slide, size0, mask_config)
    coords = grid_coords(*slide.dimensions, size0)  # (M, 2)
    tissue = mask.fraction(coords, size0)  # (M,)
    keep = tissue >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
    return TileGrid(
        plan=plan_tiles(slide, coords[keep], size0, tile_size),
        mpp=float(mpp),
        tile_size=int(tile_size),
        patch_size_level0=size0,
        slide_mpp=slide.mpp,
        tissue=tissue[keep],
        mask=mask,
    )


def read_coords(path: str | Path, slide: Slide) -> tuple[np.ndarray, int]:
    """(coords (N, 2) int64 level-0 x, y, level-0 tile side) from a TRIDENT or CLAM ``.h5`` of ``slide``.

    TRIDENT's patch and feature files record ``patch_size_level0`` on ``coords``; CLAM's patch files
    record ``patch_size`` at ``patch_level`` (and that level's ``downsample``).
    """
    h5py = optional_import("h5py", "to read TRIDENT or CLAM coordinates (--coords)")
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            attrs = dict(f["coords"].attrs)
    except (OSError, KeyError) as err:
        raise InputError(f"--coords {path}: not a TRIDENT or CLAM coordinates .h5 ({err})") from err
    if "patch_size_level0" in attrs:
        size0 = round(float(attrs["patch_size_level0"]))
    elif "patch_size" in attrs and "patch_level" in attrs:
        level = int(attrs["patch_level"])
        downsample = attrs.get("downsample")
        factor = float(np.ravel(downsample)[0]) if downsample is not None else slide.level_downsamples[level]
        size0 = round(float(attrs["patch_size"]) * factor)
    else:
        raise InputError(
            f"--coords {path}: its coords have neither patch_size_level0 (TRIDENT) nor patch_size and "
            "patch_level (CLAM); cannot tell the tiles' level-0 size"
        )
    if size0 < 1:
        raise InputError(f"--coords {path}: a level-0 tile side of {size0} px is not a tile")
    return coords, size0


def coords_grid(
    slide: Slide, coords: np.ndarray, size0: int, tile_size: int = 224, mask_config: MaskConfig | None = None
) -> TileGrid:
    """A :class:`TileGrid` of given tiles (another tool's tiling), every one kept, in their order."""
    mask = tissue_mask(slide, size0, mask_config)  # for the attributes and the QC picture only
    return TileGrid(
        plan=plan_tiles(slide, coords, size0, tile_size),
        mpp=size0 * slide.mpp / tile_size,
        tile_size=int(tile_size),
        patch_size_level0=int(size0),
        slide_mpp=slide.mpp,
        tissue=mask.fraction(coords, size0),
        mask=mask,
    )
