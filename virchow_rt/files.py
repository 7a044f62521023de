"""Generic file I/O every writer shares: hashes, output checks, atomic (and durable) writes, file locks.

Imports only the standard library. Formats live elsewhere (``manifest.json``: :mod:`virchow_rt.contract`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from virchow_rt.errors import OutputError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed (multi-GB weights and engines are fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: suffixes that name a file: refused where a folder is asked for (``--out one.h5`` is a mistake)
FILE_SUFFIXES = (".h5", ".npy", ".json", ".pt", ".onnx", ".engine", ".plan", ".csv", ".txt", ".png")


def check_output(path: str | os.PathLike, option: str, folder: bool) -> Path:
    """Check, before any work, that an output can be written at ``path``; create nothing.

    ``folder``: ``path`` is an output folder (it may exist as a folder; a file-like name is refused), else
    an output file (its folder may not exist yet). The nearest existing folder must take a new file.
    Raises :class:`OutputError` naming ``option``, the path, the problem and the fix.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(
            f"{option} {path} is a file, not a folder; give a folder name (it is created if needed)"
        )
    if folder and not path.exists() and path.suffix.lower() in FILE_SUFFIXES:
        raise OutputError(
            f"{option} {path} names a file ({path.suffix}), but {option} is a folder; give a folder name, "
            f"e.g. {option} {path.with_suffix('')}"
        )
    if not folder and path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name inside it")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{option} {path}: {existing} is a file, so nothing can be written under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".virchow-rt-write-test.", dir=existing)
    except OSError as err:
        raise OutputError(
            f"{option} {path}: cannot write in {existing} ({err.strerror}); choose a folder you can write to"
        ) from err
    os.close(fd)
    os.unlink(probe)
    return path


def read_limited(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), refused above ``limit`` bytes.

    Checked on the open file before anything is read, and opened without blocking: a FIFO, a device
    (``/dev/zero``) or a folder under that name is a :class:`ValueError` saying what it is, at once and
    without reading it. Other failures to open are the usual :class:`OSError`.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file (a folder, pipe or device)")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes, far more than it should hold")
    return data


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    A crash or an error leaves no half-written file that looks complete. ``durable``: also survive a power
    cut: the file's data reach the disk before the rename, and the rename itself (the folder) after it;
    without it, a file system may commit the rename first and leave ``final`` empty.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file owner-only (0600); give the result the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~current_umask())
        if durable:
            fsync_path(tmp_path)
        os.replace(tmp_path, final)
        if durable:
            fsync_path(final.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data to the disk (a folder's data: the names in it, such as a rename).

    A folder that cannot be opened or flushed (Windows opens no folder; some file systems refuse fsync on
    one) is left as it is: the rename is then as durable as that platform makes it, the file's data are.
    """
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (POSIX ``flock``; nothing where it is missing).

    For read-merge-write updates of a file that several processes share (the TensorRT timing cache).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the write itself stays atomic
        yield
        return
    lock = Path(f"{os.fspath(path)}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created, removed on exit), or fail at once.

    Non-blocking: when another process (or another open of it in this one) holds the lock, raise
    :class:`OutputError` with the one line ``busy``. For a whole run that owns a folder (an export). Where
    ``flock`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    path = Path(path)
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder before us may have removed the file after we opened it: then ours is a stale one
            held = os.path.lexists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino
        except BlockingIOError:
            held = False
        if not held:
            raise OutputError(busy)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held: whoever opens it next makes a new one
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    """A read-only descriptor of the lock file ``path`` (flock needs no write access), created if missing.

    Never follows a symbolic link (nor touches its target), never blocks (a FIFO), and refuses anything but
    a regular file; each problem is an :class:`OutputError` naming the file and the fix.
    """
    flags = os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fix = "delete it if no run is using it, or write elsewhere"
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        reason = "a symbolic link" if err.errno == errno.ELOOP else err.strerror
        raise OutputError(f"cannot use the lock file {path} ({reason}): {fix}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"cannot use the lock file {path} (not a regular file: a pipe or device): {fix}")
    return fd


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status).

    ``os.umask`` can only be read by setting it, which races with threads creating files meanwhile.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(umask)
    return umask


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """Write JSON atomically and durably (temporary file, fsync, rename, fsync of the folder).

    Manifests, summaries and state files are small and say what a run finished: a power cut must leave
    either the old file or the new one, never an empty one.
    """
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=False) + "\n")


def append_json_line(path: str | os.PathLike, data: Any) -> None:
    """Append ``data`` as one JSON line to ``path`` in a single write, flushed to the OS at once.

    For results kept as they are measured: a process killed later leaves every line written before.
    """
    line = json.dumps(data, separators=(",", ":")) + "\n"
    with open(path, "a") as fh:
        fh.write(line)


def read_json_lines(path: str | os.PathLike) -> list[Any]:
    """Every whole line of a JSON-lines file (none when there is no file).

    A last line without its newline (its writer killed mid-write) is left out; any other line that is not
    JSON is an error naming the file and the line (:func:`salvage_json_lines` skips such lines instead).
    """
    found, bad = salvage_json_lines(path)
    if bad:
        number, err = bad[0]
        raise ValueError(f"{path}, line {number}: not JSON ({err}); the file is damaged")
    return found


def salvage_json_lines(path: str | os.PathLike) -> tuple[list[Any], list[tuple[int, str]]]:
    """Every whole line of a JSON-lines file that is JSON, and ``(line number, why)`` of each one skipped.

    For reading what a process has kept so far: one damaged line must not lose the lines around it. A last
    line without its newline (its writer killed mid-write, or still writing) is left out, not counted.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return [], []
    lines = text.split("\n")[:-1]  # the part after the last newline is unfinished (or empty)
    found, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError as err:
            bad.append((number, str(err)))
    return found, bad
