"""Another tool's tiling (``--coords``): TRIDENT's or CLAM's coordinates ``.h5``, checked, then tile for tile.

The file is read as untrusted input: ``coords`` must be a plain ``(N, 2)`` integer (or integral float)
dataset stored in the file itself (no external storage, virtual dataset or link), every tile's corner
inside the slide, the tile side sane, the row count bounded by what the slide can hold before any row
is read, and the file made for this slide (its ``name``, its level-0 size). Each problem is one
:class:`~virchow_rt.errors.InputError` line.

What is embedded is what the source tool embeds from the file:

- TRIDENT (``patch_size``, ``level0_magnification``, ``target_magnification``): its patcher's level-0
  side ``round(patch_size · (10 / target) / (10 / level0))``, read at the level nearest the tile;
- CLAM (``patch_size`` at ``patch_level``, optional ``custom_downsample``): ``patch_size ·
  custom_downsample`` pixels read at ``patch_level`` (the level the file says), resized;

past the slide's edge both read black (OpenSlide's transparent outside, made RGB), so these tiles are
filled with 0 (``edge_fill``). The output's ``coords`` attributes are the source's, so TRIDENT's
feature and slide-encoder code re-reads the very squares that were embedded.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.errors import InputError
from virchow_rt.slides.grid import (
    BLACK,
    MPP_AT_1X,
    TileGrid,
    level0_magnification,
    pick_level,
    plan_tiles,
)
from virchow_rt.slides.mask import MaskConfig, tissue_mask
from virchow_rt.slides.reader import Slide, slide_file

#: the most pixels a tile may span at the level it is read from (a tile is a few hundred px a side)
MAX_TILE_SIDE = 4096
#: rows a coordinates file may hold, whatever the slide (16 M rows: 256 MB of coordinates)
MAX_ROWS = 1 << 24
#: a tile read from fewer level-0 px than its side / this would be upsampled beyond any use
MAX_UPSAMPLE = 8
#: the most bytes a coordinates file may weigh: MAX_ROWS rows and room for HDF5's own structures
MAX_COORDS_BYTES = MAX_ROWS * 16 + (1 << 20)
#: a tiling without a recorded step (CLAM) may overlap up to 3/4 of a tile: 16 tiles per tile area
_UNRECORDED_STEP = 4
#: attributes read from ``coords`` (nothing else is); each holds at most this many values
_KEYS = (
    "patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap", "name",
    "level0_width", "level0_height", "patch_level", "downsample", "custom_downsample", "level_dim",
)  # fmt: skip
_MAX_ATTR_VALUES = 4
#: TRIDENT names a slide without these compound suffixes (``x.ome.tif`` is ``x``)
_COMPOUND = (".ome",)


@dataclass(frozen=True)
class CoordsFile:
    """A checked coordinates file: what to read, and how the source tool describes it."""

    path: Path
    coords: np.ndarray  # (N, 2) int64 level-0 x, y of each tile's top-left corner, the file's order
    patch_size_level0: int
    patch_size: int  # the tile side the file describes (at the target magnification)
    level0_magnification: int | float
    target_magnification: int | float
    overlap: int = 0
    level: int | None = None  # CLAM: the pyramid level the file says to read
    legacy: dict[str, int | float] = field(default_factory=dict)  # CLAM's patch_level, custom_downsample

    @property
    def target_mpp(self) -> float:
        return MPP_AT_1X / self.target_magnification


def source_names(slide_name: str) -> tuple[str, ...]:
    """Names another tool may have given slide ``slide_name`` (TRIDENT drops ``.ome`` of ``x.ome.tif``)."""
    names = [slide_name]
    for suffix in _COMPOUND:
        if slide_name.lower().endswith(suffix) and len(slide_name) > len(suffix):
            names.append(slide_name[: -len(suffix)])
    return tuple(names)


def check_source(source: str | Path, slides: Sequence[Path]) -> None:
    """Refuse one coordinates file for several slides (each slide has its own tiling)."""
    if Path(source).is_file() and len(slides) > 1:
        raise InputError(
            f"--coords {source} is one slide's coordinates file, given for {len(slides)} slides; give the "
            "folder TRIDENT or CLAM wrote (one <slide>_patches.h5 per slide), or run one slide at a time"
        )


def coords_file(source: str | Path, slide_name: str) -> Path:
    """The coordinates file of slide ``slide_name`` in ``--coords`` (a file, or a TRIDENT/CLAM folder).

    ``slide_name`` is the slide's key: with ``--mirror-folders`` its sub-folders are looked in, inside the
    folder (``caseA/slide1``: ``<coords>/caseA/slide1.h5``, ``<coords>/patches/caseA/slide1_patches.h5``)."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(
            f"--coords {source} does not exist; give a coordinates .h5 or the folder holding them"
        )
    folder, _, name = slide_name.rpartition("/")
    keys = [f"{folder}/{n}" if folder else n for n in source_names(name)]
    tails = (".h5", "_patches.h5")
    places = [(path / sub, key, tail) for sub in ("", "patches") for key in keys for tail in tails]
    found = next((p / f"{k}{t}" for p, k, t in places if (p / f"{k}{t}").is_file()), None)
    if found is None:
        flat = "; TRIDENT and CLAM write flat folders: mirror them, or run without --mirror-folders"
        raise InputError(
            f"--coords {source} has no coordinates for slide {slide_name} (looked for {slide_name}.h5 and "
            f"{slide_name}_patches.h5, also in patches/); give the folder TRIDENT or CLAM wrote for them"
            f"{flat if folder else ''}"
        )
    # the slide's file is never one that leads out of the folder (through ``..`` or a symlink)
    return slide_file(path, str(found.relative_to(path)), "")


