"""A fast tissue mask from a low-resolution thumbnail: Otsu on saturation, closed, specks and holes removed.

Glass is bright and grey (saturation near 0); stained tissue is coloured. The threshold is Otsu's on
the thumbnail's saturation, clamped to a range so that a slide without glass (all tissue) or without
tissue (all glass) does not get a threshold inside one class (CLAM's fixed default is 8/255 ≈ 0.03).
Pale stroma and lumens are nearly as grey as glass: a morphological closing (a quarter tile) joins
the stained parts around them, hole filling does the rest.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from virchow_rt._deps import optional_import
from virchow_rt.slides.reader import Slide

_PURPOSE = "for the tissue mask of whole slides"
#: thumbnail strips are read this many pixels at a time (bounded memory on slides without a pyramid)
_STRIP_PIXELS = 1 << 24
#: the QC picture's longest side, legend included: a 224-px tile at 20x (112 µm) is still a square of
#: ~7 px on a 25 mm scan, and the PNG stays near 1 MB
QC_MAX_SIDE = 1600
#: colours of the QC PNG (a palette image)
_QC_COLOURS = 256


@dataclass(frozen=True)
class MaskConfig:
    """Settings of :func:`tissue_mask` (saturation is in [0, 1])."""

    min_threshold: float = 0.04  # glass with noise or dust reaches ~0.03
    # Otsu lands between glass and the *mean* stain; pale stroma sits at 0.05-0.15
    max_threshold: float = 0.10
    pixels_per_tile: int = 16  # mask resolution: mask pixels along the side of the smallest tile
    max_side: int = 4096  # ... but never a mask larger than this on its longest side
    closing_tiles: float = 0.25  # closing radius, in tile sides: bridges pale gaps inside tissue
    min_object_tiles: float = 0.25  # specks smaller than this many tile areas are removed
    max_hole_tiles: float = 1.0  # holes up to this many tile areas are filled (lumen, fat, tears)


@dataclass(frozen=True)
class TissueMask:
    """bool (h, w); pixel (i, j) covers level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d), d = ``downsample``."""

    mask: np.ndarray
    downsample: float
    threshold: float

    def _integral(self) -> np.ndarray:
        integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int64)
        integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        return integral

    def _count(self, r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
        """Tissue pixels in [r0, r1) × [c0, c1) of the mask, the bounds clipped to it: O(1) per square."""
        h, w = self.mask.shape
        r0, r1, c0, c1 = np.clip(r0, 0, h), np.clip(r1, 0, h), np.clip(c0, 0, w), np.clip(c1, 0, w)
        integral = self._integral()
        return integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]

    def fraction(self, coords: np.ndarray, size0: np.ndarray | int) -> np.ndarray:
        """Tissue fraction (N,) of squares at level-0 ``coords`` (N, 2) x, y with level-0 side ``size0``.

        A square that runs past the slide's edge counts its outside as glass (the fraction is of the
        whole square, as TRIDENT measures it)."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        size = np.broadcast_to(np.asarray(size0, dtype=np.float64), (len(coords),))
        c0 = np.round(coords[:, 0] / self.downsample).astype(np.int64)
        r0 = np.round(coords[:, 1] / self.downsample).astype(np.int64)
        c1 = np.maximum(np.round((coords[:, 0] + size) / self.downsample).astype(np.int64), c0 + 1)
        r1 = np.maximum(np.round((coords[:, 1] + size) / self.downsample).astype(np.int64), r0 + 1)
        area = (r1 - r0) * (c1 - c0)
        return self._count(r0, r1, c0, c1) / area

    def touches(self, coords: np.ndarray, size0: np.ndarray | int) -> np.ndarray:
        """bool (N,): the square overlaps any tissue pixel of the mask (TRIDENT keeps a tile that
        intersects its tissue contours at all: ``--min-tissue 0``)."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        size = np.broadcast_to(np.asarray(size0, dtype=np.float64), (len(coords),))
        # mask pixel j covers [j·d, (j+1)·d): square [x, x + s) overlaps j = floor(x/d) .. ceil((x+s)/d) - 1
        c0 = np.floor(coords[:, 0] / self.downsample).astype(np.int64)
        r0 = np.floor(coords[:, 1] / self.downsample).astype(np.int64)
        c1 = np.ceil((coords[:, 0] + size) / self.downsample).astype(np.int64)
        r1 = np.ceil((coords[:, 1] + size) / self.downsample).astype(np.int64)
        return self._count(r0, r1, c0, c1) > 0


def mask_downsample(slide: Slide, tile_size0: float, config: MaskConfig | None = None) -> float:
    """Level-0 pixels per mask pixel: ``pixels_per_tile`` across the smallest tile, capped by ``max_side``."""
    config = config or MaskConfig()
    width, height = slide.dimensions
    return max(1.0, tile_size0 / config.pixels_per_tile, max(width, height) / config.max_side)


def thumbnail(slide: Slide, downsample: float) -> np.ndarray:
    """uint8 RGB (ceil(H/d), ceil(W/d), 3) of the whole slide at ``downsample`` level-0 px per pixel.

    Read from the coarsest pyramid level that is at least as fine, in strips, area-averaged (PIL box filter).
    """
    width, height = slide.dimensions
    out_w, out_h = math.ceil(width / downsample), math.ceil(height / downsample)
    level = max(i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.01 or i == 0)
    level_ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    rel = downsample / level_ds  # level pixels per thumbnail pixel
    rows = max(1, int(_STRIP_PIXELS / max(1.0, lw * rel)))  # thumbnail rows per strip
    strips = []
    for top in range(0, out_h, rows):
        bottom = min(out_h, top + rows)
        y0, y1 = round(top * rel), min(lh, max(round(top * rel) + 1, round(bottom * rel)))
        strip = slide.read(0, round(y0 * level_ds), level, lw, y1 - y0)  # (y1 - y0, lw, 3)
        strips.append(np.asarray(Image.fromarray(strip).resize((out_w, bottom - top), Image.Resampling.BOX)))
    return np.concatenate(strips, axis=0)  # (out_h, out_w, 3)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (H, W) float32 in [0, 1] of uint8 RGB (H, W, 3)."""
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def _drop_small(mask: np.ndarray, max_size: float, connectivity: int) -> np.ndarray:
    # label + bincount: the same on every scikit-image version (remove_small_* renamed its arguments in 0.26)
    measure = optional_import("skimage.measure", _PURPOSE)
    labels = measure.label(mask, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False  # label 0 is the other class
    return keep[labels]


def clean_mask(mask: np.ndarray, tile_side: float, config: MaskConfig | None = None) -> np.ndarray:
    """Close gaps, remove specks, fill holes; sizes in tiles (``tile_side``: mask pixels per tile side)."""
    config = config or MaskConfig()
    radius = config.closing_tiles * tile_side
    if radius >= 1:
        morphology = optional_import("skimage.morphology", _PURPOSE)
        mask = morphology.isotropic_closing(mask, radius)  # distance-transform based: fast for any radius
    tile_area = tile_side**2
    mask = _drop_small(mask, config.min_object_tiles * tile_area, connectivity=2)
    holes = ~mask & ~_drop_small(~mask, config.max_hole_tiles * tile_area, connectivity=1)
    return mask | holes


def tissue_mask(slide: Slide, tile_size0: float, config: MaskConfig | None = None) -> TissueMask:
    """The tissue mask of ``slide`` for tiles of level-0 side ``tile_size0`` (the smallest tile used)."""
    config = config or MaskConfig()
    filters = optional_import("skimage.filters", _PURPOSE)
    downsample = mask_downsample(slide, tile_size0, config)
    sat = saturation(thumbnail(slide, downsample))  # (h, w)
    if float(sat.max() - sat.min()) < 1e-6:
        threshold = config.min_threshold  # a uniform thumbnail has no two classes to split
    else:
        threshold = float(filters.threshold_otsu(sat))
    threshold = min(max(threshold, config.min_threshold), config.max_threshold)
    mask = clean_mask(sat > threshold, tile_size0 / downsample, config)
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold)


