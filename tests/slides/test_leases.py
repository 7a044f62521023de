"""Locks are leases: renewed while held, stale after their lease on any host, taken over only after a check,
and a holder that lost its lease leaves the slide, and every file of the run that took it, alone."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from slide_helpers import FakeBackend

from virchow_rt.slides import SlideSettings, locks, process_slides, read_features

HERE = Path(__file__).parent
QUIET = {"log": lambda line: None, "warn": lambda line: None}


def wait_for(done: Callable[[], bool], what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``done`` (a file appearing, a flag set) until it holds; fail if ``proc`` exits first."""
    deadline = time.monotonic() + 120
    while not done():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()[0]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def this_machine(folder: Path) -> dict:
    """The boot id and PID namespace this process's locks record."""
    out = folder / "probe.h5"
    lease, _ = locks.acquire(out, print)
    try:
        record = json.loads(locks.lock_path(out).read_text())
    finally:
        lease.release()
    return {"boot_id": record["boot_id"], "pid_ns": record["pid_ns"]}


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip


def test_a_lock_of_another_pid_namespace_is_judged_by_its_lease_not_its_pid(tmp_path: Path) -> None:
    """A container on this host (same host name and kernel, its own PID namespace) cannot ask its pid."""
    machine = this_machine(tmp_path)
    if not machine["pid_ns"]:
        pytest.skip("no PID namespaces on this platform")
    out = tmp_path / "a.h5"
    other = {"host": socket.gethostname(), "pid": dead_pid(), "started": time.time(), "lease_s": 300,
             "run": "container", "token": "t1", "boot_id": machine["boot_id"],
             "pid_ns": "pid:[1]"}  # fmt: skip
    locks.lock_path(out).write_text(json.dumps(other))
    taken, holder = locks.acquire(out, print)
    assert not taken and holder is not None and holder.run == "container"  # live until its lease runs out
    old = time.time() - 301
    os.utime(locks.lock_path(out), (old, old))
    warned: list[str] = []
    taken, _ = locks.acquire(out, warned.append)
    assert taken is not None and re.search(r"not renewed for 3\d\d s, past its 300 s lease", warned[-1])
    taken.release()


def test_a_lock_of_a_host_that_died_is_taken_over_after_its_lease_not_a_day(tmp_path: Path) -> None:
    out = tmp_path / "a.h5"
    other = {"host": "node-17", "pid": 4242, "started": time.time(), "lease_s": 60, "run": "r", "token": "t1",
             "boot_id": "another-kernel", "pid_ns": "pid:[4026531836]"}  # fmt: skip
    locks.lock_path(out).write_text(json.dumps(other))
    assert not locks.acquire(out, print)[0]
    old = time.time() - 61
    os.utime(locks.lock_path(out), (old, old))
    taken, _ = locks.acquire(out, print)
    assert taken is not None and locks.Holder.read(locks.lock_path(out)).token == taken.token
    taken.release()
    assert not locks.lock_path(out).exists()


def test_the_holder_renews_its_lease_and_learns_when_it_was_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "a.h5"
    lease, _ = locks.acquire(out, print, lease_s=3)
    path = locks.lock_path(out)
    old = time.time() - 100
    os.utime(path, (old, old))  # as if not renewed for 100 s: any run would take it over...
    wait_for(lambda: time.time() - path.stat().st_mtime < 50, "the lease's renewal")  # ...until touched
    warned: list[str] = []
    taken, holder = locks.acquire(out, warned.append, lease_s=3)  # another run, judging it now
    assert taken is None and holder is not None and holder.token == lease.token and not warned
    lease.check()  # still ours

    other = {**json.loads(path.read_text()), "token": "another-run", "pid": os.getppid()}
    replacement = tmp_path / "replacement"
    replacement.write_text(json.dumps(other))
    os.replace(replacement, path)  # another run took the slide over while this one was stopped
    wait_for(lambda: lease.lost, "the renewal thread to notice")
    with pytest.raises(locks.LeaseLost, match="lost its lock on a.h5 to another run"):
        lease.check()
    lease.release()  # leaves the other run's lock alone
    assert json.loads(path.read_text())["token"] == "another-run"


