"""Tile grids at a target µm/px, kept where the tissue mask covers enough, and the read plan behind them.

Coordinates are always level-0 pixels (x, y) of a tile's top-left corner, as TRIDENT and CLAM store them.
A tile of ``tile_size`` px at ``mpp`` µm/px covers ``patch_size_level0`` level-0 pixels, by one of two
rules (:data:`GRID_RULES`):

- "magnification" (the default, TRIDENT's): the scan's µm/px is sorted into TRIDENT's magnification
  bands (:func:`level0_magnification`: every scan finer than 0.3 µm/px and at least 0.2 is 40x, every
  one from 0.3 to 0.6 is 20x), the target's is its nominal magnification (0.5 µm/px is 20x), and
  ``patch_size_level0 = round(tile_size · level-0 magnification / target magnification)`` (448 for 224 px
  at 20x on any 40x-band scan, 896 at 10x), so coordinates line up with TRIDENT's and can be reused
  across tools and encoders;
- "mpp": exact, ``round(tile_size · mpp / slide.mpp)`` (886 at 10x on a 0.2527 µm/px scan).

The rules agree on slides whose µm/px is a nominal value. Tiles are read from the coarsest pyramid level
at or finer than their µm/px, then resized. ``edge_tiles`` adds TRIDENT's tiles that run past the
slide's right and bottom edges (their outside reads as ``fill``, black in TRIDENT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from virchow_rt.errors import InputError
from virchow_rt.slides.mask import MaskConfig, TissueMask, tissue_mask
from virchow_rt.slides.reader import Slide

#: microns per pixel at 1x: 20x is 0.5 µm/px, 10x is 1.0, 5x is 2.0 (the usual scanner convention)
MPP_AT_1X = 10.0
#: a pyramid level up to 1% coarser than the target still counts as "at the target" (downsamples like 2.002)
LEVEL_TOLERANCE = 0.01
GRID_RULES = ("magnification", "mpp")
#: TRIDENT's magnification bands of a scan (``WSI._fetch_magnification``): level-0 µm/px below the bound
MAGNIFICATION_BANDS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))
#: the target when none is given: 0.5 µm/px (20x)
DEFAULT_MPP = 0.5
#: what TRIDENT (OpenSlide, RGBA -> RGB) and CLAM read outside the slide: black
BLACK, WHITE = 0, 255


def magnification_to_mpp(magnification: float) -> float:
    """µm/px of a magnification: ``10 / magnification`` (20x -> 0.5)."""
    if not magnification > 0:
        raise InputError(f"magnification {magnification!r} must be positive, e.g. 5, 10, 20 or 40")
    return MPP_AT_1X / magnification


def nominal_magnification(mpp: float) -> int | float:
    """Magnification of a target ``mpp`` µm/px, an integer when within 2% (0.5: 20, 0.45: 22, 4: 2.5)."""
    mag = MPP_AT_1X / mpp
    return int(round(mag)) if abs(mag - round(mag)) <= 0.02 * mag else round(mag, 3)


def level0_magnification(mpp: float) -> int | float:
    """A scan's magnification as TRIDENT sorts it into bands (0.2208, 0.263 -> 40; 0.455 -> 20).

    Scans of 2.4 µm/px or coarser, which TRIDENT refuses, get their :func:`nominal_magnification`.
    """
    for bound, mag in MAGNIFICATION_BANDS:
        if mpp < bound:
            return mag
    return nominal_magnification(mpp)


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

    ``coords`` (N, 2) int64 level-0 x, y; ``size0`` (N,) int64 level-0 side; ``level`` (N,) int64 level;
    ``fill``: the value of a tile's pixels outside the slide (tiles that run past its edge).
    """

    coords: np.ndarray
    size0: np.ndarray
    level: np.ndarray
    out_size: int
    fill: int = WHITE

    def __len__(self) -> int:
        return len(self.coords)

    def resized(self, out_size: int) -> TilePlan:
        """The same tiles delivered at another pixel size (the model's input size)."""
        return TilePlan(self.coords, self.size0, self.level, int(out_size), self.fill)


def plan_tiles(
    slide: Slide, coords: np.ndarray, size0: int, out_size: int, level: int | None = None, fill: int = WHITE
) -> TilePlan:
    """Square tiles of level-0 side ``size0`` at ``coords``, read at ``level`` (default: the level nearest
    ``out_size`` px)."""
    n = len(coords)
    if level is None:
        level = pick_level(slide, size0 * slide.mpp / out_size)
    return TilePlan(
        coords=np.asarray(coords, dtype=np.int64).reshape(n, 2),
        size0=np.full(n, size0, np.int64),
        level=np.full(n, level, np.int64),
        out_size=int(out_size),
        fill=int(fill),
    )


