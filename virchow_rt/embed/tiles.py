"""Tile input: .npy arrays, image files and folders of images, read in batches of uint8 (B, S, S, 3).

:func:`open_tiles` checks every input when it is opened (file exists, array dtype/rank/channels,
image header), so that a wrong input fails before a model is loaded. Image pixels are decoded while
iterating (in the :class:`~virchow_rt.embed.Embedder`'s reader thread); an image that turns out to be
corrupt or truncated then raises :class:`~virchow_rt.errors.InputError` naming it, or with
``skip_errors`` is left out and listed in :attr:`TileSource.skipped`. Tiles that are not S px are
resized with timm's eval geometry (:func:`virchow_rt.kernels.resize.resize_tile`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from virchow_rt.contract import check_tile_array
from virchow_rt.errors import InputError
from virchow_rt.kernels.resize import resize_tiles

DEFAULT_BATCH = 32
Resize = Callable[[np.ndarray], np.ndarray]  # uint8 (B, H, W, 3) -> uint8 (B, S, S, 3)
# what Pillow raises for files it cannot identify or decode (DecompressionBombError: absurdly large images)
_IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


@dataclass
class _Entry:
    """One input: a (memory-mapped) .npy array of tiles, or one image file (one tile)."""

    path: Path
    array: np.ndarray | None = None  # (N, H, W, 3) uint8 for .npy entries; None for an image file

    @property
    def count(self) -> int:
        return 1 if self.array is None else int(self.array.shape[0])


def _open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(
            f"{path} is not a readable .npy array ({err}); save tiles with np.save(path, tiles_uint8)"
        ) from err
    check_tile_array(array, str(path))
    if min(array.shape[1:3]) < 1:
        raise InputError(f"{path} has shape {array.shape}; tiles need at least 1x1 pixels")
    return array


def _check_image(path: Path) -> None:
    """Read the image header only (cheap); the pixels are decoded later, while iterating."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header parse is the check
    except _IMAGE_ERRORS as err:
        raise InputError(
            f"{path} is not an image Pillow can read ({type(err).__name__}: {err}); "
            "pass PNG/JPEG/TIFF tiles or .npy arrays, or use --skip-errors to skip it"
        ) from err


def _decode(path: Path) -> tuple[np.ndarray, str]:
    """The image's pixels as uint8 (H, W, 3) RGB, and the mode it was stored in ("RGB", "L", "RGBA", ...)."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            rgb = image.convert("RGB")  # decodes all pixels: a truncated file fails here
    except _IMAGE_ERRORS as err:
        raise InputError(
            f"cannot decode {path} ({type(err).__name__}: {err}); the file is corrupt or truncated: "
            "re-export it, or use --skip-errors to skip it"
        ) from err
    return np.asarray(rgb), mode  # (H, W, 3) uint8


def plural(count: int, noun: str) -> str:
    """``1 file``, ``2 files``, ``2 entries``."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


