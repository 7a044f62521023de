"""The per-slide ``.h5`` file: TRIDENT/CLAM layout, written to a temporary file, complete or absent.

Layout of ``<out>/<slide name>.h5``::

    features                (N, E) float32   one row per tile, in ``coords`` order
    coords                  (N, 2) int64     level-0 x, y of each tile's top-left corner
        attrs (TRIDENT's names): patch_size, patch_size_level0, level0_magnification,
        target_magnification, overlap, name, level0_width, level0_height (with --coords: the source's,
        and a CLAM source's patch_level and custom_downsample)
    regions/                (only with --regions, e.g. 5,10,20: T = 1 + 4 + 16 = 21 tiles per region)
        features            (R, T, E) float32  tiles of each region, lowest magnification first, row by row
        coords              (R, T, 2) int64    level-0 x, y of each tile
        magnification       (T,) float64       magnification of tile position t (5, 10, 10, 10, 10, 20, ...)
        mpp                 (T,) float64       nominal µm/px of position t (10 / magnification)
        patch_size_level0   (T,) int64         level-0 side of the tile at position t
        offset              (T, 2) int64       level-0 x, y of position t inside its region
        position            (T, 2) int64       row, column of position t in its magnification's grid
    root attrs: everything above plus encoder, pooling, embedding_dim, model_sha256, weights_sha256,
        precision, random_weights, backend, reader, target_mpp, level0_mpp, min_tissue, regions, edge_fill,
        coords_source and coords_sha256 (the --coords file and its sha256; empty without --coords),
        num_tiles, skipped_tiles, slide_size_bytes, mpp_source, format, format_version, created,
        virchow_rt_version and, written last, complete = True.

``features``/``coords`` always hold the slide's tile grid at --mpp, the same with or without
--regions (TRIDENT-layout readers see the usual file); --regions adds the ``regions/`` group.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.slides.regions import RegionLayout

FORMAT = "virchow-rt-slide-features"
FORMAT_VERSION = 1
#: attributes TRIDENT writes on ``coords`` (its feature files copy them from the patching step)
TRIDENT_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
)
_PURPOSE = "to write slide features (.h5)"


def _h5py() -> Any:
    return optional_import("h5py", _PURPOSE)


def _attr(value: Any) -> Any:
    """HDF5 has no None: store it as an empty string; bools as numpy bools."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return np.bool_(value)
    return value


class FeatureWriter:
    """Appends tiles (and regions) to a new ``.h5`` at ``path``; :meth:`finish` marks it complete.

    ``path`` should be a temporary file (see :func:`virchow_rt.files.atomic_path`): only a finished
    file is renamed onto ``<slide name>.h5``.
    """

    def __init__(
        self, path: str | os.PathLike, embedding_dim: int, layout: RegionLayout | None = None
    ) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self.embedding_dim = embedding_dim
        self.layout = layout
        self._file = h5py.File(self.path, "w")
        rows = max(1, (1 << 18) // embedding_dim)  # ~1 MB chunks
        self._features = self._file.create_dataset(
            "features",
            shape=(0, embedding_dim),
            maxshape=(None, embedding_dim),
            dtype="float32",
            chunks=(rows, embedding_dim),
        )
        self._coords = self._file.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2)
        )
        self._regions = None
        if layout is not None:
            t = layout.tiles_per_region
            group = self._file.create_group("regions")
            group.create_dataset(
                "features", shape=(0, t, embedding_dim), maxshape=(None, t, embedding_dim), dtype="float32",
                chunks=(1, t, embedding_dim),
            )  # fmt: skip
            group.create_dataset(
                "coords", shape=(0, t, 2), maxshape=(None, t, 2), dtype="int64", chunks=(256, t, 2)
            )
            group["magnification"] = layout.magnification.astype(np.float64)
            group["mpp"] = layout.mpp.astype(np.float64)
            group["patch_size_level0"] = layout.size0.astype(np.int64)
            group["offset"] = layout.offset.astype(np.int64)
            group["position"] = layout.position.astype(np.int64)
            self._regions = group

    @staticmethod
    def _append(dataset: Any, rows: np.ndarray) -> None:
        start = dataset.shape[0]
        dataset.resize(start + len(rows), axis=0)
        dataset[start:] = rows

    def append(self, coords: np.ndarray, features: np.ndarray) -> None:
        """Add tiles: ``coords`` (B, 2) int64, ``features`` (B, E) float32."""
        assert features.shape == (len(coords), self.embedding_dim), features.shape
        self._append(self._coords, np.asarray(coords, np.int64))
        self._append(self._features, np.asarray(features, np.float32))

    def append_regions(self, coords: np.ndarray, features: np.ndarray) -> None:
        """Add whole regions: ``coords`` (R, T, 2) int64, ``features`` (R, T, E) float32."""
        assert self._regions is not None and self.layout is not None, "writer made without a region layout"
        assert features.shape[1:] == (self.layout.tiles_per_region, self.embedding_dim), features.shape
        self._append(self._regions["coords"], np.asarray(coords, np.int64))
        self._append(self._regions["features"], np.asarray(features, np.float32))

    @property
    def num_tiles(self) -> int:
        return int(self._features.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self._regions["features"].shape[0]) if self._regions is not None else 0

    def finish(self, attrs: Mapping[str, Any], coords_attrs: Mapping[str, Any] | None = None) -> None:
        """Write ``attrs`` (root; TRIDENT's on ``coords``, the model's on ``features``), mark complete.

        ``coords_attrs``: how the tiling's source describes the tiles (TRIDENT's attributes and a CLAM
        source's ``patch_level``...), written on ``coords`` over the root values."""
        n = self.num_tiles
        root = {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "num_tiles": n}
        if self._regions is not None:
            root["num_regions"] = self.num_regions
        for key, value in root.items():
            self._file.attrs[key] = _attr(value)
        described = {**{key: attrs[key] for key in TRIDENT_ATTRS}, **(coords_attrs or {})}
        for key, value in described.items():  # TRIDENT stores these two as floats: its readers may expect it
            value = float(value) if key in ("patch_size_level0", "target_magnification") else value
            self._coords.attrs[key] = _attr(value)
        for key in ("name", "encoder", "pooling", "embedding_dim", "random_weights", "model_sha256"):
            self._features.attrs[key] = _attr(attrs[key])
        self._file.flush()
        # last: a file without this flag was interrupted and is redone by the next run
        self._file.attrs["complete"] = np.bool_(True)
        self.close()

    def close(self) -> None:
        """Close the file (unfinished files stay without ``complete``). Safe to call twice."""
        file, self._file = self._file, None
        if file is not None:  # forgotten even when closing fails (HDF5 on a full disk): never closed twice
            file.close()


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float | np.floating):
        try:
            return math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(got, bytes):
        got = got.decode()
    if isinstance(got, np.generic):
        got = got.item()
    return got == want


