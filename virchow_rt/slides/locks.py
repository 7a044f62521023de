"""Per-slide locks with leases, so that runs sharing one output folder never write the same slide.

``<out>/.<slide>.h5.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+, unlike
``flock``). It records who took it (host, pid, boot id, PID namespace, start time), its lease and a token
unique to this taking; the holder touches it every third of the lease (:class:`Lease`). A lock not renewed
within its lease is stale, whatever host judges it; one of this host and kernel, in this PID namespace, whose
process is gone is stale at once. A lock that cannot be read now (NFS's EIO, ESTALE) says nothing of its
holder: only its lease makes it stale, and its own holder looks again at the next renewal.

A stale lock is taken over in three steps: renamed aside (of two runs taking it over, one wins), verified
to be the very lock judged stale (else put back: another run replaced it meanwhile), then created anew.
Where a third run created a lock before the put-back, the set-aside file is kept: its holder learns from
it why it lost the slide, and removes it. A holder taken over while it was stopped learns it at its next
renewal or :meth:`Lease.check` and abandons the slide, touching nothing of the other run's. No run removes
a lock it did not judge stale or take itself; the temporary files of holders judged stale (``.partial``,
set-aside locks) are removed by whoever takes their slide over and by :func:`clear_stale_locks`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from virchow_rt.errors import InputError, VirchowError
from virchow_rt.files import read_limited

#: seconds a lock lasts without renewal (``--lock-lease``)
DEFAULT_LEASE_S = 300.0
#: bounds of ``--lock-lease``: shorter spins and risks takeovers of busy runs; longer leaves a dead host's
#: slides unreachable for over a day
MIN_LEASE_S, MAX_LEASE_S = 2.0, 86400.0
#: a lock that cannot be read (its taker died between creating and writing it) is stale after this long
UNREADABLE_AFTER_S = 60.0
RUN_ID = uuid.uuid4().hex  # this process's runs, shown in lock files
_MAX_LOCK_BYTES = 4096
_ASIDE = (".stale-", ".release-")  # a lock renamed aside: by a run taking it over, by its holder releasing it
#: the lock of a slide's ``.h5`` (``.<name>.h5.lock``) and its set-aside copies (a 32-hex-digit uuid each):
#: nothing else in ``--out`` is judged, though a slide may be named ``.x.lock.stale-1.tif``
_LOCK_NAME = re.compile(r"\.(.+\.h5)\.lock(?:\.(?:stale|release)-[0-9a-f]{32})?", re.DOTALL)
#: a token that may name a ``.partial`` file (a crafted lock's token never names a path)
_TOKEN = re.compile(r"[0-9A-Za-z_-]{1,64}")
#: ``folder.CONFIG_NAME`` (folder imports settings, which imports this module)
_CONFIG_NAME = "run_config.json"
_READ_TRIES = 5  # reads of its own lock that a holder makes over ~1.5 s while it cannot be read


class LeaseLost(VirchowError):
    """Another run took this run's slide over (or this run cannot confirm its lock is still its own)."""


def lock_path(out: Path) -> Path:
    """The lock file of output ``out`` (``<dir>/.<name>.lock``)."""
    return out.with_name(f".{out.name}.lock")


def partial_path(out: Path, token: str) -> Path:
    """The temporary file of ``out`` written under the lease ``token`` (only that lease's run makes it)."""
    return out.with_name(f".{out.name}.{token}.partial")


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
        """The holder the file at ``path`` names; every field None when it cannot be read now."""
        try:
            return cls.parse(path)
        except OSError:
            return cls()

    @classmethod
    def parse(cls, path: Path) -> Holder:
        """Like :meth:`read`, but raises the ``OSError`` of a file that cannot be read (gone, I/O error)."""
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_LOCK_BYTES)
        try:
            data: Any = json.loads(raw)
        except ValueError:  # half-written
            return cls()
        if not isinstance(data, dict):
            return cls()
        kinds = {"host": str, "pid": int, "started": (int, float), "run": str, "token": str,
                 "boot_id": str, "pid_ns": str, "lease_s": (int, float)}  # fmt: skip
        return cls(
            **{f.name: data[f.name] for f in fields(cls) if isinstance(data.get(f.name), kinds[f.name])}
        )

    def on_this_machine(self) -> bool:
        """True when the holder ran on this host and kernel, in this PID namespace: its pid can be asked."""
        kernel = self.boot_id is not None and self.boot_id == _boot_id() and self.pid_ns == _pid_namespace()
        return kernel and self.host == socket.gethostname()  # a cloned VM shares the boot id, not the host

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
    why = f"it was not renewed for {_duration(age)}, past its {lease:g} s lease ({holder.describe()})"
    return (why, False) if age > lease else None


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


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
    """(the holder, :func:`_judge`'s verdict) of the lock at ``path``, or None when it is gone."""
    try:
        holder, error = Holder.parse(path), None
    except FileNotFoundError:
        return None  # released meanwhile
    except OSError as err:
        holder, error = Holder(), err
    try:
        age = time.time() - path.stat().st_mtime
    except OSError as err:  # gone meanwhile; else nothing can be judged now: it may be writing
        return None if isinstance(err, FileNotFoundError) else (holder, None)
    if error is None:
        return holder, _judge(holder, age, lease_s)
    # a read error says nothing of the holder (a live one may be renewing it): only the lease can
    why = f"it cannot be read ({error.strerror or error}) and was not renewed for {_duration(age)}"
    return holder, ((f"{why}, past the {lease_s:g} s lease", False) if age > lease_s else None)