class TileSource:
    """Tiles from .npy arrays and image files, yielded in batches of C-contiguous uint8 (B, S, S, 3).

    ``len()`` is the number of tiles; with ``skip_errors`` an image that fails to decode while iterating
    is left out, so ``len()``, :attr:`names` and :attr:`skipped` are final once iteration has finished.
    """

    def __init__(
        self,
        entries: list[_Entry],
        tile_size: int = 224,
        skip_errors: bool = False,
        skipped: list[tuple[str, str]] | None = None,
        ignored: list[str] | None = None,
    ) -> None:
        self._entries = entries
        self.tile_size = int(tile_size)
        self.skip_errors = skip_errors
        #: (name, reason) of every input left out (only with skip_errors)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        #: files of a folder that are not tiles by their suffix (notes.txt, a .csv of labels), not read
        self.ignored: list[str] = list(ignored or [])
        self._failed: set[int] = set()  # entry indices whose image failed to decode
        #: (name, what was done) for every input that was not square RGB: an image stored as grayscale,
        #: RGBA or a palette is converted to RGB (alpha dropped), a non-square tile is resized on its
        #: shorter side and center-cropped, as timm's transform does; filled while iterating
        self.converted: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return sum(e.count for i, e in enumerate(self._entries) if i not in self._failed)

    @property
    def names(self) -> list[str]:
        """One name per tile, in order: ``file.npy[i]`` for array rows, the file path for images."""
        out: list[str] = []
        for i, entry in enumerate(self._entries):
            if i in self._failed:
                continue
            if entry.array is None:
                out.append(str(entry.path))
            else:
                out.extend(f"{entry.path}[{row}]" for row in range(entry.count))
        return out

    @property
    def sources(self) -> list[dict]:
        """Provenance, compact: each input file with the output rows ``[start, stop)`` it filled."""
        out, row = [], 0
        for i, entry in enumerate(self._entries):
            if i in self._failed:
                continue
            kind = "image" if entry.array is None else "npy"
            out.append({"path": str(entry.path), "kind": kind, "rows": [row, row + entry.count]})
            row += entry.count
        return out

    def _chunks(self, batch_size: int, resize: Resize | None) -> Iterator[np.ndarray]:
        """Arrays of at most ``batch_size`` tiles (N, S, S, 3), in input order, each a new array."""
        size = self.tile_size

        def prepare(rows: np.ndarray) -> np.ndarray:
            if resize is not None:
                return resize(rows)
            # copy S×S rows now: disk reads of a memory map happen in this (reader) thread
            return resize_tiles(rows, size) if rows.shape[1:3] != (size, size) else np.array(rows, order="C")

        for i, entry in enumerate(self._entries):
            if entry.array is None:
                try:
                    tile, mode = _decode(entry.path)
                except InputError as err:
                    if not self.skip_errors:
                        raise
                    self._failed.add(i)
                    self.skipped.append((str(entry.path), _reason(err)))
                    continue
                self._note_conversion(str(entry.path), tile.shape, mode)
                yield prepare(tile[None])  # (1, S, S, 3)
                continue
            self._note_conversion(str(entry.path), entry.array.shape[1:], "RGB")
            for start in range(0, entry.count, batch_size):
                yield prepare(entry.array[start : start + batch_size])  # from a (b, H, W, 3) memory-map view

    def _note_conversion(self, name: str, shape: tuple[int, ...], mode: str) -> None:
        done = [] if mode == "RGB" else [f"{mode} converted to RGB"]
        height, width = shape[:2]
        if height != width:
            done.append(f"{width}x{height} px, not square: center-cropped to {self.tile_size} px")
        if done:
            self.converted.append((name, "; ".join(done)))

    def batches(self, batch_size: int = DEFAULT_BATCH, resize: Resize | None = None) -> Iterator[np.ndarray]:
        """Yield C-contiguous uint8 (B, S, S, 3) batches of exactly ``batch_size`` (the last may be smaller).

        Batches cross file boundaries, so many small files still make full batches. Each yielded array
        is new (not reused): a consumer may keep it. ``resize``: turns rows (b, H, W, 3) into a new
        (b, S, S, 3) array (default: :func:`~virchow_rt.kernels.resize.resize_tiles` for rows that are not
        S×S; an :class:`Embedder` passes its own, by the model's geometry, maybe on the GPU).
        """
        if batch_size < 1:
            raise InputError(f"batch size {batch_size} must be >= 1")
        pending: list[np.ndarray] = []
        filled = 0
        for chunk in self._chunks(batch_size, resize):
            while len(chunk):
                take = min(batch_size - filled, len(chunk))
                pending.append(chunk[:take])
                filled += take
                chunk = chunk[take:]
                if filled == batch_size:
                    yield _join(pending)
                    pending, filled = [], 0
        if filled:
            yield _join(pending)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches(DEFAULT_BATCH)

    def read_all(self) -> np.ndarray:
        """All tiles as one uint8 (N, S, S, 3) array (small inputs only: it is all in memory)."""
        parts = list(self.batches(max(1, min(len(self), 4096))))
        if not parts:
            return np.empty((0, self.tile_size, self.tile_size, 3), np.uint8)
        return np.concatenate(parts)