def test_a_lock_replaced_between_the_judgement_and_the_rename_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs judge the same lock stale; the other takes it over first: ours must not remove its lock."""
    out = tmp_path / "a.h5"
    path = locks.lock_path(out)
    stale = {"host": "node-17", "pid": 1, "started": 0.0, "lease_s": 1, "run": "dead", "token": "old"}
    path.write_text(json.dumps(stale))
    old = time.time() - 25 * 3600
    os.utime(path, (old, old))
    live = {**stale, "host": socket.gethostname(), "pid": os.getppid(), "lease_s": 300, "token": "live"}
    real_rename = Path.rename
    raced: list[bool] = []

    def rename(self: Path, target):  # noqa: ANN001, ANN202 - Path.rename's signature
        if self == path and not raced:  # judged stale; the other run's takeover lands right now
            fresh = tmp_path / "fresh"
            fresh.write_text(json.dumps(live))
            os.replace(fresh, path)
            raced.append(True)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    taken, holder = locks.acquire(out, print)
    assert raced and not taken and holder is not None and holder.pid == os.getppid()
    assert json.loads(path.read_text())["token"] == "live"  # the live lock is back in place, untouched
    assert [p.name for p in tmp_path.glob(".*")] == [".a.h5.lock"]


GATED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from slide_helpers import FakeBackend
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    gate = Path(sys.argv[2])

    class Gated(FakeBackend):  # the first batch says so, then waits until the test opens the gate
        def run(self, tiles):
            if not (gate / "started").exists():
                (gate / "started").touch()
                while not (gate / "open").exists():
                    time.sleep(0.01)
            return super().run(tiles)

    args = build_parser().parse_args(["slides", *sys.argv[4:], "--model", "fake", "--out", sys.argv[3],
                                      "--batch", "4", "--lock-lease", "10"])
    args.model = Gated()
    sys.exit(run_cli(args))
    """
)