def coords_sha256(source: str | Path, slide_name: str) -> str:
    """The sha256 of slide ``slide_name``'s coordinates file in ``--coords``: an output records it, and a
    rerun redoes the slide when the file changed (new tiles under the same path)."""
    path = coords_file(source, slide_name)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_COORDS_BYTES:  # bounded before it is read (a coords file of 1M tiles: 16 MB)
                raise InputError(
                    f"--coords {path} weighs {size >> 20} MiB, more than {MAX_COORDS_BYTES >> 20} MiB; not a "
                    "coordinates file: give the .h5 TRIDENT or CLAM wrote for this slide"
                )
            digest = hashlib.sha256()
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
            return digest.hexdigest()
    except OSError as err:
        raise InputError(f"--coords {path} cannot be read ({err.strerror or err})") from err


def _attrs(ds: Any, where: str) -> dict[str, Any]:
    """The known attributes of ``coords``, each a small scalar or vector (never a large one read)."""
    found: dict[str, Any] = {}
    for key in _KEYS:
        if key not in ds.attrs:
            continue
        shape = ds.attrs.get_id(key).shape or ()
        if math.prod(shape) > _MAX_ATTR_VALUES:
            raise InputError(f"{where}: attribute {key} holds {math.prod(shape)} values; a tiling's is one")
        value = ds.attrs[key]
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        found[key] = value
    return found


def _number(attrs: dict[str, Any], key: str, where: str) -> float | None:
    """The attribute ``key`` as a finite float (the first value of a vector), None when absent."""
    if key not in attrs:
        return None
    try:
        value = float(np.ravel(np.asarray(attrs[key], dtype=np.float64))[0])
    except (TypeError, ValueError, IndexError) as err:
        raise InputError(f"{where}: attribute {key} = {attrs[key]!r} is not a number") from err
    if not math.isfinite(value):
        raise InputError(f"{where}: attribute {key} = {value} is not a finite number")
    return value


def _positive(attrs: dict[str, Any], key: str, where: str, integral: bool = False) -> float | None:
    value = _number(attrs, key, where)
    if value is not None and (value <= 0 or (integral and value != round(value))):
        kind = "positive whole number" if integral else "positive number"
        raise InputError(f"{where}: attribute {key} = {value:g} must be a {kind}")
    return value