def _plain(value: Any) -> str:
    """A stored attribute as a person reads it: 224, not np.int64(224); text without quotes or b''."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return repr(value) if value == "" else str(value)


def check_complete(path: str | os.PathLike, expected: Mapping[str, Any]) -> str | None:
    """Why ``path`` is not a complete, valid feature file for this run (None when it is).

    Checks that it opens, is marked complete, holds ``features`` (N, E) float32 and ``coords`` (N, 2)
    int64 with N = ``num_tiles``, region datasets consistent with ``num_regions``, and that every
    ``expected`` root attribute (model hash, pooling, tile settings...) matches.
    """
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except Exception as err:  # noqa: BLE001 - h5py raises OSError subclasses and others for damaged files
        return f"cannot be opened ({type(err).__name__}: {err})"
    try:
        with handle as f:
            attrs = f.attrs
            if not bool(attrs.get("complete", False)):
                return "not marked complete (an interrupted run)"
            for key, want in expected.items():
                if key not in attrs:
                    return f"has no attribute {key!r}"
                if not _same(attrs[key], want):
                    return f"was made with {key} {_plain(attrs[key])}, this run uses {_plain(want)}"
            if "features" not in f or "coords" not in f:
                return "lacks the features or coords dataset"
            feats, coords = f["features"], f["coords"]
            n, e = int(attrs.get("num_tiles", -1)), int(attrs.get("embedding_dim", -1))
            if feats.dtype != np.float32 or feats.shape != (n, e):
                return f"features is {feats.dtype} {feats.shape}, expected float32 ({n}, {e})"
            if coords.dtype != np.int64 or coords.shape != (n, 2):
                return f"coords is {coords.dtype} {coords.shape}, expected int64 ({n}, 2)"
            if "num_regions" in attrs:
                r = int(attrs["num_regions"])
                if "regions" not in f:
                    return "lacks the regions group"
                g = f["regions"]
                t = len(g["magnification"])
                if g["features"].shape != (r, t, e) or g["coords"].shape != (r, t, 2):
                    return f"regions/features is {g['features'].shape}, expected ({r}, {t}, {e})"
            if n and not np.isfinite(feats[n - 1]).all():  # reading the last row proves the data is there
                return "has non-finite features in its last row"
    except Exception as err:  # noqa: BLE001 - truncated data surfaces as OSError/KeyError on access
        return f"is damaged ({type(err).__name__}: {err})"
    return None


def _attrs(f: Any) -> dict[str, Any]:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a slide's ``.h5`` (no datasets are read)."""
    with _h5py().File(path, "r") as f:
        return _attrs(f)


def read_features(path: str | os.PathLike) -> dict[str, Any]:
    """Load a slide's ``.h5``: ``{"features", "coords", "attrs", "regions": {...} | None}`` (numpy arrays)."""
    with _h5py().File(path, "r") as f:
        out: dict[str, Any] = {
            "features": f["features"][()],
            "coords": f["coords"][()],
            "attrs": _attrs(f),
            "regions": None,
        }
        if "regions" in f:
            out["regions"] = {name: f["regions"][name][()] for name in f["regions"]}
    return out


def stored_counts(path: Path) -> tuple[int, int | None]:
    """(tiles, regions or None) recorded in a complete file."""
    attrs = read_attrs(path)
    regions = int(attrs["num_regions"]) if "num_regions" in attrs else None
    return int(attrs["num_tiles"]), regions


def resume_problem(path: Path, expected: dict[str, Any], slide_mpp: float | None) -> str | None:
    """Why the existing ``path`` must be redone (:func:`check_complete`, then the µm/px it assumed)."""
    reason = check_complete(path, expected)
    if reason is not None or slide_mpp is None:
        return reason
    attrs = read_attrs(path)
    # a file tiled with a user-given --slide-mpp is valid only for that µm/px (the slide records none)
    if attrs.get("mpp_source") == "slide_mpp" and not math.isclose(
        float(attrs["level0_mpp"]), float(slide_mpp), rel_tol=1e-6
    ):
        return f"was made with --slide-mpp {float(attrs['level0_mpp']):g}, this run uses {slide_mpp:g}"
    return None
