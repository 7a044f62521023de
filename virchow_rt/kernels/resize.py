"""CPU reference resize: exactly timm's eval transform geometry.

timm's eval transform is ``Resize(floor(size / crop_pct), interpolation)`` (shorter side, on a PIL
image, so PIL's antialiased filters) followed by ``CenterCrop(size)``: for the Virchow models bicubic
with ``crop_pct`` 1.0, for Prov-GigaPath's authors 256 then 224 (``crop_pct`` 0.875), bilinear for UNI
and Phikon. torchvision computes the resized long side as ``int(scale * long / short)`` (truncation) and
the crop offset as ``int(round((extent - size) / 2))`` (Python's round: halves go to even), and skips
the resize when the image already has the target size. This module does the same calls on the same PIL
images, so its output equals timm's pixel for pixel; with ``crop_pct`` 1.0, tiles that are already
``size`` × ``size`` pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from virchow_rt.contract import check_tile_array
from virchow_rt.errors import InputError

#: timm interpolation names -> PIL filters (both antialiased when downscaling, as torchvision on PIL)
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
#: a tile's long side is at most this many times its short side: the resize makes the short side S, so a
#: 1x4096 strip would become a 917,504x224 px intermediate (about 600 MB) for one centre crop
MAX_ASPECT = 4


def scale_size(size: int, crop_pct: float = 1.0) -> int:
    """The shorter side timm resizes to before cropping ``size``: ``floor(size / crop_pct)``."""
    if not 0 < crop_pct <= 1:
        raise InputError(f"crop_pct {crop_pct} must be in (0, 1]; timm's eval transform crops a centre part")
    return math.floor(size / crop_pct)


def needs_resize(height: int, width: int, size: int, crop_pct: float = 1.0) -> bool:
    """False when timm's eval transform leaves a ``height`` × ``width`` tile untouched."""
    return not (height == width == size and scale_size(size, crop_pct) == size)


def check_aspect(height: int, width: int, what: str = "tile") -> None:
    """Raise a one-line :class:`InputError` for a tile of under 1 px a side or one whose long side is over
    :data:`MAX_ASPECT` times its short side (its resize would cost far more memory than the tile)."""
    if height < 1 or width < 1:
        raise InputError(f"a {height}x{width} px {what}: a tile is at least 1 px a side")
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise InputError(
            f"a {height}x{width} px {what}: a tile's long side is at most {MAX_ASPECT}x its short side (the "
            "model sees only its centre square); cut the image into square tiles first"
        )


def resize_geometry(height: int, width: int, size: int, crop_pct: float = 1.0) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_top, crop_left) of timm's Resize(floor(size / crop_pct)), CenterCrop(size).

    Same integer arithmetic as torchvision's ``_compute_resized_output_size`` and ``center_crop``. Tiles
    that :func:`check_aspect` refuses raise :class:`InputError`.
    """
    if size < 1:
        raise InputError(f"cannot resize tiles to {size} px; give a size of 1 px or more")
    check_aspect(height, width)
    scale = scale_size(size, crop_pct)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = scale, int(scale * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return new_h, new_w, top, left


def check_tile(tile: np.ndarray, what: str = "tile") -> np.ndarray:
    """Validate one uint8 (H, W, 3) tile; the error names the bad dtype/shape and the fix."""
    if not isinstance(tile, np.ndarray):
        raise InputError(
            f"{what} is a {type(tile).__name__}, not a numpy array; pass uint8 (H, W, 3) RGB arrays"
        )
    if tile.dtype != np.uint8:
        raise InputError(
            f"{what} has dtype {tile.dtype}; tiles must be uint8 RGB (0-255): convert with "
            "np.clip(x, 0, 255).astype(np.uint8) (multiply 0-1 floats by 255 first)"
        )
    if tile.ndim != 3 or tile.shape[-1] != 3:
        raise InputError(
            f"{what} has shape {tile.shape}; expected (H, W, 3) RGB (drop alpha, stack gray to 3)"
        )
    return tile


def _filter(interpolation: str) -> Image.Resampling:
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation {interpolation!r}; use one of: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[interpolation]


def resize_tile(
    tile: np.ndarray, size: int = 224, crop_pct: float = 1.0, interpolation: str = "bicubic"
) -> np.ndarray:
    """One uint8 (H, W, 3) tile -> uint8 (size, size, 3), timm's eval geometry (see module doc)."""
    check_tile(tile)
    height, width = tile.shape[:2]
    resample = _filter(interpolation)
    if not needs_resize(height, width, size, crop_pct):
        return tile  # torchvision skips the resize and the crop is the whole image
    new_h, new_w, top, left = resize_geometry(height, width, size, crop_pct)
    image = Image.fromarray(np.ascontiguousarray(tile))  # (H, W, 3) uint8 -> an RGB image
    if (new_h, new_w) != (height, width):
        # PIL's resize is antialiased (its support widens with the downscale factor), as in timm
        image = image.resize((new_w, new_h), resample)
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image)  # (size, size, 3) uint8


def resize_tiles(
    tiles: np.ndarray | Sequence[np.ndarray],
    size: int = 224,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """uint8 tiles (N, H, W, 3) (or a sequence of (H, W, 3) tiles of any sizes) -> uint8 (N, size, size, 3).

    Fast path: an (N, size, size, 3) array that timm's transform leaves untouched (``crop_pct`` 1.0) is
    returned as it is (made C-contiguous, no copy when it already is). Otherwise each tile is resized on
    its own, shorter side to ``floor(size / crop_pct)`` then center cropped, exactly as timm's eval
    transform does it.
    """
    _filter(interpolation)
    if isinstance(tiles, np.ndarray):
        check_tile_array(tiles)
        if not needs_resize(tiles.shape[1], tiles.shape[2], size, crop_pct):
            return np.ascontiguousarray(tiles)
    out = np.empty((len(tiles), size, size, 3), np.uint8)  # (N, S, S, 3)
    for i, tile in enumerate(tiles):
        out[i] = resize_tile(check_tile(tile, f"tile {i}"), size, crop_pct, interpolation)
    return out