class Lease:
    """A lock this run holds, renewed every ``lease_s / 3`` seconds from a thread until :meth:`release`.

    ``replaced``: the stale lock this one took over (None if none) and ``replaced_gone``: whether that holder
    is certainly gone (its process ended on this machine); :func:`acquire` removed its temporary file.
    """

    def __init__(self, out: Path, token: str, lease_s: float, replaced: Holder | None, gone: bool) -> None:
        self.out, self.path, self.token, self.lease_s = out, lock_path(out), token, lease_s
        self.replaced, self.replaced_gone = replaced, gone
        self._lost, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._renew, name="virchow-rt-lease", daemon=True)
        self._thread.start()

    def _state(self) -> Literal["ours", "theirs", "unknown"]:
        """Whose the lock is, read again while it cannot be read: gone for a moment (another run renamed it
        aside to check it) or an I/O error. Gone all along: a run judged it stale; an I/O error: unknown."""
        state: Literal["theirs", "unknown"] = "unknown"
        for attempt in range(_READ_TRIES):
            try:
                holder = Holder.parse(self.path)
            except OSError as err:
                state = "theirs" if isinstance(err, FileNotFoundError) else "unknown"
            else:
                return "ours" if holder.token == self.token else "theirs"
            if self._stop.wait(0.05 * 2**attempt):
                break
        return state

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            state = self._state()
            if state == "theirs":
                self._lost.set()
                return
            if state == "ours":
                with contextlib.suppress(OSError):  # a network filesystem's hiccup: at the next renewal
                    os.utime(self.path)

    @property
    def lost(self) -> bool:
        """True once this run knows another run took the slide over."""
        return self._lost.is_set()

    def _own_asides(self) -> list[Path]:
        """This lease's lock where another run set it aside and could not put it back."""
        return [p for p in _asides(self.path) if Holder.read(p).token == self.token]

    def _error(self) -> LeaseLost:
        other = Holder.read(self.path)
        now = f"now {other.describe()}" if other.token else "since released"
        if self._own_asides():
            why = (
                "another run set its lock aside (checking the stale lock it had replaced) and a third run "
                "took the slide before it was put back"
            )
        else:
            why = f"this run was stopped, or could not renew its lock, past its {self.lease_s:g} s lease"
        return LeaseLost(
            f"lost its lock on {self.out.name} to another run ({now}): {why}; the slide is left to that run"
        )

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the renewal thread found the lock taken over (cheap: no file read)."""
        if self._lost.is_set():
            raise self._error()

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lock file is still this lease's (reads it)."""
        state = "theirs" if self._lost.is_set() else self._state()
        if state == "ours":
            return
        if state == "theirs":
            self._lost.set()
            raise self._error()
        raise LeaseLost(  # not lost: release() still removes the lock if it is ours
            f"cannot read the lock {self.path} to confirm that it is still this run's; the slide is left "
            "unwritten: rerun to resume it"
        )

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours (never another run's). Safe to call twice."""
        self._stop.set()
        self._thread.join()
        if self._lost.is_set():  # ours no more; what is left of it is a set-aside copy nobody else uses
            for aside in self._own_asides():
                aside.unlink(missing_ok=True)
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


def _asides(lock: Path) -> list[Path]:
    """The set-aside copies of ``lock`` (``<lock>.stale-*``, ``<lock>.release-*``)."""
    name = glob.escape(lock.name)
    found = (p for kind in _ASIDE for p in lock.parent.glob(f"{name}{kind}*"))
    return sorted(p for p in found if (m := _LOCK_NAME.fullmatch(p.name)) and m[1] == lock.name[1:-5])


def _create(path: Path, token: str, lease_s: float) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    record = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
              "pid_ns": _pid_namespace(), "started": time.time(), "lease_s": lease_s, "run": RUN_ID,
              "token": token}  # fmt: skip
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
    except BaseException:  # a full disk: an empty lock would block every run until its lease ran out
        path.unlink(missing_ok=True)  # ours: created exclusively a moment ago, unreadable to any other run
        raise
    return True