def _check_made_for(attrs: dict[str, Any], slide: Slide, level: int | None, where: str) -> None:
    """Refuse a file whose ``name`` or recorded size says it was made for another slide."""
    name = attrs.get("name")
    if isinstance(name, bytes | np.bytes_):
        name = name.decode("utf-8", "replace")
    if name is not None and not isinstance(name, str | np.str_):  # an array of names would skip the check
        raise InputError(f"{where}: attribute name = {str(name)[:100]!r} must be one slide name")
    if isinstance(name, str | np.str_) and name and str(name) not in source_names(slide.name):
        raise InputError(
            f"{where} is the tiling of slide {str(name)[:200]!r}, not of {slide.name!r}; give each slide its "
            "own coordinates (the folder TRIDENT or CLAM wrote, or run one slide at a time)"
        )
    width, height = (_number(attrs, k, where) for k in ("level0_width", "level0_height"))
    if width is not None and height is not None and (int(width), int(height)) != slide.dimensions:
        w, h = slide.dimensions
        raise InputError(
            f"{where} was made for a {int(width)}x{int(height)}-px slide; {slide.name} is {w}x{h} px: these "
            "are another slide's (or another scan's) coordinates"
        )
    if level is not None and "level_dim" in attrs:
        dims = tuple(int(v) for v in np.ravel(np.asarray(attrs["level_dim"], dtype=np.float64))[:2])
        if dims != slide.level_dimensions[level]:
            w, h = slide.level_dimensions[level]
            raise InputError(
                f"{where} was made for level {level} of {dims[0]}x{dims[1]} px; level {level} of "
                f"{slide.name} is {w}x{h} px: these are another slide's (or another scan's) coordinates"
            )


def _describe(attrs: dict[str, Any], slide: Slide, where: str) -> dict[str, Any]:
    """The tiling as the source tool reads it: level-0 side, tile side, magnifications, level."""
    patch_size = _positive(attrs, "patch_size", where, integral=True)
    level0 = _positive(attrs, "level0_magnification", where)
    target = _positive(attrs, "target_magnification", where)
    given_size0 = _positive(attrs, "patch_size_level0", where)
    overlap = _number(attrs, "overlap", where) or 0.0
    if patch_size is not None and level0 is not None and target is not None:  # TRIDENT's own reader
        size0 = _side(patch_size * ((MPP_AT_1X / target) / (MPP_AT_1X / level0)), where)  # its patcher's
        if given_size0 is not None and abs(size0 - given_size0) > 1:
            raise InputError(
                f"{where}: patch_size_level0 {given_size0:g} disagrees with patch_size {patch_size:g} at "
                f"{target:g}x on a {level0:g}x scan ({size0} px); the file's attributes are inconsistent"
            )
        described = {"size0": size0, "patch_size": patch_size, "level0": level0, "target": target}
    elif patch_size is not None and "patch_level" in attrs:  # CLAM (and Fishing-Rod)
        described = _clam(attrs, slide, patch_size, where)
    elif given_size0 is not None:
        level0 = level0 or level0_magnification(slide.mpp)
        target = target or level0 * (patch_size or given_size0) / given_size0
        described = {"size0": round(given_size0), "patch_size": patch_size or round(given_size0),
                     "level0": level0, "target": target}  # fmt: skip
    else:
        raise InputError(
            f"{where}: its coords have neither patch_size and magnifications (TRIDENT) nor patch_size and "
            "patch_level (CLAM); cannot tell the tiles' level-0 size"
        )
    if not 0 <= overlap < described["patch_size"] or overlap != round(overlap):
        raise InputError(f"{where}: overlap {overlap:g} must be a whole number of px below the tile side")
    described["overlap"] = int(overlap)
    return described


def _side(value: float, where: str) -> int:
    """A level-0 tile side from the file's attributes, refused when it overflows (checked again later)."""
    if not (math.isfinite(value) and abs(value) < 2**53):
        raise InputError(f"{where}: its attributes make a level-0 tile side of {value:g} px; not a tile")
    return round(value)


