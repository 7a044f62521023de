"""Whole-slide readers: OpenSlide first (the ``openslide-bin`` wheel), tiffslide as the pure-Python fallback.

Both expose the same pyramid (level dimensions and downsamples, level-0 coordinates); :class:`Slide`
hides which one is in use and always returns uint8 RGB arrays, transparent (unscanned) pixels made
glass-white. Microns per pixel come from the slide's metadata, else from ``slide_mpp``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.errors import InputError, MissingDependency

# finding slides and naming their files lives in keys; imported from here too
from virchow_rt.slides.keys import SLIDE_SUFFIXES, find_slides, keyed_slides, slide_file  # noqa: F401

READERS = ("openslide", "tiffslide")
_PURPOSE = "to read whole-slide images"


def _load(reader: str) -> ModuleType:
    # openslide-python raises OSError (not ImportError) when the C library is missing: treat both alike
    try:
        return optional_import(reader, _PURPOSE)
    except OSError as err:
        raise MissingDependency(
            f"OpenSlide's library is needed {_PURPOSE}: pip install 'virchow-rt[slides]' (OSError: {err})"
        ) from err


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from a reader's (H, W), (H, W, 1|3|4) array; transparent pixels become white."""
    if array.dtype != np.uint8:
        raise InputError(
            f"slide pixels are {array.dtype}, not uint8; only 8-bit brightfield slides are supported"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if channels == 3:
        return np.ascontiguousarray(array)
    rgb, alpha = array[:, :, :3], array[:, :, 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # OpenSlide marks unscanned areas fully transparent; composite over glass-white (255)
    a = alpha.astype(np.uint16)  # (H, W, 1)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class Slide:
    """One open whole-slide image. Use :func:`open_slide`; close it (or use ``with``) when done.

    A handle is not shared between threads: :meth:`reopen` gives each reading thread its own.
    """

    def __init__(self, path: Path, reader: str, handle: Any, mpp: float, mpp_source: str) -> None:
        self.path = path
        self.reader = reader  # "openslide" | "tiffslide"
        self.mpp = mpp  # level-0 microns per pixel
        self.mpp_source = mpp_source  # "metadata" | "slide_mpp"
        self._handle = handle
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)

    @property
    def name(self) -> str:
        """The slide's name: its file name without the suffix (the output is ``<name>.h5``)."""
        return self.path.stem

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) read at ``level``; ``x``, ``y``: level-0 top-left corner."""
        try:
            if self.reader == "openslide":
                array = np.asarray(
                    self._handle.read_region((int(x), int(y)), int(level), (int(width), int(height)))
                )
            else:
                array = self._handle.read_region(
                    (int(x), int(y)), int(level), (int(width), int(height)), as_array=True
                )
        except Exception as err:  # noqa: BLE001 - readers raise many types (OpenSlideError, codec errors, OSError)
            raise InputError(
                f"slide {self.path.name}: reading {width}x{height} px at level {level}, level-0 ({x}, {y}) "
                f"failed ({type(err).__name__}: {err}); the file may be truncated or corrupt"
            ) from err
        return to_rgb(np.asarray(array))

    def reopen(self) -> Slide:
        """A new handle on the same file with the same reader and µm/px (for another thread)."""
        return Slide(self.path, self.reader, open_handle(self.reader, self.path), self.mpp, self.mpp_source)

    def close(self) -> None:
        """Release the file handle. Safe to call twice."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        levels = len(self.level_dimensions)
        return f"Slide({self.path.name!r}, {w}x{h} px, {self.mpp:.4g} µm/px, {levels} levels, {self.reader})"


def open_handle(reader: str, path: Path) -> Any:
    module = _load(reader)
    if reader == "openslide":
        return module.OpenSlide(str(path))
    return module.TiffSlide(str(path))


def _metadata_mpp(reader: str, handle: Any, path: Path) -> float | None:
    props = handle.properties
    found = _positive_float(props.get(f"{reader}.mpp-x")) or _positive_float(props.get(f"{reader}.mpp-y"))
    return found or _ome_mpp(path)