def qc_picture(
    slide: Slide, mask: TissueMask, coords: np.ndarray, size0: int, max_side: int = QC_MAX_SIDE
) -> np.ndarray:
    """uint8 RGB: the slide's thumbnail with the tissue mask's outline (green) and every kept tile (blue),
    above a legend that says so.

    For a person to check the tiling without code, as TRIDENT's contour pictures are used.
    """
    width, height = slide.dimensions
    scale = max(1.0, max(width, height) / (max_side - LEGEND_PX))  # level-0 px per picture px
    image = Image.fromarray(thumbnail(slide, scale))
    outline = Image.fromarray(mask.mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
    edges = np.asarray(outline.filter(ImageFilter.FIND_EDGES)) > 0  # (h, w) mask boundary
    rgb = np.array(image)
    rgb[edges] = QC_OUTLINE
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    side = size0 / scale
    for x, y in np.asarray(coords, np.float64) / scale:
        draw.rectangle((x, y, x + side, y + side), outline=QC_TILE)
    return np.asarray(_with_legend(image, slide.path.name, len(coords), size0))


def qc_png(
    slide: Slide, mask: TissueMask, coords: np.ndarray, size0: int, max_side: int = QC_MAX_SIDE
) -> bytes:
    """:func:`qc_picture` as PNG bytes of at most 256 colours: a third of an RGB PNG's size (a stained
    thumbnail compresses poorly), the thumbnail within a few levels of its colours, the marks' and the
    legend's colours exact."""
    picture = Image.fromarray(qc_picture(slide, mask, coords, size0, max_side))
    exact = [QC_OUTLINE, QC_TILE, (0, 0, 0), (255, 255, 255)]
    free = _QC_COLOURS - len(exact)
    # octree: a fiftieth of median cut's time, and as close to the thumbnail's colours
    colours = picture.quantize(free, method=Image.Quantize.FASTOCTREE).getpalette()[: 3 * free]
    reference = Image.new("P", (1, 1))
    reference.putpalette(colours + [c for colour in exact for c in colour])
    out = io.BytesIO()
    picture.quantize(palette=reference, dither=Image.Dither.NONE).save(out, format="PNG")
    return out.getvalue()


#: the QC picture's colours: the tissue mask's outline, the kept tiles' squares
QC_OUTLINE, QC_TILE = (0, 200, 0), (30, 80, 230)
#: the legend's height under the picture: three lines of the default bitmap font
LEGEND_PX, _LINE_PX = 50, 14


def _with_legend(image: Image.Image, name: str, tiles: int, size0: int) -> Image.Image:
    """``image`` above a white strip naming the slide and what the green and blue marks are."""
    font = ImageFont.load_default()
    lines = [
        (f"{name}: {tiles} kept tile{'' if tiles == 1 else 's'} of {size0} level-0 px", (0, 0, 0)),
        ("green outline: tissue found by the mask", QC_OUTLINE),
        ("blue squares: the kept tiles (their features are in the .h5)", QC_TILE),
    ]
    out = Image.new("RGB", (max(image.width, 360), image.height + LEGEND_PX), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (text, colour) in enumerate(lines):
        draw.text((4, image.height + 4 + i * _LINE_PX), text, fill=colour, font=font)
    return out
