"""Locks under the faults of shared filesystems and races between runs: a read error is not a takeover, a
live lock set aside by a run checking another is never deleted, only the pid of a holder on this very host
is asked, and the temporary files of holders proven gone are removed by whoever takes their slide over."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virchow_rt.slides import locks


def wait_for(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def write_lock(path: Path, age_s: float = 0.0, **record: object) -> Path:
    """A lock file (or a set-aside one) as another run wrote it, last renewed ``age_s`` ago."""
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": 0.0, "lease_s": 60, "run": "r",
                                **record}))  # fmt: skip
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_a_lock_of_another_host_sharing_this_boot_id_is_judged_by_its_lease_not_its_pid(
    tmp_path: Path,
) -> None:
    """A cloned VM shares the boot id and the PID namespace's inode, not the host name: its pid means nothing
    here, so a pid that is not running here does not make its lock stale."""
    probe = tmp_path / "probe.h5"
    lease, _ = locks.acquire(probe, print)
    mine = json.loads(locks.lock_path(probe).read_text())
    lease.release()
    if not mine["boot_id"]:
        pytest.skip("no boot id on this platform")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip
    out = tmp_path / "a.h5"
    write_lock(locks.lock_path(out), host=f"{socket.gethostname()}-clone", pid=dead, token="clone",
               boot_id=mine["boot_id"], pid_ns=mine["pid_ns"], lease_s=300)  # fmt: skip
    warned: list[str] = []
    taken, holder = locks.acquire(out, warned.append)
    assert taken is None and holder is not None and holder.token == "clone" and not warned


def test_a_read_error_of_its_own_lock_does_not_make_a_live_holder_drop_its_slide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS answers EIO or ESTALE at times: "cannot read" is not "another run's"; the holder reads again."""
    out = tmp_path / "a.h5"
    lease, _ = locks.acquire(out, print, lease_s=0.6)  # renewed every 0.2 s
    path = locks.lock_path(out)
    errors = {"left": 0}
    real_open = open

    def flaky_open(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - open's signature
        if Path(file) == path and errors["left"] > 0:
            errors["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(locks, "open", flaky_open, raising=False)
    old = time.time() - 100
    os.utime(path, (old, old))
    errors["left"] = 7  # more than one renewal's reads: the next renewal tries again
    wait_for(lambda: lease.lost or path.stat().st_mtime > old, "a renewal after the read errors")
    assert errors["left"] == 0 and not lease.lost
    lease.check()  # still ours

    errors["left"] = 10**6  # the lock cannot be read at all now: the slide is not written, nor given up
    with pytest.raises(locks.LeaseLost, match=r"cannot read the lock .*\.a\.h5\.lock to confirm"):
        lease.check()
    assert not lease.lost
    errors["left"] = 0
    lease.release()
    assert not path.exists()  # its own lock, removed on the way out


def test_a_live_lock_set_aside_and_beaten_to_its_place_is_kept_and_its_holder_told_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B judged a stale lock; A takes it over first; B sets A's live lock aside, sees it is not the one it
    judged, and before B puts it back C creates a lock. A's lock must not be deleted: A learns from it."""
    out = tmp_path / "a.h5"
    path = write_lock(locks.lock_path(out), age_s=3600, token="stale")
    real_rename, real_link = Path.rename, os.link
    first: list[locks.Lease | None] = []

    def rename(self: Path, target):  # noqa: ANN001, ANN202 - Path.rename's signature
        if self == path and not first:  # B is about to set the stale lock aside: A takes it over first
            first.append(None)
            first[0] = locks.acquire(out, print)[0]
        return real_rename(self, target)

    def link(src, dst):  # noqa: ANN001, ANN202 - os.link's signature
        if Path(dst) == path and not path.exists():  # B puts A's lock back: C's lock got there first
            write_lock(path, host="node-18", lease_s=300, token="c")
        return real_link(src, dst)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    taken, holder = locks.acquire(out, print)  # B
    a = first[0]
    assert a is not None and taken is None and holder is not None and holder.token == "c"
    kept = list(tmp_path.glob(".a.h5.lock.stale-*"))
    assert [locks.Holder.read(p).token for p in kept] == [a.token]  # A's lock, set aside, not deleted
    with pytest.raises(locks.LeaseLost, match="set its lock aside .* a third run took the slide"):
        a.check()
    a.release()  # removes its own set-aside lock, and nothing of C's
    assert [p.name for p in tmp_path.glob(".*")] == [".a.h5.lock"]
    assert locks.Holder.read(path).token == "c"


def leftovers(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Slide a.h5: a lock whose lease ran out (on another host) with its holder's temporary file; a lock set
    aside by a run that died, stale too, with its holder's; a live holder's set-aside lock and its file."""
    out = tmp_path / "a.h5"
    lock = locks.lock_path(out)
    files = {
        "stale lock": write_lock(lock, age_s=61, token="t1", boot_id="another-kernel"),
        "stale aside": write_lock(lock.with_name(f"{lock.name}.stale-{'0' * 32}"), age_s=3600, token="t0"),
        "live aside": write_lock(lock.with_name(f"{lock.name}.release-{'2' * 32}"), lease_s=300, token="t2"),
    }
    for token in ("t0", "t1", "t2"):
        files[token] = locks.partial_path(out, token)
        files[token].write_bytes(b"half-written")
    files["other slide"] = locks.partial_path(tmp_path / "b.h5", "t1")
    files["other slide"].write_bytes(b"another slide's")
    return out, files


def test_the_run_taking_a_slide_over_removes_the_temporary_files_of_holders_proven_gone(
    tmp_path: Path,
) -> None:
    out, files = leftovers(tmp_path)
    warned: list[str] = []
    lease, _ = locks.acquire(out, warned.append)
    assert lease is not None and "past its 60 s lease" in warned[-1] and ".a.h5.t1.partial" in warned[-1]
    gone = {"stale aside", "t0", "t1"}
    assert {name for name, path in files.items() if not path.exists()} == gone
    lease.release()


def test_clear_stale_locks_removes_stale_locks_and_their_holders_temporary_files(tmp_path: Path) -> None:
    out, files = leftovers(tmp_path)
    live = write_lock(locks.lock_path(tmp_path / "c.h5"), lease_s=300, token="t3")
    live_partial = locks.partial_path(tmp_path / "c.h5", "t3")
    live_partial.write_bytes(b"in progress")
    orphan = write_lock(
        tmp_path / f".d.h5.lock.stale-{'4' * 32}", age_s=3600, token="t4"
    )  # no lock of d.h5 now
    orphan_partial = locks.partial_path(tmp_path / "d.h5", "t4")
    orphan_partial.write_bytes(b"half-written")
    (tmp_path / "run_config.json").write_text("{}")  # an --out of virchow-rt slides
    removed, kept = locks.clear_stale_locks(tmp_path)
    assert [p for p, _ in kept] == [live]
    assert sorted(p.name for p, _, _ in removed) == sorted(
        p.name
        for p in (
            files["stale lock"],
            files["stale aside"],
            files["t0"],
            files["t1"],
            orphan,
            orphan_partial,
        )  # fmt: skip
    )
    assert all(not p.exists() for p, _, _ in removed)
    assert files["live aside"].exists() and files["t2"].exists() and files["other slide"].exists()
    assert live.exists() and live_partial.exists()
