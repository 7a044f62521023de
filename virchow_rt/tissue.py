"""Real stained tissue for tests, demos and parity checks.

scikit-image ships a 512×512 immunohistochemistry (IHC) image of human colon tissue (DAB +
hematoxylin). Tiles are random crops of it with random flips and 90° rotations: real stain colour
and texture, deterministic for a seed, no download.
"""

from __future__ import annotations

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.errors import InputError


def ihc_image() -> np.ndarray:
    """The scikit-image IHC image, uint8 (512, 512, 3)."""
    data = optional_import("skimage.data", "for the bundled real-tissue tiles")
    return np.ascontiguousarray(data.immunohistochemistry())


def tissue_tiles(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` uint8 tiles (n, size, size, 3) cut from the IHC image (size ≤ 512)."""
    image = ihc_image()
    if not 1 <= size <= image.shape[0]:
        raise InputError(f"tile size {size} must be between 1 and {image.shape[0]} px for the IHC image")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, image.shape[0] - size + 1, size=2)
        tile = image[y : y + size, x : x + size]
        tile = np.rot90(tile, k=int(rng.integers(4)))
        out[i] = tile[:, ::-1] if rng.integers(2) else tile
    return out
