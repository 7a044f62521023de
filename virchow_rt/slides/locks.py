"""Per-slide lock files, so that runs sharing one output folder never write the same slide.

``<out>/.<slide>.h5.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+,
unlike ``flock``, which network filesystems may not honour) and holds who took it: host, pid, start
time and a run id. A run skips a slide whose lock another live run holds. A lock is *stale* when its
process is gone (same host: ``kill(pid, 0)`` says so) or it is older than ``stale_after_s`` (a job on
another host that died cannot be asked); a stale lock is taken over with a warning: it is renamed
away first (``rename`` is atomic, so of two runs taking it over only one succeeds), then created anew.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: a lock older than this is stale even when its process cannot be checked (another host)
STALE_AFTER_S = 24 * 3600.0
RUN_ID = uuid.uuid4().hex  # this process's runs; a lock records it so that only its taker releases it


def lock_path(out: Path) -> Path:
    """The lock file of output ``out`` (``<dir>/.<name>.lock``)."""
    return out.with_name(f".{out.name}.lock")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says (fields are None when the file is unreadable or half-written)."""

    host: str | None
    pid: int | None
    started: float | None
    run: str | None

    @classmethod
    def read(cls, path: Path) -> Holder:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls(None, None, None, None)
        return cls(data.get("host"), data.get("pid"), data.get("started"), data.get("run"))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        return f"host {self.host or '?'}, pid {self.pid or '?'}, since {when}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def stale_reason(path: Path, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the lock at ``path`` is stale, or None while its holder may still be writing."""
    holder = Holder.read(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None  # released meanwhile: not ours to judge
    if holder.host == socket.gethostname() and holder.pid is not None and not _alive(holder.pid):
        return f"its process is gone ({holder.describe()})"
    if age > stale_after_s:
        return f"it is {age / 3600:.1f} h old ({holder.describe()})"
    if holder.pid is None and age > 60:
        return f"it is unreadable and {age:.0f} s old"  # a taker killed between create and write
    return None


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "run": RUN_ID}, fh
        )
    return True


def acquire(
    out: Path, warn: Callable[[str], None], stale_after_s: float = STALE_AFTER_S
) -> tuple[bool, Holder | None]:
    """Take the lock of output ``out``: (True, None), or (False, holder) while a live run holds it."""
    path = lock_path(out)
    for _ in range(3):  # a lock released or taken over by another run between our steps: look again
        if _create(path):
            return True, None
        reason = stale_reason(path, stale_after_s)
        if reason is None:
            holder = Holder.read(path)
            if path.exists():
                return False, holder
            continue
        aside = path.with_name(f"{path.name}.stale-{RUN_ID}")
        try:
            path.rename(aside)  # atomic: of two runs taking it over, one wins
        except FileNotFoundError:
            continue
        aside.unlink(missing_ok=True)
        warn(f"taking over the lock of {out.name}: {reason}")
    return False, Holder.read(path)


def release(out: Path) -> None:
    """Remove the lock of ``out`` if this process took it (never another run's)."""
    path = lock_path(out)
    if Holder.read(path).run == RUN_ID:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(out: Path, warn: Callable[[str], None]) -> Iterator[Holder | None]:
    """``with held(out, warn) as other:`` other is None when this run holds the lock inside the block."""
    taken, holder = acquire(out, warn)
    try:
        yield None if taken else holder
    finally:
        if taken:
            release(out)


def clear_locks(out_dir: Path) -> list[tuple[Path, Holder]]:
    """Remove every slide lock in ``out_dir`` (``--clear-stale-locks``: no other run may be writing there);
    returns what was removed and who held it."""
    removed = [(path, Holder.read(path)) for path in sorted(out_dir.glob(".*.lock"))]
    for path, _ in removed:
        path.unlink(missing_ok=True)
    return removed