def test_a_stopped_holder_that_lost_its_lease_abandons_the_slide_and_touches_nothing(
    make_slide, tmp_path: Path
) -> None:
    slide = make_slide("s0.tif").path
    out, gate = tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen([sys.executable, "-c", GATED, str(HERE), str(gate), str(out), str(slide)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for((gate / "started").exists, "the first run's first batch", first)
        os.kill(first.pid, signal.SIGSTOP)  # a paused job, a VM migrated, a laptop closed...
        lock = out / ".s0.h5.lock"
        old = time.time() - 60
        os.utime(lock, (old, old))  # ...for longer than its 10 s lease
        warned: list[str] = []
        second = process_slides([slide], FakeBackend(), out, SlideSettings(batch_size=4), log=lambda s: None,
                                warn=warned.append)  # fmt: skip
        assert second["this_run"][0]["status"] == "done" and "past its 10 s lease" in warned[0]
        h5 = out / "s0.h5"
        finished = (h5.stat().st_ino, h5.stat().st_mtime_ns)
        state = (out / "slide_states" / "s0.json").read_text()
        (gate / "open").touch()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    log = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and "lost its lock on s0.h5 to another run" in log, log
    assert (h5.stat().st_ino, h5.stat().st_mtime_ns) == finished  # the second run's file, untouched
    assert (out / "slide_states" / "s0.json").read_text() == state
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"][0]["status"] == "locked" and summary["slides"][0]["status"] == "done"
    assert read_features(h5)["attrs"]["complete"]
    assert not list(out.glob(".*"))  # its own temporary file removed; no lock left


def test_a_failed_redo_keeps_the_file_it_did_not_make(make_slide, tmp_path: Path) -> None:
    out = tmp_path / "out"
    slide = make_slide("s.tif").path
    process_slides([slide], FakeBackend(), out, **QUIET)
    before = (out / "s.h5").read_bytes()
    data = slide.read_bytes()
    slide.write_bytes(data[: len(data) // 2])  # another slide of the same name, and a broken one
    summary = process_slides([slide], FakeBackend(), out, **QUIET)
    assert (out / "s.h5").read_bytes() == before  # not this run's to delete
    assert summary["this_run"][0]["status"] == "failed" and summary["slides"][0]["status"] == "failed"
    assert not list(out.glob(".*"))


def test_clear_stale_locks_keeps_the_locks_of_live_runs(make_slide, tmp_path: Path, capsys) -> None:
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    out = tmp_path / "out"
    slide = make_slide("s0.tif").path
    process_slides([slide], FakeBackend(), out, log=lambda line: None)  # an --out of virchow-rt slides
    live = {"host": "node-17", "pid": 1, "started": time.time(), "lease_s": 300, "run": "r", "token": "a"}
    (out / ".s1.h5.lock").write_text(json.dumps(live))
    (out / ".s2.h5.lock").write_text(json.dumps({**live, "token": "b"}))
    old = time.time() - 301
    os.utime(out / ".s2.h5.lock", (old, old))
    (out / ".s1.h5.a.partial").write_bytes(b"the live run's file in progress")
    (out / ".s2.h5.b.partial").write_bytes(b"the file the stale lock's holder left")
    args = build_parser().parse_args(["slides", str(slide), "--model", "m", "--out", str(out),
                                      "--clear-stale-locks"])  # fmt: skip
    args.model = FakeBackend()
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"removed lock \.s2\.h5\.lock \(it was not renewed for 3\d\d s, past its 300 s lease", err
    )
    assert "kept lock .s1.h5.lock: its run is live (host node-17" in err
    assert "removed file .s2.h5.b.partial (left by a run whose lock is stale (host node-17" in err
    assert sorted(p.name for p in out.glob(".*")) == [".s1.h5.a.partial", ".s1.h5.lock"]


def test_the_slides_flags_are_the_settings_fields() -> None:
    """Each setting's flag, default and help live in SlideSettings: the parser is made from them."""
    import dataclasses

    from virchow_rt.cli.main import build_parser

    args = build_parser().parse_args(["slides", "x.tif", "--model", "m", "--out", "o"])
    assert SlideSettings.from_options(vars(args)) == SlideSettings(read_processes=True)  # the CLI reads so
    flags = [f.metadata["flag"] for f in dataclasses.fields(SlideSettings) if f.metadata.get("flag")]
    assert "--lock-lease" in flags and "--mirror-folders" in flags and len(flags) == 22
    args = build_parser().parse_args(["slides", "x.tif", "--model", "m", "--out", "o", "--lock-lease", "30",
                                      "--regions", "5,10,20", "--read-threads", "--qc"])  # fmt: skip
    settings = SlideSettings.from_options(vars(args))
    assert (settings.lock_lease, settings.regions, settings.read_processes, settings.qc) == (
        30.0, (5, 10, 20), False, True)  # fmt: skip


def test_the_run_taking_over_the_lease_of_a_host_gone_removes_its_partial_file(
    make_slide, tmp_path: Path
) -> None:
    """A worker on a node that went away left its lock and its ``.partial``: neither outlives the takeover."""
    slide = make_slide("s0.tif").path
    out = tmp_path / "out"
    out.mkdir()
    lock = locks.lock_path(out / "s0.h5")
    gone = {"host": "node-17", "pid": 4242, "started": time.time(), "lease_s": 3, "run": "r", "token": "t1",
            "boot_id": "another-kernel", "pid_ns": "pid:[1]"}  # fmt: skip
    lock.write_text(json.dumps(gone))
    (out / ".s0.h5.t1.partial").write_bytes(b"half of a file")
    assert 2 < locks.lease_left(out / "s0.h5") <= 3  # its own lease, not ours
    summary = process_slides([slide], FakeBackend(), out, SlideSettings(lock_lease=3), **QUIET)
    assert summary["this_run"][0]["status"] == "locked" and (out / ".s0.h5.t1.partial").exists()
    old = time.time() - 4
    os.utime(lock, (old, old))  # its lease ran out: nobody renews it
    assert locks.lease_left(out / "s0.h5") == 0.0
    summary = process_slides([slide], FakeBackend(), out, SlideSettings(lock_lease=3), **QUIET)
    assert summary["this_run"][0]["status"] == "done" and read_features(out / "s0.h5")["attrs"]["complete"]
    assert not list(out.glob(".*"))  # its lock and its temporary file are gone
    assert locks.lease_left(out / "s0.h5") is None


@pytest.mark.parametrize("lease", ["inf", "nan", "0", "1.5", "1e6"])
def test_a_lock_lease_out_of_bounds_is_refused_before_any_lock_is_judged(tmp_path: Path, lease: str) -> None:
    """inf would never go stale (and overflow the renewal thread), a tiny one spins and loses busy slides."""
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli
    from virchow_rt.errors import InputError

    out = tmp_path / "out"
    out.mkdir()
    stale = {"host": "node-17", "pid": 1, "started": 0.0, "lease_s": 300, "run": "r", "token": "a"}
    (out / ".s1.h5.lock").write_text(json.dumps(stale))
    old = time.time() - 301
    os.utime(out / ".s1.h5.lock", (old, old))
    args = build_parser().parse_args(["slides", "x.tif", "--model", "m", "--out", str(out),
                                      "--clear-stale-locks", "--lock-lease", lease])  # fmt: skip
    with pytest.raises(InputError, match=r"--lock-lease \S+: give a number of seconds from 2 to 86400"):
        run_cli(args)
    assert (out / ".s1.h5.lock").exists()  # not cleared by a lease that makes no sense
    for bound in (locks.MIN_LEASE_S, locks.MAX_LEASE_S):
        SlideSettings(lock_lease=bound).check()
