"""Synthetic whole slides for tests, demos and benchmarks: real IHC tissue on glass, as a pyramidal TIFF.

Written with tifffile: level 0 plus reduced levels (box filter; 2× each by default, or any
``downsamples``), tiled, in one of the layouts scanners and converters write (``layout``):

- "generic": a tiled TIFF, µm/px in the resolution tags (OpenSlide's generic-TIFF driver, tiffslide);
- "svs": Aperio's layout: the ``Aperio Image Library`` description with ``MPP`` and ``AppMag`` on every
  page, level 0, a stripped thumbnail page, the reduced levels, then label and macro pages;
- "ome": OME-TIFF, the reduced levels as SubIFDs of level 0, µm/px as OME-XML ``PhysicalSizeX``.

Tissue is scikit-image's IHC
image (see :mod:`virchow_rt.tissue`) flipped/rotated and placed as rectangles on a glass-white,
slightly noisy background, so the tissue mask and the embeddings see real stain and texture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from virchow_rt._deps import optional_import
from virchow_rt.errors import InputError
from virchow_rt.files import atomic_path
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
    layout: str = "generic",
    downsamples: Sequence[int] | None = None,
) -> SyntheticSlide:
    """Write a pyramidal tiled TIFF with tissue rectangles ``(x, y, w, h)`` (level-0 px).

    ``mpp`` is recorded as the layout does (None: not recorded, as in slides that need
    ``--slide-mpp``); ``compression`` is a tifffile codec ("zlib" is lossless, "jpeg" is what
    scanners use); ``downsamples`` of the reduced levels (default 2, 4, ...: ``levels`` - 1 of them).
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown synthetic slide layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
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
    factors = [1, *(downsamples or [2**i for i in range(1, levels)])]
    full = Image.fromarray(image)
    pyramid = [image] + [
        np.asarray(full.resize((width // f, height // f), Image.Resampling.BOX)) for f in factors[1:]
    ]
    ome = {"bigtiff": True, "ome": True} if layout == "ome" else {}  # the temporary name hides .ome.tif
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, **ome) as tw:
        LAYOUTS[layout](tw, pyramid, factors, mpp, {"tile": (tile, tile), "photometric": "rgb",
                                                  "compression": compression})  # fmt: skip
    return SyntheticSlide(Path(path), image, tissue, mpp, len(pyramid))


def _generic(tw: Any, pyramid: list[np.ndarray], factors: list[int], mpp: float | None, opts: dict) -> None:
    for level, f in zip(pyramid, factors, strict=True):
        extra = {}
        if mpp is not None:
            per_cm = 1e4 / (mpp * f)
            extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
        # reduced-resolution pages after the first
        tw.write(level, subfiletype=0 if f == 1 else 1, metadata=None, **opts, **extra)


def _svs(tw: Any, pyramid: list[np.ndarray], factors: list[int], mpp: float | None, opts: dict) -> None:
    height, width = pyramid[0].shape[:2]
    tail = f"|AppMag = 40|Filename = synthetic|MPP = {mpp}" if mpp is not None else "|AppMag = 40"
    head = "Aperio Image Library v12.0.15 \r\n"

    def description(level: np.ndarray) -> str:
        return f"{head}{width}x{height} -> {level.shape[1]}x{level.shape[0]} - {tail}"

    tw_, th_ = opts["tile"]
    first = f"{head}{width}x{height} [0,0 {width}x{height}] ({tw_}x{th_}) JPEG/RGB Q=70{tail}"
    tw.write(pyramid[0], description=first, metadata=None, **opts)
    thumb = np.asarray(Image.fromarray(pyramid[0]).resize((max(1, width // 32), max(1, height // 32))))
    tw.write(thumb, photometric="rgb", compression="jpeg", description=description(thumb), metadata=None)
    for level in pyramid[1:]:
        tw.write(level, description=description(level), metadata=None, **opts)
    label = np.full((64, 64, 3), 200, np.uint8)
    tw.write(label, photometric="rgb", compression="lzw", subfiletype=1, description=f"{head}label 64x64",
             metadata=None)  # fmt: skip
    tw.write(label, photometric="rgb", compression="jpeg", subfiletype=9, description=f"{head}macro 64x64",
             metadata=None)  # fmt: skip


def _ome(tw: Any, pyramid: list[np.ndarray], factors: list[int], mpp: float | None, opts: dict) -> None:
    meta: dict[str, Any] = {"axes": "YXS"}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    tw.write(pyramid[0], subifds=len(pyramid) - 1, metadata=meta, **opts)
    for level in pyramid[1:]:
        tw.write(level, subfiletype=1, **opts)


LAYOUTS = {"generic": _generic, "svs": _svs, "ome": _ome}


def write_large_slide(path: str | os.PathLike, width: int, height: int, *, mpp: float = 0.5, tile: int = 256,
                      levels: int = 4, seed: int = 0) -> Path:  # fmt: skip
    """A slide of any size (say 70,000 px square) written tile by tile: host memory stays small.

    Level 0 repeats one tile of real IHC tissue (with a few flips so that tiles differ), JPEG
    compressed, µm/px in the resolution tags; each reduced level (2× box filter) repeats the reduced
    tile the same way. For memory and throughput benchmarks of very large slides: the tissue mask sees
    tissue everywhere.
    """
    tifffile = optional_import("tifffile", "to write synthetic slides")
    base = tissue_patch(tile, tile, seed)
    variants = [base, base[::-1], base[:, ::-1], base[::-1, ::-1]]  # (tile, tile, 3) each
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level in range(levels):
            f = 2**level
            w, h = width // f, height // f
            side = max(1, tile // f)
            small = [
                np.asarray(Image.fromarray(v).resize((side, side), Image.Resampling.BOX)) for v in variants
            ]
            blocks = [np.tile(s, (f, f, 1))[:tile, :tile] if f > 1 else s for s in small]  # (tile, tile, 3)
            cols, rows = -(-w // tile), -(-h // tile)

            def tiles(blocks: list[np.ndarray] = blocks, cols: int = cols, rows: int = rows) -> Any:
                for i in range(rows * cols):
                    yield blocks[(i * 7 + i // cols) % len(blocks)]

            per_cm = 1e4 / (mpp * f)
            tw.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", subfiletype=0 if level == 0 else 1, metadata=None,
                     resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")  # fmt: skip
    return Path(path)
