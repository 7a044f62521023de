"""``--cache-dir``: the next slides copied to a local folder ahead of use, read there, removed when done.

Slides on network storage are read many times over (thumbnail, mask, every tile, by several workers);
a local copy made in the background while the model runs the slides before it turns those reads local.
A thread copies the slides in the order of the run, at most ``ahead`` of them beyond the oldest copy still
in use and, with ``size``, at most that many bytes at once (default: the disk's free space, less
:data:`RESERVE_BYTES`). A slide that does not fit, or whose copy fails, is read in place: the first such
slide gets one warning naming the reason. Multi-file formats come whole: an MRXS with its folder of the
same name, a DICOM series (every ``.dcm`` file of its folder), a Hamamatsu VMS/VMU with the files it names.

Nothing is copied for a slide the job will skip (its file already complete). Every copy lives in a folder
of this run's inside ``DIR`` (``virchow-rt-<pid>-<id>``); a copy is removed when its slide is released, and
:meth:`SlideCache.close` (also on Ctrl-C) removes all that is left, that folder, and ``DIR`` itself when
this run made it and it is empty. Nothing the run did not create is deleted. A run killed with SIGKILL
cannot clean up: its folder stays and may be removed by hand.
"""

from __future__ import annotations

import configparser
import errno
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from virchow_rt.errors import InputError

#: free space kept on the cache's disk when no ``--cache-size`` is given
RESERVE_BYTES = 1 << 30
#: bytes copied per call, between checks for a stop (Ctrl-C)
CHUNK_BYTES = 64 << 20

Warn = Callable[[str], None]


class _Stopped(Exception):
    """The cache was closed while a copy was being made."""


@dataclass
class _Entry:
    files: list[tuple[Path, Path]]  # (source file, its place relative to the copy's folder)
    read: Path  # the slide file relative to the copy's folder
    size: int
    copy: Path | None = None  # the copy of the slide file, once made
    note: str | None = None  # why it is read in place
    decided: bool = False
    released: bool = False
    folder: Path | None = None  # the copy's folder (this run's)
    extra: list[Path] = field(default_factory=list)


def slide_files(path: Path) -> tuple[list[tuple[Path, Path]], Path]:
    """The files a reader opens for the slide ``path``: [(source, place in the copy)], and the slide's place.

    An MRXS brings its folder of the same name, a ``.dcm`` file every ``.dcm`` of its folder (the series),
    a ``.vms``/``.vmu`` the files it names (inside its folder only); any other format is one file.
    """
    suffix = path.suffix.lower()
    if suffix == ".mrxs":
        data = path.with_suffix("")
        extra = sorted(f for f in data.rglob("*") if f.is_file()) if data.is_dir() else []
        return [(path, Path(path.name)), *((f, f.relative_to(path.parent)) for f in extra)], Path(path.name)
    if suffix == ".dcm":
        series = path.parent
        files = sorted(f for f in series.iterdir() if f.is_file() and f.suffix.lower() == ".dcm")
        return [(f, Path(series.name) / f.name) for f in files], Path(series.name) / path.name
    if suffix in (".vms", ".vmu"):
        return [(path, Path(path.name)), *((f, Path(f.name)) for f in _vms_files(path))], Path(path.name)
    return [(path, Path(path.name))], Path(path.name)


