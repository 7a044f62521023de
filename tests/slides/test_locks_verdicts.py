"""How a lock is judged (``locks._judge``, ``locks._verdict``): written from the mutants ``mutmut`` left
alive in ``virchow_rt/slides/locks.py`` (README: Tests). Runs sharing a folder are in ``test_locks.py``,
leases in ``test_leases.py``, races in ``test_lock_races.py``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virchow_rt.slides import locks

Holder = locks.Holder


def test_an_unreadable_lock_is_stale_after_a_minute_or_its_lease_if_shorter() -> None:
    assert locks._judge(Holder(), 60.0, 300.0) is None  # its taker may still be writing it
    assert locks._judge(Holder(), 61.0, 300.0) == ("it is unreadable and 61 s old", False)
    assert locks._judge(Holder(), 30.0, 30.0) is None
    assert locks._judge(Holder(), 31.0, 30.0) == ("it is unreadable and 31 s old", False)


def test_a_lock_of_another_host_is_stale_only_past_its_own_lease() -> None:
    other = Holder(host="node-17", pid=1, started=None, lease_s=10.0)
    assert locks._judge(other, 10.0, 300.0) is None
    why, gone = locks._judge(other, 10.5, 300.0)  # type: ignore[misc]
    assert why == "it was not renewed for 10 s, past its 10 s lease (host node-17, pid 1, since ?)"
    assert gone is False  # its holder may still be alive on its host: not certainly gone


def test_a_holder_whose_process_ended_here_is_certainly_gone(tmp_path: Path) -> None:
    out = tmp_path / "a.h5"
    code = (
        "import os, sys; from pathlib import Path; from virchow_rt.slides import locks; "
        "lease, _ = locks.acquire(Path(sys.argv[1]), print); print(os.getpid(), flush=True); os._exit(9)"
    )
    dead = int(subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True).stdout)
    warned: list[str] = []
    lease, _ = locks.acquire(out, warned.append)
    assert lease is not None
    try:
        assert lease.replaced is not None and lease.replaced.pid == dead and lease.replaced_gone is True
        assert "its process is gone" in warned[-1]
    finally:
        lease.release()


def test_a_lock_that_cannot_be_read_is_judged_by_its_age_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ".a.h5.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0.0, "token": "t", "lease_s": 5}))

    def eio(cls: type, p: Path) -> Holder:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Holder, "parse", classmethod(eio))
    assert locks._verdict(path, 300.0) == (Holder(), None)  # not renewed for 0 s: may be alive
    mtime = path.stat().st_mtime
    monkeypatch.setattr(time, "time", lambda: mtime + 300)
    assert locks._verdict(path, 300.0) == (Holder(), None)  # stale only past its lease
    now = path.stat().st_mtime + 301
    monkeypatch.setattr(time, "time", lambda: now)
    holder, (why, gone) = locks._verdict(path, 300.0)  # type: ignore[misc]
    assert holder == Holder() and gone is False
    assert why == "it cannot be read (Input/output error) and was not renewed for 301 s, past the 300 s lease"


def test_a_lock_whose_age_cannot_be_read_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ".a.h5.lock"
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0.0, "token": "t"}))
    real_stat = Path.stat
    error: list[OSError] = []

    def stat(self: Path, **kw: object) -> os.stat_result:
        if self == path and error:
            raise error[0]
        return real_stat(self, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    error.append(OSError(errno.EIO, "Input/output error"))
    assert locks._verdict(path, 300.0) == (Holder.read(path), None)  # nothing can be judged now
    error[0] = FileNotFoundError(errno.ENOENT, "gone")
    assert locks._verdict(path, 300.0) is None  # released meanwhile


def test_a_lease_once_lost_stays_lost_even_if_its_file_reads_as_its_own_again(tmp_path: Path) -> None:
    lease, _ = locks.acquire(tmp_path / "a.h5", print)
    assert lease is not None
    try:
        lease.check()  # ours
        lease._lost.set()  # as the renewal thread does on finding another run's lock
        with pytest.raises(locks.LeaseLost, match="lost its lock on a.h5"):
            lease.check()  # a put-back copy of it may read as ours: the slide was still taken over
    finally:
        lease.release()


def test_a_lock_taken_without_a_takeover_replaced_nobody(tmp_path: Path) -> None:
    lease, _ = locks.acquire(tmp_path / "a.h5", print)
    assert lease is not None
    lease.release()
    assert lease.replaced is None and lease.replaced_gone is False


def test_taking_over_removes_set_aside_locks_of_older_versions_judged_by_the_lease_given(
    tmp_path: Path,
) -> None:
    out = tmp_path / "a.h5"
    lock = locks.lock_path(out)
    old = time.time() - 86400
    aside = lock.with_name(f"{lock.name}.stale-{'1' * 32}")
    for path, token in ((lock, "a"), (aside, "b")):  # no lease_s: an older version's
        path.write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0.0, "token": token}))
        os.utime(path, (old, old))
    warned: list[str] = []
    lease, _ = locks.acquire(out, warned.append, lease_s=300)
    assert lease is not None
    lease.release()
    assert aside.name in warned[-1] and not list(tmp_path.glob(".*"))