def _put_back(aside: Path, path: Path) -> bool:
    """Return a lock renamed aside by mistake to ``path``; True once it is back. Where a new lock is there by
    now, the aside file is kept: its holder finds it at its next renewal, stops, and removes it."""
    try:
        os.link(aside, path)  # fails rather than replace a lock created meanwhile
    except (FileExistsError, FileNotFoundError):  # a new lock there / the aside judged stale and removed
        return False
    except OSError:  # no hard links on this filesystem
        with contextlib.suppress(FileNotFoundError):
            if not path.exists():
                os.replace(aside, path)
                return True
        return False
    aside.unlink(missing_ok=True)
    return True


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


def _remove_leftovers(out: Path, gone: Holder, lease_s: float) -> list[tuple[Path, Holder]]:
    """Remove the files of ``out``'s lock holders proven gone: ``gone``'s ``.partial`` (its lock was judged
    stale and removed), set-aside locks stale themselves and their ``.partial``. Returns (path, holder)s."""
    removed: list[tuple[Path, Holder]] = []
    current = Holder.read(lock_path(out)).token
    doomed = [gone] if gone.token else []
    for aside in _asides(lock_path(out)):
        verdict = _verdict(aside, lease_s)
        # its holder stopped renewing it long ago; a file that is no lock of ours (no token) is left alone
        if verdict is not None and verdict[1] is not None and verdict[0].token:
            aside.unlink(missing_ok=True)
            removed.append((aside, verdict[0]))
            doomed.append(verdict[0])
    for holder in doomed:
        if (
            holder.token and _TOKEN.fullmatch(holder.token) and holder.token != current
        ):  # not the holder now's
            partial = partial_path(out, holder.token)
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
                removed.append((partial, holder))
    return removed


def acquire(
    out: Path, warn: Callable[[str], None], lease_s: float = DEFAULT_LEASE_S
) -> tuple[Lease | None, Holder | None]:
    """Take the lock of ``out``: (its :class:`Lease`, None), or (None, holder) while a live run has it."""
    path = lock_path(out)
    replaced, gone = None, False
    for _ in range(3):  # a lock released or taken over by another run between our steps: look again
        token = uuid.uuid4().hex
        if _create(path, token, lease_s):
            return Lease(out, token, lease_s, replaced, gone), None
        verdict = _verdict(path, lease_s)
        if verdict is None:
            continue
        holder, stale = verdict
        if stale is None:
            return None, holder
        if _take_aside(path, holder, lease_s):
            files = _remove_leftovers(out, holder, lease_s)
            also = f"; removed {', '.join(p.name for p, _ in files)}" if files else ""
            warn(f"taking over the lock of {out.name}: {stale[0]}{also}")
            replaced, gone = holder, stale[1]
    return None, Holder.read(path)


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
    """Remove the slide locks in ``out_dir`` whose holders are gone, and their temporary files
    (``--clear-stale-locks``). Returns (removed, kept): (path, holder, why) of each lock or file removed,
    (path, holder) of each live lock kept."""
    try:
        config = json.loads(read_limited(out_dir / _CONFIG_NAME, 1 << 20))
    except FileNotFoundError:  # no run claimed the folder yet (claims come before locks): nothing is ours
        return [], []
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise InputError(
            f"--clear-stale-locks: {out_dir / _CONFIG_NAME} cannot be read ({err}), so nothing in "
            f"{out_dir} is judged; give the --out folder of the runs"
        ) from err
    mirrored = isinstance(config, dict) and config.get("mirror_folders") is True
    removed, kept = [], []
    for out in _locked_outputs(out_dir, mirrored):
        path, gone = lock_path(out), Holder()
        verdict = _verdict(path, lease_s)
        if verdict is not None:
            holder, stale = verdict
            if stale is None:
                kept.append((path, holder))
            elif _take_aside(path, holder, lease_s):
                removed.append((path, holder, stale[0]))
                gone = holder
        for file, owner in _remove_leftovers(out, gone, lease_s):
            removed.append((file, owner, f"left by a run whose lock is stale ({owner.describe()})"))
    return removed, kept


def _locked_outputs(out_dir: Path, mirrored: bool) -> list[Path]:
    """The outputs in ``out_dir`` (and with ``mirrored``, its sub-folders) with a lock or a set-aside lock
    (:data:`_LOCK_NAME`)."""
    outputs = set()
    for path in out_dir.rglob(".*.lock*") if mirrored else out_dir.glob(".*.lock*"):
        match = _LOCK_NAME.fullmatch(path.name)
        if match:
            outputs.add(path.with_name(match[1]))
    return sorted(outputs)