def _clam(attrs: dict[str, Any], slide: Slide, patch_size: float, where: str) -> dict[str, Any]:
    level_value = _number(attrs, "patch_level", where)
    levels = len(slide.level_downsamples)
    if level_value is None or level_value != round(level_value) or not 0 <= level_value < levels:
        raise InputError(
            f"{where}: patch_level {attrs['patch_level']!r} is not a level of {slide.name} (0..{levels - 1})"
        )
    level = int(level_value)
    downsample = slide.level_downsamples[level]
    recorded = _positive(attrs, "downsample", where)
    if recorded is not None and not math.isclose(recorded, downsample, rel_tol=0.02):
        raise InputError(
            f"{where} was made for level {level} at downsample {recorded:g}; that level of {slide.name} is "
            f"downsampled {downsample:g}: these are another scan's coordinates"
        )
    custom = _positive(attrs, "custom_downsample", where) or 1.0
    factor = downsample * custom  # level-0 px per described tile px
    size0 = _side(patch_size * factor, where)
    level0 = level0_magnification(slide.mpp)
    target: float = level0 / factor
    if math.isfinite(target) and round(target) >= 1 and round(patch_size * level0 / round(target)) == size0:
        target = round(target)
    legacy = {"patch_level": level} | ({"custom_downsample": custom} if "custom_downsample" in attrs else {})
    return {"size0": size0, "patch_size": patch_size, "level0": level0, "target": target, "level": level,
            "legacy": legacy}  # fmt: skip


def _dataset(f: Any, h5py: Any, where: str) -> Any:
    """``coords``: a hard-linked dataset whose data lives in the file itself."""
    link = f.get("coords", getlink=True)  # the link itself: a soft or external one is not followed
    if link is None:
        raise InputError(f"{where} has no coords dataset; give a TRIDENT or CLAM coordinates .h5")
    if not isinstance(link, h5py.HardLink):
        raise InputError(
            f"{where}: coords is a {type(link).__name__}, not a dataset stored in the file; links are not "
            "followed (they may point at any file)"
        )
    ds = f["coords"]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{where}: coords is a {type(ds).__name__}, not a dataset")
    if ds.external or ds.is_virtual:
        raise InputError(
            f"{where}: coords keeps its data outside the file (external storage or a virtual dataset); "
            "only coordinates stored in the file itself are read"
        )
    return ds


def _max_rows(slide: Slide, size0: int, overlap0: int | None) -> int:
    """Tiles the slide can hold: a grid (past the edges) at the file's step, or at a quarter tile."""
    step = max(1, size0 - overlap0) if overlap0 is not None else max(1, size0 // _UNRECORDED_STEP)
    w, h = slide.dimensions
    return min(MAX_ROWS, math.ceil(w / step) * math.ceil(h / step))


def _values(ds: Any, slide: Slide, max_rows: int, where: str) -> np.ndarray:
    """(N, 2) int64 from a checked (N, 2) integer or integral float dataset, every corner inside the slide."""
    if ds.shape is None or len(ds.shape) != 2 or ds.shape[1] != 2:  # None: an empty (null) dataspace
        raise InputError(f"{where}: coords has shape {ds.shape}; an (N, 2) array of x, y is needed")
    if ds.dtype.kind not in "iuf":
        raise InputError(f"{where}: coords holds {ds.dtype}, not integers or floats")
    rows = ds.shape[0]
    if rows > max_rows:
        raise InputError(
            f"{where}: coords has {rows} rows; {slide.name} holds at most {max_rows} tiles of this size"
        )
    if ds.id.get_create_plist().get_nfilters():  # a compressed chunk can expand ~1000x past its bound
        raise InputError(
            f"{where}: coords is compressed (TRIDENT and CLAM write it uncompressed); rewrite it without "
            "compression"
        )
    chunk_bytes = math.prod(ds.chunks) * ds.dtype.itemsize if ds.chunks else 0
    if chunk_bytes > max(1 << 20, 2 * rows * ds.dtype.itemsize):
        raise InputError(
            f"{where}: coords is stored in {chunk_bytes}-byte chunks for {rows} rows; rewrite it"
        )
    try:
        values = ds[()]  # (N, 2): bounded by the checks above
    except (OSError, ValueError, TypeError) as err:  # a damaged chunk, an unreadable dataspace
        raise InputError(f"{where}: its coords cannot be read ({err}); the file is damaged") from err
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise InputError(f"{where}: coords holds non-integral or non-finite values; pixels are integers")
    w, h = slide.dimensions
    if rows and (values.min() < 0 or values[:, 0].max() >= w or values[:, 1].max() >= h):
        raise InputError(
            f"{where}: coords reach x {values[:, 0].min():g}..{values[:, 0].max():g}, y "
            f"{values[:, 1].min():g}..{values[:, 1].max():g}; {slide.name} is {w}x{h} px (corners must lie "
            "inside it): these are another slide's coordinates"
        )
    return values.astype(np.int64)


def read_coords(path: str | Path, slide: Slide) -> CoordsFile:
    """The checked tiling of ``slide`` in a TRIDENT or CLAM coordinates ``.h5`` (module docstring)."""
    h5py = optional_import("h5py", "to read TRIDENT or CLAM coordinates (--coords)")
    path = Path(path)
    where = f"--coords {path}"
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"{where}: not a TRIDENT or CLAM coordinates .h5 ({err})") from err
    with f:
        ds = _dataset(f, h5py, where)
        attrs = _attrs(ds, where)
        described = _describe(attrs, slide, where)
        _check_made_for(attrs, slide, described.get("level"), where)
        size0 = described["size0"]
        w, h = slide.dimensions
        if not 1 <= size0 <= max(w, h):
            raise InputError(
                f"{where}: a level-0 tile side of {size0} px is not a tile of a {w}x{h}-px slide"
            )
        if size0 * MAX_UPSAMPLE < described["patch_size"]:  # e.g. millions of 1-px tiles
            raise InputError(
                f"{where}: tiles of {size0} level-0 px would each be upsampled over {MAX_UPSAMPLE}x to "
                f"{described['patch_size']:g} px; these are not this slide's coordinates"
            )
        overlap0 = round(described["overlap"] * size0 / described["patch_size"])
        has_step = "overlap" in attrs or "level0_magnification" in attrs  # TRIDENT records its step
        coords = _values(ds, slide, _max_rows(slide, size0, overlap0 if has_step else None), where)
    return CoordsFile(
        path=path,
        coords=coords,
        patch_size_level0=size0,
        patch_size=int(described["patch_size"]),
        level0_magnification=_whole(described["level0"]),
        target_magnification=_whole(described["target"]),
        overlap=described["overlap"],
        level=described.get("level"),
        legacy=described.get("legacy", {}),
    )


