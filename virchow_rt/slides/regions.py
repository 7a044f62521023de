"""Multi-magnification regions: the input of a region-mixing encoder.

A region is one tile at the lowest magnification; inside it lie the aligned tiles of every other
magnification (``--regions 5,10,20``: 1 tile at 5x, 2×2 at 10x, 4×4 at 20x = T = 21 tiles). The
tiles of a region are ordered by magnification (lowest first), each magnification row by row; the
layout below records, per position t, the magnification, µm/px, level-0 side and the offset of the
tile inside its region, so that a reader never has to re-derive it.

Tile sizes are derived from the finest magnification's level-0 side (rounded once), so the tiles of
every magnification tile their region exactly, also on slides with µm/px like 0.2527.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from virchow_rt.errors import InputError
from virchow_rt.slides.grid import (
    TilePlan,
    check_tile_settings,
    grid_coords,
    magnification_to_mpp,
    patch_size_level0,
    pick_level,
)
from virchow_rt.slides.mask import MaskConfig, TissueMask, tissue_mask
from virchow_rt.slides.reader import Slide


@dataclass(frozen=True)
class RegionLayout:
    """Per position t of the T tiles in every region (all arrays have T rows)."""

    magnifications: tuple[float, ...]  # distinct, ascending
    magnification: np.ndarray  # (T,) float64
    mpp: np.ndarray  # (T,) float64 nominal µm/px (10 / magnification)
    size0: np.ndarray  # (T,) int64 level-0 side of the tile
    offset: np.ndarray  # (T, 2) int64 level-0 x, y of the tile relative to its region's corner
    position: np.ndarray  # (T, 2) int64 row, column of the tile in its magnification's k × k grid
    region_size0: int  # level-0 side of a region

    @property
    def tiles_per_region(self) -> int:
        return len(self.magnification)

    def index_of(self, magnification: float) -> np.ndarray:
        """Positions (row-major) of the tiles at ``magnification``."""
        return np.flatnonzero(np.isclose(self.magnification, magnification))


def parse_magnifications(magnifications: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Distinct magnifications, ascending; each a multiple of the lowest and a divisor of the highest."""
    mags = sorted({float(m) for m in magnifications})
    if not mags or mags[0] <= 0:
        raise InputError(f"--regions {magnifications!r} needs positive magnifications, e.g. 5,10,20")
    low, high = Fraction(mags[0]).limit_denominator(1000), Fraction(mags[-1]).limit_denominator(1000)
    for m in mags:
        f = Fraction(m).limit_denominator(1000)
        if (f / low).denominator != 1 or (high / f).denominator != 1:
            raise InputError(
                f"--regions {','.join(f'{x:g}' for x in mags)}: {m:g}x must be a whole multiple of {low}x "
                f"and divide {high}x so that its tiles tile each region exactly; use e.g. 5,10,20"
            )
    return tuple(mags)


def region_layout(
    slide: Slide, magnifications: list[float] | tuple[float, ...], tile_size: int
) -> RegionLayout:
    """The tile order and geometry inside one region for ``slide`` (its µm/px sets the level-0 sizes)."""
    mags = parse_magnifications(magnifications)
    finest = patch_size_level0(slide, magnification_to_mpp(mags[-1]), tile_size)
    rows: list[tuple[float, int, int, int, int, int]] = []  # magnification, size0, dx, dy, row, col
    for m in mags:
        per_side = round(m / mags[0])
        size0 = finest * round(mags[-1] / m)
        rows += [(m, size0, c * size0, r * size0, r, c) for r in range(per_side) for c in range(per_side)]
    table = np.array(rows, dtype=np.float64)  # (T, 6)
    return RegionLayout(
        magnifications=mags,
        magnification=table[:, 0],
        mpp=np.array([magnification_to_mpp(m) for m in table[:, 0]]),
        size0=table[:, 1].astype(np.int64),
        offset=table[:, 2:4].astype(np.int64),
        position=table[:, 4:6].astype(np.int64),
        region_size0=finest * round(mags[-1] / mags[0]),
    )


@dataclass(frozen=True)
class RegionGrid:
    """The tissue regions of one slide and the tiles inside them."""

    layout: RegionLayout
    region_coords: np.ndarray  # (R, 2) int64 level-0 x, y of each region's corner
    tissue: np.ndarray  # (R,) tissue fraction of each region
    tile_size: int
    slide_mpp: float
    mask: TissueMask

    def __len__(self) -> int:
        return len(self.region_coords)

    def tile_coords(self) -> np.ndarray:
        """(R, T, 2) int64 level-0 x, y of every tile of every region."""
        return self.region_coords[:, None, :] + self.layout.offset[None, :, :]

    def plan(self, slide: Slide, out_size: int | None = None) -> TilePlan:
        """The R·T tiles region by region (layout order inside), ``out_size`` px (default ``tile_size``)."""
        n_regions, n_tiles = len(self), self.layout.tiles_per_region
        levels = np.array(
            [pick_level(slide, s * slide.mpp / self.tile_size) for s in self.layout.size0], np.int64
        )
        return TilePlan(
            coords=self.tile_coords().reshape(n_regions * n_tiles, 2),
            size0=np.tile(self.layout.size0, n_regions),
            level=np.tile(levels, n_regions),
            out_size=int(out_size or self.tile_size),
        )


def region_grid(
    slide: Slide,
    magnifications: list[float] | tuple[float, ...],
    tile_size: int = 224,
    min_tissue: float = 0.5,
    mask: TissueMask | None = None,
    mask_config: MaskConfig | None = None,
) -> RegionGrid:
    """Regions (one lowest-magnification tile each) whose tissue fraction is at least ``min_tissue`` (0:
    every region that touches tissue)."""
    layout = region_layout(slide, magnifications, tile_size)
    check_tile_settings(float(layout.mpp[-1]), tile_size, min_tissue)
    if mask is None:
        # the mask resolves the finest tile: specks and holes are measured against it
        mask = tissue_mask(slide, float(layout.size0[-1]), mask_config)
    coords = grid_coords(*slide.dimensions, layout.region_size0)  # (M, 2)
    tissue = mask.fraction(coords, layout.region_size0)  # (M,)
    keep = mask.touches(coords, layout.region_size0) if min_tissue == 0 else tissue >= min_tissue
    return RegionGrid(
        layout=layout,
        region_coords=coords[keep],
        tissue=tissue[keep],
        tile_size=int(tile_size),
        slide_mpp=slide.mpp,
        mask=mask,
    )
