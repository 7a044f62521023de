"""Per-slide locks with leases, so that runs sharing one output folder never write the same slide.

``<out>/.<slide>.h5.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+, unlike
``flock``, which network filesystems may not honour). It records who took it (host, pid, the machine's boot
id and the PID namespace, start time), its lease and a token unique to this taking. The holder renews the
lease from a thread, touching the file every third of the lease (:class:`Lease`); a lock not renewed within
its lease is stale, whatever host judges it. A lock taken on this machine, in this PID namespace, whose
process is gone is stale at once (a container sharing the host name but not the PID namespace cannot ask).

A stale lock is taken over in three steps: renamed aside (atomic: of two runs taking it over, one wins),
verified to be the very lock that was judged stale (another run may have replaced it in between; if so it
is put back and the slide left to that run), then created anew. A holder whose lock was taken over while it
was stopped learns it at its next renewal or :meth:`Lease.check`, and abandons the slide without touching
the other run's files. No run removes a lock it did not judge stale or take itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from virchow_rt.errors import VirchowError

#: seconds a lock lasts without renewal (``--lock-lease``)
DEFAULT_LEASE_S = 300.0
#: a lock that cannot be read (its taker died between creating and writing it) is stale after this long
UNREADABLE_AFTER_S = 60.0
RUN_ID = uuid.uuid4().hex  # this process's runs, shown in lock files
_MAX_LOCK_BYTES = 4096
_HELD: dict[str, Lease] = {}  # lock path -> this process's lease on it


class LeaseLost(VirchowError):
    """Another run took this run's slide over (its lease ran out while this run was stopped)."""


def lock_path(out: Path) -> Path:
    """The lock file of output ``out`` (``<dir>/.<name>.lock``)."""
    return out.with_name(f".{out.name}.lock")


@functools.cache
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@functools.cache
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says (fields are None when the file is unreadable or half-written)."""

    host: str | None = None
    pid: int | None = None
    started: float | None = None
    run: str | None = None
    token: str | None = None
    boot_id: str | None = None
    pid_ns: str | None = None
    lease_s: float | None = None

    @classmethod
    def read(cls, path: Path) -> Holder:
        try:
            with open(path, "rb") as fh:
                data: Any = json.loads(fh.read(_MAX_LOCK_BYTES))
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        kinds = {"host": str, "pid": int, "started": (int, float), "run": str, "token": str,
                 "boot_id": str, "pid_ns": str, "lease_s": (int, float)}  # fmt: skip
        return cls(
            **{f.name: data[f.name] for f in fields(cls) if isinstance(data.get(f.name), kinds[f.name])}
        )

    def on_this_machine(self) -> bool:
        """True when the holder ran on this machine's kernel in this PID namespace: its pid can be asked."""
        return self.boot_id is not None and self.boot_id == _boot_id() and self.pid_ns == _pid_namespace()

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


def _judge(holder: Holder, age: float, lease_s: float) -> tuple[str, bool] | None:
    """(why the lock is stale, whether its holder is certainly gone), or None while it may be writing."""
    if holder.pid is not None and holder.on_this_machine() and not _alive(holder.pid):
        return f"its process is gone ({holder.describe()})", True
    if holder.pid is None:
        limit = min(UNREADABLE_AFTER_S, lease_s)
        return (f"it is unreadable and {age:.0f} s old", False) if age > limit else None
    lease = holder.lease_s or lease_s  # its holder's promise; a lock of an older version: ours
    if age > lease:
        return (
            f"it was not renewed for {_duration(age)}, past its {lease:g} s lease ({holder.describe()})",
            False,
        )
    return None


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def stale_reason(path: Path, lease_s: float = DEFAULT_LEASE_S) -> str | None:
    """Why the lock at ``path`` is stale, or None while its holder may still be writing (or it is gone)."""
    verdict = _verdict(path, lease_s)
    return verdict[1][0] if verdict is not None and verdict[1] is not None else None


def lease_left(out: Path, lease_s: float = DEFAULT_LEASE_S) -> float | None:
    """Seconds until the lock of ``out`` is stale by its lease on any host (0: it is now); None: no lock."""
    verdict = _verdict(lock_path(out), lease_s)
    if verdict is None:
        return None
    holder, stale = verdict
    if stale is not None:
        return 0.0
    try:
        age = time.time() - lock_path(out).stat().st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, (holder.lease_s or lease_s) - age)