#: OME's PhysicalSizeXUnit -> microns
_OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome(path: Path) -> dict[str, Any] | None:
    """The OME-XML ``Pixels`` element of an OME-TIFF as a dict, else None (not OME, or unreadable)."""
    try:
        tifffile = optional_import("tifffile", _PURPOSE)
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome or not tif.ome_metadata:
                return None
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    except Exception:  # noqa: BLE001 - not a TIFF, or OME-XML of another shape: no OME facts
        return None
    image = image[0] if isinstance(image, list) else image
    pixels = image.get("Pixels")
    return pixels if isinstance(pixels, dict) else None


def _ome_mpp(path: Path) -> float | None:
    """Level-0 µm/px from an OME-TIFF's ``PhysicalSizeX`` (OpenSlide and tiffslide do not read it)."""
    pixels = _ome(path)
    if pixels is None:
        return None
    size = _positive_float(pixels.get("PhysicalSizeX"))
    unit = _OME_UNITS.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
    return size * unit if size is not None and unit is not None else None


def open_slide(path: str | Path, slide_mpp: float | None = None, reader: str = "auto") -> Slide:
    """Open a whole slide with OpenSlide, or with tiffslide where OpenSlide is missing or cannot read it.

    ``slide_mpp`` is the level-0 µm/px to use when the slide does not record one (the metadata wins
    otherwise). ``reader``: "auto", "openslide" or "tiffslide".
    """
    path = Path(path)
    if reader not in ("auto", *READERS):
        raise InputError(f"unknown slide reader {reader!r}; use auto, {', '.join(READERS)}")
    if not path.is_file():
        raise InputError(f"slide {path} does not exist or is not a file; check the path")
    order = READERS if reader == "auto" else (reader,)
    if reader == "auto" and path.suffix.lower() in (".tif", ".tiff") and _ome(path) is not None:
        order = ("tiffslide", "openslide")  # OpenSlide reads an OME-TIFF's first level only, not its pyramid
    problems: list[str] = []
    missing: list[MissingDependency] = []
    for name in order:
        logged: list[str] = []
        try:
            handle = _open_checked(name, path, logged)
        except MissingDependency as err:
            missing.append(err)
            continue
        except Exception as err:  # noqa: BLE001 - each reader has its own error types for "not my format"/corrupt
            # tifffile says what is damaged in a warning, before a later step fails with a bare IndexError
            problems.append(f"{name}: {'; '.join(logged) or f'{type(err).__name__}: {err}'}")
            continue
        mpp = _metadata_mpp(name, handle, path)
        source = "metadata"
        if mpp is None and slide_mpp is not None:
            mpp, source = _positive_float(slide_mpp), "slide_mpp"
            if mpp is None:
                handle.close()
                raise InputError(f"--slide-mpp {slide_mpp!r} must be a positive number of microns per pixel")
        if mpp is None:
            handle.close()
            raise InputError(
                f"slide {path.name} records no microns per pixel ({name} found no mpp in its metadata); "
                "pass --slide-mpp (level-0 µm/px, e.g. 0.25 for a 40x scan)"
            )
        return Slide(path, name, handle, mpp, source)
    if not problems and missing:
        raise MissingDependency(
            f"OpenSlide or tiffslide is needed {_PURPOSE}: pip install 'virchow-rt[slides]' ({missing[-1]})"
        )
    raise InputError(
        f"{path.name} is not a readable slide ({'; '.join(problems)}); the file may be truncated or corrupt: "
        "copy it again from its source"
    )


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def _open_checked(reader: str, path: Path, logged: list[str]) -> Any:
    """``open_handle`` and a first look at what every later step reads (levels, sizes, metadata), so that
    a truncated or corrupt file fails here, with the reader's own reason, not later as an IndexError.
    tifffile's warnings about a damaged file go to ``logged`` (that reason), not to the console."""
    quiet = logging.getLogger("tifffile")
    collect = _Collect(logged)
    quiet.addHandler(collect)
    propagate, quiet.propagate = quiet.propagate, False
    try:
        handle = open_handle(reader, path)
        try:
            if handle.level_count < 1 or min(handle.dimensions) < 1:
                raise ValueError(f"{handle.level_count} levels, level 0 of {handle.dimensions} px")
            [handle.level_dimensions[i] for i in range(handle.level_count)]  # noqa: B018 - read them all
            dict(handle.properties)
        except BaseException:
            handle.close()
            raise
        return handle
    finally:
        quiet.removeHandler(collect)
        quiet.propagate = propagate