def _whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def coords_grid(
    slide: Slide,
    given: CoordsFile,
    tile_size: int = 224,
    mpp: float | None = None,
    mask_config: MaskConfig | None = None,
) -> TileGrid:
    """A :class:`TileGrid` of ``given`` tiles, every one kept, in their order, read as the source tool
    reads them; ``mpp`` (the user's --mpp/--mag, if any) must agree with the file."""
    where = f"--coords {given.path}"
    size0 = given.patch_size_level0
    exact = size0 * slide.mpp / given.patch_size
    if mpp is not None and not any(math.isclose(mpp, m, rel_tol=0.02) for m in (given.target_mpp, exact)):
        raise InputError(
            f"--mpp {mpp:g} ({MPP_AT_1X / mpp:g}x) contradicts {where}, tiled at "
            f"{given.target_magnification:g}x ({given.target_mpp:g} µm/px); leave out --mpp/--mag to embed "
            "the file's tiles as they were made"
        )
    level = given.level if given.level is not None else pick_level(slide, exact)
    side = round(size0 / slide.level_downsamples[level])
    if side > MAX_TILE_SIDE:
        raise InputError(
            f"{where}: its tiles span {side} px at level {level} (more than {MAX_TILE_SIDE}); not a tile size"
        )
    mask = tissue_mask(slide, size0, mask_config)  # for the attributes and the QC picture only
    return TileGrid(
        plan=plan_tiles(slide, given.coords, size0, tile_size, level=level, fill=BLACK),
        mpp=given.target_mpp,
        tile_size=int(tile_size),
        patch_size_level0=int(size0),
        slide_mpp=slide.mpp,
        tissue=mask.fraction(given.coords, size0),
        mask=mask,
        level0_magnification=given.level0_magnification,
        target_magnification=given.target_magnification,
        patch_size=given.patch_size,
        overlap=given.overlap,
        legacy=given.legacy,
    )


def coords_tiling(
    slide: Slide, source: str | Path, tile_size: int = 224, mpp: float | None = None, key: str | None = None
) -> TileGrid:
    """The tiles of ``slide`` in ``--coords`` ``source`` (a file, or the folder TRIDENT or CLAM wrote; its
    file for the slide's ``key``, default its name)."""
    return coords_grid(slide, read_coords(coords_file(source, key or slide.name), slide), tile_size, mpp)