def _verdict(path: Path, lease_s: float) -> tuple[Holder, tuple[str, bool] | None] | None:
    holder = Holder.read(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None  # released meanwhile
    return holder, _judge(holder, age, lease_s)


class Lease:
    """A lock this run holds, renewed every ``lease_s / 3`` seconds from a thread until :meth:`release`.

    ``replaced``: the stale lock this one took over (None if there was none) and ``replaced_gone``: whether
    that holder is certainly gone (its process ended on this machine), so its temporary files are garbage.
    """

    def __init__(self, out: Path, token: str, lease_s: float, replaced: Holder | None, gone: bool) -> None:
        self.out, self.path, self.token, self.lease_s = out, lock_path(out), token, lease_s
        self.replaced, self.replaced_gone = replaced, gone
        self._lost, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._renew, name="virchow-rt-lease", daemon=True)
        self._thread.start()

    def _ours(self) -> bool:
        return Holder.read(self.path).token == self.token

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            if not self._ours():
                self._lost.set()
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self._lost.set()
                return
            except OSError:
                continue  # a network filesystem's hiccup: try again at the next renewal

    @property
    def lost(self) -> bool:
        """True once this run knows another run took the slide over."""
        return self._lost.is_set()

    def _error(self) -> LeaseLost:
        other = Holder.read(self.path)
        now = f"now {other.describe()}" if other.token else "since released"
        return LeaseLost(
            f"lost its lock on {self.out.name} to another run ({now}): this run was stopped past its "
            f"{self.lease_s:g} s lease; the slide is left to that run"
        )

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the renewal thread found the lock taken over (cheap: no file read)."""
        if self._lost.is_set():
            raise self._error()

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lock file is still this lease's (reads it)."""
        if self._lost.is_set() or not self._ours():
            self._lost.set()
            raise self._error()

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours (never another run's). Safe to call twice."""
        self._stop.set()
        self._thread.join()
        _HELD.pop(str(self.path), None)
        if self._lost.is_set():
            return
        aside = self.path.with_name(f"{self.path.name}.release-{self.token}")
        try:
            self.path.rename(aside)  # then verify: another run may have replaced ours while we were stopped
        except FileNotFoundError:
            return
        if Holder.read(aside).token == self.token:
            aside.unlink(missing_ok=True)
        else:
            _put_back(aside, self.path)


def _create(path: Path, token: str, lease_s: float) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    record = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
              "pid_ns": _pid_namespace(), "started": time.time(), "lease_s": lease_s, "run": RUN_ID,
              "token": token}  # fmt: skip
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    return True


def _put_back(aside: Path, path: Path) -> None:
    """Return a lock renamed aside by mistake to ``path``, unless a new lock is there by now."""
    try:
        os.link(aside, path)  # fails rather than replace a lock created meanwhile
    except FileExistsError:
        pass  # its holder finds a lock that is not its own at its next renewal, and stops
    except OSError:  # no hard links on this filesystem
        if not path.exists():
            os.replace(aside, path)
            return
    aside.unlink(missing_ok=True)


def _take_aside(path: Path, judged: Holder, lease_s: float) -> bool:
    """Remove the lock at ``path`` if it is still the one judged stale (``judged``); else put it back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        path.rename(aside)  # atomic: of two runs taking it over, one wins
    except FileNotFoundError:
        return False
    verdict = _verdict(aside, lease_s)
    if verdict is not None and verdict[0] == judged and verdict[1] is not None:
        aside.unlink(missing_ok=True)
        return True
    _put_back(aside, path)  # another run replaced it between our judgement and the rename: it is live
    return False


def acquire(
    out: Path, warn: Callable[[str], None], lease_s: float = DEFAULT_LEASE_S
) -> tuple[Lease | None, Holder | None]:
    """Take the lock of ``out``: (its :class:`Lease`, None), or (None, holder) while a live run has it."""
    path = lock_path(out)
    replaced, gone = None, False
    for _ in range(3):  # a lock released or taken over by another run between our steps: look again
        token = uuid.uuid4().hex
        if _create(path, token, lease_s):
            lease = _HELD[str(path)] = Lease(out, token, lease_s, replaced, gone)
            return lease, None
        verdict = _verdict(path, lease_s)
        if verdict is None:
            continue
        holder, stale = verdict
        if stale is None:
            return None, holder
        if _take_aside(path, holder, lease_s):
            warn(f"taking over the lock of {out.name}: {stale[0]}")
            replaced, gone = holder, stale[1]
    return None, Holder.read(path)


def release(out: Path) -> None:
    """Release this process's lock of ``out``, if it holds one (never another run's)."""
    lease = _HELD.get(str(lock_path(out)))
    if lease is not None:
        lease.release()


@contextlib.contextmanager
def held(
    out: Path, warn: Callable[[str], None], lease_s: float = DEFAULT_LEASE_S
) -> Iterator[tuple[Lease | None, Holder | None]]:
    """``with held(out, warn) as (lease, other):`` this run holds the lock inside the block when ``lease`` is
    not None; else ``other`` is the live run that does."""
    lease, other = acquire(out, warn, lease_s)
    try:
        yield lease, other
    finally:
        if lease is not None:
            lease.release()


def clear_stale_locks(out_dir: Path, lease_s: float = DEFAULT_LEASE_S) -> tuple[list, list]:
    """Remove the slide locks in ``out_dir`` whose holders are gone (``--clear-stale-locks``).

    Returns (removed, kept): (path, holder, why) of each lock removed, (path, holder) of each live one kept.
    """
    removed, kept = [], []
    for path in sorted(out_dir.glob(".*.lock")):
        verdict = _verdict(path, lease_s)
        if verdict is None:
            continue
        holder, stale = verdict
        if stale is not None and _take_aside(path, holder, lease_s):
            removed.append((path, holder, stale[0]))
        elif stale is None:
            kept.append((path, holder))
    return removed, kept
