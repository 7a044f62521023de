"""Synthetic whole slides for tests, demos and benchmarks: real IHC tissue on glass, as a pyramidal TIFF.

Written with tifffile: level 0 plus 2×-reduced levels (box filter), tiled; µm/px in the TIFF resolution
tags, which OpenSlide's generic-TIFF driver and tiffslide both read. Tissue is scikit-image's IHC
image (see :mod:`virchow_rt.tissue`) flipped/rotated and placed as rectangles on a glass-white,
slightly noisy background, so the tissue mask and the embeddings see real stain and texture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from virchow_rt._deps import optional_import
from virchow_rt.errors import InputError
from virchow_rt.manifest import atomic_path
from virchow_rt.tissue import ihc_image

#: glass: bright, grey, a little sensor noise
GLASS_LEVEL, GLASS_NOISE = 243, 2.0


@dataclass(frozen=True)
class SyntheticSlide:
    """A written synthetic slide and its ground truth."""

    path: Path
    image: np.ndarray  # level-0 uint8 (H, W, 3), exactly what was written (before any JPEG loss)
    tissue: np.ndarray  # level-0 bool (H, W): inside a placed tissue rectangle
    mpp: float | None  # level-0 µm/px recorded in the file (None: not recorded)
    levels: int

    def crop(self, x: int, y: int, size: int) -> np.ndarray:
        """Level-0 pixels of the square at (x, y)."""
        return self.image[y : y + size, x : x + size]


def tissue_patch(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Real IHC texture uint8 (height, width, 3): the 512-px image flipped/rotated and repeated as needed."""
    ihc = ihc_image()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(-(-height // 512)):
        row = []
        for _ in range(-(-width // 512)):
            tile = np.rot90(ihc, k=int(rng.integers(4)))
            row.append(tile[:, ::-1] if rng.integers(2) else tile)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    patches: Sequence[tuple[int, int, int, int]],
    *,
    mpp: float | None = 0.5,
    levels: int = 3,
    tile: int = 128,
    compression: str = "zlib",
    seed: int = 0,
) -> SyntheticSlide:
    """Write a pyramidal tiled TIFF with tissue rectangles ``(x, y, w, h)`` (level-0 px).

    ``mpp`` is recorded in the resolution tags (None: not recorded, as in slides that need
    ``--slide-mpp``); ``compression`` is a tifffile codec ("zlib" is lossless, "jpeg" is what
    scanners use).
    """
    tifffile = optional_import("tifffile", "to write synthetic slides")
    if width < 1 or height < 1 or levels < 1:
        raise InputError(
            f"a synthetic slide needs a positive size and levels, got {width}x{height}, {levels}"
        )
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(GLASS_LEVEL, GLASS_NOISE, (height, width, 3)), 0, 255).astype(np.uint8)
    tissue = np.zeros((height, width), bool)
    for i, (x, y, w, h) in enumerate(patches):
        w, h = min(w, width - x), min(h, height - y)
        image[y : y + h, x : x + w] = tissue_patch(w, h, seed + i)
        tissue[y : y + h, x : x + w] = True
    pyramid = [image]
    for _ in range(levels - 1):
        prev = Image.fromarray(pyramid[-1])
        pyramid.append(np.asarray(prev.resize((prev.width // 2, prev.height // 2), Image.Resampling.BOX)))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        for i, level in enumerate(pyramid):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**i)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if i == 0 else 1,  # reduced-resolution pages after the first
                metadata=None,
                **extra,
            )
        tw.close()
    return SyntheticSlide(Path(path), image, tissue, mpp, levels)