def grid_coords(width: int, height: int, step: int, past_edge: bool = False) -> np.ndarray:
    """(N, 2) int64 x, y of every full ``step``-sized square in a ``width`` × ``height`` image, row by row;
    ``past_edge``: also the squares that start inside and run past the right or bottom edge (TRIDENT's)."""
    tail = 1 if past_edge else step  # a square may start at any x < width, or must end by it
    xs = np.arange(0, width - tail + 1, step, dtype=np.int64)
    ys = np.arange(0, height - tail + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # (rows, cols)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


@dataclass(frozen=True)
class TileGrid:
    """The tissue tiles of one slide at one µm/px, and how TRIDENT's attributes describe them."""

    plan: TilePlan  # tiles of ``tile_size`` px
    mpp: float  # target µm/px
    tile_size: int
    patch_size_level0: int
    slide_mpp: float  # level-0 µm/px of the slide
    tissue: np.ndarray  # (N,) tissue fraction of each kept tile
    mask: TissueMask
    # as TRIDENT's patcher reads them from ``coords`` to re-read the same squares: level-0 side =
    # round(patch_size · level0_magnification / target_magnification)
    level0_magnification: int | float
    target_magnification: int | float
    patch_size: int | None = None  # the tile side the tiling's source describes (None: tile_size)
    overlap: int = 0
    legacy: dict[str, int | float] = field(default_factory=dict)  # a CLAM source's patch_level, ...

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

    @property
    def edge_fill(self) -> int:
        """The value read outside the slide by tiles that run past its edge."""
        return self.plan.fill

    def coords_attrs(self) -> dict[str, int | float]:
        """TRIDENT's attributes of ``coords`` for these tiles (plus a CLAM source's own)."""
        return {
            "patch_size": self.patch_size or self.tile_size,
            "patch_size_level0": self.patch_size_level0,
            "level0_magnification": self.level0_magnification,
            "target_magnification": self.target_magnification,
            "overlap": self.overlap,
            **self.legacy,
        }


def grid_magnifications(slide: Slide, mpp: float, rule: str = "magnification") -> tuple[float, float]:
    """(level-0, target) magnifications of ``rule``: TRIDENT's band and the nominal target, or exact
    (10 / µm/px each, so that TRIDENT's patcher reproduces the exact tile side)."""
    if rule not in GRID_RULES:
        raise InputError(f"unknown grid rule {rule!r}; use one of: {', '.join(GRID_RULES)}")
    if rule == "magnification":
        return level0_magnification(slide.mpp), nominal_magnification(mpp)
    return MPP_AT_1X / slide.mpp, MPP_AT_1X / mpp


def patch_size_level0(slide: Slide, mpp: float, tile_size: int, rule: str = "magnification") -> int:
    """Level-0 pixels along a tile of ``tile_size`` px at ``mpp`` µm/px, by ``rule`` (module docstring)."""
    level0, target = grid_magnifications(slide, mpp, rule)
    size0 = (
        round(tile_size * level0 / target) if rule == "magnification" else round(tile_size * mpp / slide.mpp)
    )
    if size0 < 1:
        raise InputError(f"a {tile_size}-px tile at {mpp} µm/px is smaller than one pixel of {slide.name}")
    return size0


def grid_name(rule: str, edge_tiles: bool = False) -> str:
    """The grid as recorded in outputs (``grid_rule``): the rule, TRIDENT's bands, tiles past the edge."""
    return ("magnification-bands" if rule == "magnification" else rule) + (
        "+edge-tiles" if edge_tiles else ""
    )


def tile_grid(
    slide: Slide,
    mpp: float = DEFAULT_MPP,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    mask: TissueMask | None = None,
    mask_config: MaskConfig | None = None,
    rule: str = "magnification",
    edge_tiles: bool = False,
) -> TileGrid:
    """Non-overlapping ``tile_size`` tiles at ``mpp`` µm/px with at least ``min_tissue`` tissue (0: every
    tile that touches tissue, TRIDENT's selection); ``rule``: how a tile's level-0 side is derived
    (module docstring); ``edge_tiles``: also tiles that run past the right and bottom edges, read black
    outside as TRIDENT reads them."""
    check_tile_settings(mpp, tile_size, min_tissue)
    size0 = patch_size_level0(slide, mpp, tile_size, rule)
    level0, target = grid_magnifications(slide, mpp, rule)
    if mask is None:
        mask = tissue_mask(slide, size0, mask_config)
    coords = grid_coords(*slide.dimensions, size0, past_edge=edge_tiles)  # (M, 2)
    tissue = mask.fraction(coords, size0)  # (M,)
    keep = mask.touches(coords, size0) if min_tissue == 0 else tissue >= min_tissue
    return TileGrid(
        plan=plan_tiles(slide, coords[keep], size0, tile_size, fill=BLACK if edge_tiles else WHITE),
        mpp=float(mpp),
        tile_size=int(tile_size),
        patch_size_level0=size0,
        slide_mpp=slide.mpp,
        tissue=tissue[keep],
        mask=mask,
        level0_magnification=level0,
        target_magnification=target,
    )