def _vms_files(path: Path) -> list[Path]:
    """The image, map and optimisation files a Hamamatsu VMS/VMU key file names, inside its folder."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(path.read_text(errors="replace"))
    except (OSError, configparser.Error):
        return []  # not readable as a key file: the reader says what is wrong
    named = []
    for section in parser.sections():
        for key, value in parser.items(section):
            if key.lower().startswith(("imagefile", "mapfile", "optimisationfile")) and value.strip():
                target = (path.parent / value.strip()).resolve()
                if target.parent == path.parent.resolve() and target.is_file():  # never outside its folder
                    named.append(target)
    return sorted(set(named))


class SlideCache:
    """Local copies of ``paths`` made ahead in a background thread (see the module docstring).

    ``skip(path)``: True for a slide that needs no copy (its output is complete). Call :meth:`local` for
    the path to read (it waits for that slide's copy), :meth:`release` once the slide is done, and
    :meth:`close` at the end (or use ``with``).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        paths: Sequence[Path],
        *,
        size: int | None = None,
        ahead: int = 2,
        skip: Callable[[Path], bool] = lambda path: False,
    ) -> None:
        root = Path(folder)
        if root.exists() and not root.is_dir():
            raise InputError(f"--cache-dir {root} is a file; give a folder (it is made if missing)")
        missing = [p for p in (root, *root.parents) if not p.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.dir = root / f"virchow-rt-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.dir.mkdir()
        except OSError as err:
            raise InputError(
                f"--cache-dir {root} cannot be used ({err}); give a writable local folder"
            ) from err
        self._made = missing  # folders this run made (deepest first): removed at close when empty
        self.paths, self.size, self.ahead, self.skip = list(paths), size, max(1, ahead), skip
        self._entries: dict[Path, _Entry] = {}
        self._used = 0  # bytes of the copies in the cache
        self._warned = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="virchow-rt-cache", daemon=True)
        self._thread.start()

    # --- the copying thread --------------------------------------------------------------------------
    def _work(self) -> None:
        for index, path in enumerate(self.paths):
            if self._stop.is_set():
                return
            try:
                self._copy(index, path)
            except _Stopped:
                return
            except Exception as err:  # noqa: BLE001 - this slide is read in place; the run goes on
                self._decide(path, note=f"copying it failed ({type(err).__name__}: {err})")

    def _copy(self, index: int, path: Path) -> None:
        if self.skip(path):
            self._decide(path, note=None)  # the job skips it: nothing to copy, nothing to say
            return
        files, read = slide_files(path)
        size = sum(src.stat().st_size for src, _ in files)
        entry = _Entry(files, read, size)
        with self._cond:
            if self._entries.setdefault(path, entry) is not entry:  # released before its turn
                self._decide(path, note=None)
                return
            if self.size is not None and size > self.size:
                self._decide(path, note=f"it is larger ({_gib(size)}) than --cache-size ({_gib(self.size)})")
                return
            # wait for room: at most `ahead` copies beyond the oldest slide still in use, `size` bytes
            while not self._stop.is_set() and not self._room(index, size):
                self._cond.wait(0.5)
            if self._stop.is_set():
                raise _Stopped
            if entry.released:  # the run is done with it already (it failed, or was stopped)
                self._decide(path, note=None)
                return
        free = shutil.disk_usage(self.dir).free
        if self.size is None and size > free - RESERVE_BYTES:
            self._decide(path, note=f"its disk has {_gib(free)} free, too little for {_gib(size)}")
            return
        target = self.dir / f"{index:06d}"
        entry.folder = target
        with self._cond:
            self._used += size  # counted while copying: the bytes are being written
        try:
            for src, rel in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                _copy_file(src, target / rel, self._stop)
        except BaseException as err:
            shutil.rmtree(target, ignore_errors=True)  # ours: made just above
            with self._cond:
                self._used -= size
                entry.folder = None
            if isinstance(err, _Stopped) or self._stop.is_set():
                raise _Stopped from None
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                self._decide(path, note=f"its disk ran out of space copying {_gib(size)}")
                return
            raise
        with self._cond:
            if entry.released:  # released while it was being copied: nobody will read it
                entry.folder = None
                self._used -= size
                shutil.rmtree(target, ignore_errors=True)  # ours
            else:
                entry.copy = target / read
        self._decide(path, note=None)

    def _room(self, index: int, size: int) -> bool:
        oldest = next((i for i, p in enumerate(self.paths) if not self._done(p)), len(self.paths))
        if index >= oldest + self.ahead:
            return False
        return self.size is None or self._used + size <= self.size or self._used == 0

    def _done(self, path: Path) -> bool:
        entry = self._entries.get(path)
        return entry is not None and entry.released

    def _decide(self, path: Path, note: str | None) -> None:
        with self._cond:
            entry = self._entries.setdefault(path, _Entry([], Path(path.name), 0))
            entry.note, entry.decided = note, True
            self._cond.notify_all()

    # --- the run's side ---------------------------------------------------------------------------------
    def local(self, path: Path, warn: Warn) -> Path | None:
        """The copy of ``path`` to read once it is made, or None: read it in place (the first such slide
        with a reason gets ``warn``'s one line)."""
        with self._cond:
            while True:
                entry = self._entries.get(path)
                if entry is not None and entry.decided:
                    break
                if self._stop.is_set() or not self._thread.is_alive() or path not in self.paths:
                    return None
                self._cond.wait(0.5)
            if entry.note is not None and not self._warned:
                self._warned = True
                warn(
                    f"{path.name}: --cache-dir: reading it in place, not from a copy: {entry.note} (later "
                    "slides that cannot be copied are read in place without a warning)"
                )
            return entry.copy

    def release(self, path: Path) -> None:
        """The run is done with ``path``: remove its copy (files a reader still has open go with their
        last handle)."""
        with self._cond:
            entry = self._entries.setdefault(path, _Entry([], Path(path.name), 0))
            if entry.released:
                return
            entry.released = True
            self._cond.notify_all()
            if not entry.decided:  # still being copied (or not yet): the copying thread removes it
                return
            folder, entry.folder, entry.copy = entry.folder, None, None
            if folder is not None:
                self._used -= entry.size
            self._cond.notify_all()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # ours: this run made it

    def stop(self) -> None:
        """Copy nothing more; a slide waiting for its copy is read in place (the run is stopping)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop copying and remove every copy, this run's folder, and the folders this run made (if empty)."""
        self.stop()
        self._thread.join()
        shutil.rmtree(self.dir, ignore_errors=True)  # this run's own folder: every file in it is a copy
        for made in self._made:
            try:
                made.rmdir()  # only when empty: anything else there is not ours
            except OSError:
                break

    def __enter__(self) -> SlideCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _copy_file(src: Path, dst: Path, stop: threading.Event) -> None:
    """Copy ``src`` to the new file ``dst`` in chunks (in the kernel where it can), checking ``stop``."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        kernel = hasattr(os, "sendfile")
        while offset < size:
            if stop.is_set():
                raise _Stopped
            count = min(CHUNK_BYTES, size - offset)
            if kernel:
                try:
                    sent = os.sendfile(fout.fileno(), fin.fileno(), offset, count)
                except OSError as err:
                    if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                        raise
                    kernel = False  # this filesystem pair cannot: copy through memory instead
                    continue
            else:
                fin.seek(offset)
                sent = fout.write(fin.read(count))
            if sent == 0:
                break  # the source shrank while being copied: the reader will say what is wrong
            offset += sent


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"