def _reason(err: InputError) -> str:
    cause = err.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0])
    return np.concatenate(parts)  # (B, S, S, 3), a new contiguous array


#: what a folder's files must end in to be read as tiles (anything else is ignored and counted)
TILE_SUFFIXES = (".npy", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def _expand(
    path: Path, skip_errors: bool, skipped: list[tuple[str, str]], ignored: list[str], recursive: bool = False
) -> list[_Entry]:
    """Entries for one input path: a .npy, an image, or a folder of those (sorted; its sub-folders too
    with ``recursive``). A folder's files of other suffixes are not tiles: they go to ``ignored``."""
    if path.is_dir():
        # hidden files (.DS_Store, ._x) are never tiles
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        files = [p for p in children if p.is_file() and p.suffix.lower() in TILE_SUFFIXES]
        ignored += [str(p) for p in children if p.is_file() and p.suffix.lower() not in TILE_SUFFIXES]
        folders = [p for p in children if p.is_dir()] if recursive else []
        entries: list[_Entry] = []
        for item in [*files, *folders]:
            entries.extend(_expand(item, skip_errors, skipped, ignored, recursive))
        if not files and not folders:
            others = f" (not tiles: {plural(len(children), 'entry')})" if children else ""
            hint = "; pass --recursive to read its sub-folders" if any(p.is_dir() for p in children) else ""
            raise InputError(
                f"folder {path} has no files of tiles{others}: put .npy arrays or "
                f"{'/'.join(s[1:].upper() for s in TILE_SUFFIXES[1:])} tiles in it{hint}"
            )
        return entries
    if not path.exists():
        raise InputError(f"{path} does not exist; pass .npy arrays, image files or folders of images")
    try:
        if path.suffix.lower() == ".npy":
            return [_Entry(path, _open_npy(path))]
        _check_image(path)
    except InputError as err:
        if not skip_errors:
            raise
        skipped.append((str(path), _reason(err)))
        return []
    return [_Entry(path)]


def open_tiles(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tile_size: int = 224,
    skip_errors: bool = False,
    recursive: bool = False,
) -> TileSource:
    """Open .npy uint8 (N, H, W, 3) arrays (memory-mapped), image files and folders of images as one source.

    Inputs are checked now: a missing path, a folder without tiles, a wrong array dtype/rank/channels or a
    file that is not an image raises :class:`InputError` naming it and the fix (with ``skip_errors``,
    unreadable image files are skipped and listed in ``.skipped`` instead). A folder's files whose suffix is
    not a tile's (:data:`TILE_SUFFIXES`) are ignored and listed in ``.ignored``; ``recursive`` reads its
    sub-folders too (a TCGA/GDC download keeps each case in its own). Zero tiles in total is an error.
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise InputError("no tile inputs given; pass .npy arrays, image files or folders of images")
    skipped: list[tuple[str, str]] = []
    ignored: list[str] = []
    entries: list[_Entry] = []
    for item in inputs:
        entries.extend(_expand(Path(item), skip_errors, skipped, ignored, recursive))
    source = TileSource(
        entries, tile_size=tile_size, skip_errors=skip_errors, skipped=skipped, ignored=ignored
    )
    if len(source) == 0:
        detail = f" ({plural(len(skipped), 'unreadable file')} skipped)" if skipped else ""
        detail += f" ({plural(len(ignored), 'file')} ignored: not tiles)" if ignored else ""
        raise InputError(
            f"no tiles to embed in {', '.join(map(str, inputs))}{detail}; "
            "pass non-empty (N, H, W, 3) arrays or images"
        )
    return source
