"""Runs that share an output folder, runs that are killed or stopped, and a full disk: nothing is lost.

The runs are real processes (``subprocess``) where it matters: two at once on one folder, SIGKILL at
moments followed by a resume, SIGTERM. The model is the deterministic FakeBackend, slowed down so that a
signal sent once a slide's temporary file appears lands in the middle of that slide.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from slide_helpers import FakeBackend

from virchow_rt.errors import OutputError
from virchow_rt.slides import SlideSettings, locks, process_slides
from virchow_rt.slides.writer import check_complete, read_features

HERE = Path(__file__).parent
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from slide_helpers import FakeBackend
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    out, hold = Path(sys.argv[2]), os.environ.get("HOLD_AT")

    class Slow(FakeBackend):  # a batch takes 50 ms: a signal lands in the middle of a slide
        def run(self, tiles):
            time.sleep(0.05)
            if hold and next(out.glob(f".{hold}.h5.*.partial"), None):  # in slide `hold`: wait for a signal
                (out.parent / "held").touch()
                while True:
                    time.sleep(0.01)
            return super().run(tiles)

    args = build_parser().parse_args(["slides", *sys.argv[3:], "--model", "fake", "--out", sys.argv[2],
                                      "--batch", "4"])
    args.model = Slow()
    try:
        code = run_cli(args)
    except KeyboardInterrupt as err:
        print("INTERRUPTED:", err, flush=True)
        code = 130
    sys.exit(code)
    """
)


def start(out: Path, slides: list[Path], hold_at: str = "") -> subprocess.Popen[str]:
    """The slides CLI in a process, its model slowed; with ``hold_at`` it stops in that slide's first batch
    (its temporary file made, the slides before it finished) and touches ``<out>/../held``."""
    cmd = [sys.executable, "-c", SCRIPT, str(HERE), str(out), *map(str, slides)]
    env = {**os.environ, "HOLD_AT": hold_at}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_until_held(run: subprocess.Popen[str], out: Path) -> None:
    """Wait until the run holds in the slide ``start`` was told to hold at."""
    deadline = time.monotonic() + 120
    while not (out.parent / "held").exists():
        assert run.poll() is None, f"the run ended before it held: {run.communicate()[0]}"
        assert time.monotonic() < deadline, "timed out waiting for the run to hold"
        time.sleep(0.005)


def settings() -> SlideSettings:
    return SlideSettings(batch_size=4)


@pytest.fixture
def slides(make_slide) -> list[Path]:
    return [make_slide(f"s{i}.tif", seed=i).path for i in range(3)]


def assert_same(out: Path, want: Path, names: list[str]) -> None:
    for name in names:
        got, ref = read_features(out / f"{name}.h5"), read_features(want / f"{name}.h5")
        np.testing.assert_array_equal(got["coords"], ref["coords"])
        np.testing.assert_array_equal(got["features"], ref["features"])


def die_holding(out: Path) -> int:
    """A run that takes the lock of ``out``, starts its temporary file and is killed; returns its pid."""
    code = (
        "import os, sys; from pathlib import Path; from virchow_rt.slides import locks; "
        "out = Path(sys.argv[1]); lease, _ = locks.acquire(out, print); "
        "out.with_name(f'.{out.name}.{lease.token}.partial').write_bytes(b'killed'); "
        "print(os.getpid(), flush=True); os._exit(9)"
    )
    return int(subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True).stdout)


def test_a_lock_is_taken_refused_released_and_taken_over_when_stale(tmp_path: Path) -> None:
    out, warned = tmp_path / "a.h5", []
    taken, holder = locks.acquire(out, warned.append)
    assert taken and holder is None and locks.Holder.read(locks.lock_path(out)).pid == os.getpid()
    again, holder = locks.acquire(out, warned.append)  # held by a live process (this one)
    assert not again and holder is not None and holder.host == socket.gethostname()
    taken.release()
    assert not locks.lock_path(out).exists()

    dead = die_holding(out)  # on this machine, in this PID namespace: its pid can be asked
    assert locks.Holder.read(locks.lock_path(out)).pid == dead
    taken, _ = locks.acquire(out, warned.append)
    assert taken and "its process is gone" in warned[-1] and ".partial" in warned[-1]
    assert not list(tmp_path.glob("*.partial"))  # the dead holder's temporary file went with its lock
    taken.release()

    elsewhere = {"host": "node-17", "pid": 1, "started": time.time(), "run": "old"}  # no lease recorded
    locks.lock_path(out).write_text(json.dumps(elsewhere))
    assert not locks.acquire(out, warned.append)[0]  # another host, recent: it may be running
    old = time.time() - 25 * 3600
    os.utime(locks.lock_path(out), (old, old))
    taken, _ = locks.acquire(out, warned.append)
    assert taken and "not renewed for 25.0 h" in warned[-1]
    locks.lock_path(out).write_text(json.dumps(elsewhere))  # another run's lock now
    taken.release()  # never removes another run's lock
    assert locks.lock_path(out).exists()
    (tmp_path / "run_config.json").write_text("{}")  # an --out of virchow-rt slides
    removed, kept = locks.clear_stale_locks(tmp_path)  # a live lock is kept
    assert removed == [] and [p.name for p, _ in kept] == [".a.h5.lock"]
    os.utime(locks.lock_path(out), (old, old))
    removed, kept = locks.clear_stale_locks(tmp_path)
    assert [p.name for p, _, _ in removed] == [".a.h5.lock"] and kept == []
    assert not list(tmp_path.glob(".*.lock*"))


def test_a_slide_another_run_holds_is_left_to_it(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    other = {"host": socket.gethostname(), "pid": os.getppid(), "started": time.time(), "run": "other"}
    (out / ".s1.h5.lock").write_text(json.dumps(other))
    (out / ".s1.h5.abcd.partial").write_bytes(b"the other run's file in progress")
    summary = process_slides(slides, FakeBackend(), out, settings(), log=lambda s: None)
    assert [s["status"] for s in summary["slides"]] == ["done", "locked", "done"]
    assert "another run is writing it" in summary["slides"][1]["reason"]
    assert (out / ".s1.h5.abcd.partial").exists() and not (out / "s1.h5").exists()  # untouched
    assert sorted(p.name for p in out.glob(".*.lock")) == [".s1.h5.lock"]  # ours released


def test_two_runs_at_once_write_each_slide_exactly_once(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = [start(out, slides), start(out, slides)]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    written = [line for log in logs for line in log.splitlines() if "-> " in line and ".h5" in line]
    assert sorted(line.split("] ")[1].split(":")[0] for line in written) == ["s0.tif", "s1.tif", "s2.tif"], (
        logs
    )
    assert all(check_complete(out / f"s{i}.h5", {}) is None for i in range(3))
    assert not list(out.glob(".*"))  # no lock or temporary file left


@pytest.mark.parametrize("slide", ["s0", "s1", "s2"])
def test_sigkill_at_any_moment_then_a_resume_equals_an_uninterrupted_run(
    slides: list[Path], tmp_path: Path, slide: str
) -> None:
    want = tmp_path / "uninterrupted"
    process_slides(slides, FakeBackend(), want, settings(), log=lambda s: None)
    out = tmp_path / "out"
    run = start(out, slides, hold_at=slide)
    wait_until_held(run, out)  # in the middle of that slide, the ones before it finished
    run.kill()
    run.wait()
    assert next(out.glob(f".{slide}.h5.*.partial"), None) and locks.lock_path(out / f"{slide}.h5").exists()
    for h5 in out.glob("*.h5"):  # whatever looks like an output is a complete one
        assert check_complete(h5, {}) is None
    summary = process_slides(slides, FakeBackend(), out, settings(), log=lambda s: None)
    assert {s["status"] for s in summary["slides"]} <= {"done", "skipped"}
    assert_same(out, want, ["s0", "s1", "s2"])
    assert not list(out.glob(".*"))  # the killed run's lock and temporary file are gone


def test_sigterm_stops_cleanly_and_says_how_to_resume(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = start(out, slides, hold_at="s1")
    wait_until_held(run, out)  # the handler is in place; s1 is in the model, s2 not started
    run.send_signal(signal.SIGTERM)
    log = run.communicate(timeout=60)[0]
    assert run.returncode == 130 and "rerun the same command to resume" in log, log
    assert not list(out.glob(".*"))  # no lock, no temporary file
    summary = json.loads((out / "summary.json").read_text())
    # every slide given is listed on the way out: what was done, and what was not
    assert sorted(s["name"] for s in summary["slides"]) == ["s0", "s1", "s2"]
    assert {s["status"] for s in summary["slides"]} <= {"done", "interrupted", "not started"}
    assert (
        summary["totals"]["done"] + summary["totals"]["not_done"] == 3 and summary["totals"]["not_done"] >= 1
    )


def test_a_full_disk_stops_with_one_line_and_keeps_finished_slides(
    slides: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virchow_rt.slides import writer

    out = tmp_path / "out"
    real = writer.FeatureWriter.append
    calls = {"n": 0}

    def append(self, coords, features):  # noqa: ANN001 - FeatureWriter.append's signature
        calls["n"] += 1
        if self.path.name.startswith(".s1.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, coords, features)

    monkeypatch.setattr(writer.FeatureWriter, "append", append)
    with pytest.raises(OutputError, match=rf"disk holding {out} is full .*s1\.h5.*rerun the same command"):
        process_slides(slides, FakeBackend(), out, settings(), log=lambda s: None)
    assert check_complete(out / "s0.h5", {}) is None and not (out / "s1.h5").exists()
    assert not list(out.glob(".*"))  # its temporary file and lock are gone


# Written from the mutants mutmut left alive in virchow_rt/slides/locks.py (docs/TESTING.md).


def test_a_lock_set_aside_by_mistake_is_put_back_where_hard_links_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = locks.lock_path(tmp_path / "a.h5")
    aside = path.with_name(f"{path.name}.stale-1")
    aside.write_text('{"token": "t1"}')

    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    aside.write_text('{"token": "t0"}')
    path.write_text('{"token": "t1"}')  # a new lock there: the aside file is kept, the lock left alone
    assert locks._put_back(aside, path) is False
    assert locks.Holder.read(path).token == "t1" and locks.Holder.read(aside).token == "t0"
    path.unlink()
    aside.write_text('{"token": "t1"}')
    monkeypatch.setattr(os, "link", no_links)  # some network filesystems
    assert locks._put_back(aside, path) is True
    assert locks.Holder.read(path).token == "t1" and not aside.exists()
    aside.write_text('{"token": "t0"}')  # a lock there by now is never replaced: the aside file stays
    assert locks._put_back(aside, path) is False
    assert locks.Holder.read(path).token == "t1" and locks.Holder.read(aside).token == "t0"
    aside.unlink()  # judged stale and removed meanwhile: nothing to put back
    assert locks._put_back(aside, path) is False


def test_a_lost_lease_says_who_has_the_slide_now_or_that_it_was_released(tmp_path: Path) -> None:
    out = tmp_path / "a.h5"
    path = locks.lock_path(out)
    lease, _ = locks.acquire(out, print)
    try:
        path.write_text(json.dumps({"host": "node-17", "pid": 7, "started": 0.0, "token": "other"}))
        with pytest.raises(locks.LeaseLost) as caught:
            lease.check()
        assert str(caught.value) == (
            "lost its lock on a.h5 to another run (now host node-17, pid 7, since ?): this run was stopped, "
            f"or could not renew its lock, past its {locks.DEFAULT_LEASE_S:g} s lease; the slide is left to "
            "that run"
        )
        path.unlink()
        with pytest.raises(locks.LeaseLost, match=r"to another run \(since released\): this run was stopped"):
            lease.raise_if_lost()
    finally:
        lease.release()


def test_lease_left_of_a_lock_without_its_own_lease_counts_down_the_lease_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a.h5"
    path = locks.lock_path(out)
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0.0, "run": "old"}))  # older version
    now = path.stat().st_mtime + 49.5
    monkeypatch.setattr(time, "time", lambda: now)
    assert locks.lease_left(out, lease_s=50) == pytest.approx(0.5)  # not rounded up to a second
    assert locks.lease_left(out, lease_s=49) == 0.0


def test_durations_in_messages_switch_to_hours_at_one_hour() -> None:
    assert locks._duration(3599.4) == "3599 s"
    assert locks._duration(3600) == "1.0 h"
    assert locks._duration(300 * 3600) == "300.0 h"


def test_a_live_holder_on_this_machine_is_asked_not_signalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a.h5"
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        taken, _ = locks.acquire(out, print)
        assert taken is not None
        record = {**json.loads(locks.lock_path(out).read_text()), "pid": child.pid, "token": "child"}
        taken.release()
        locks.lock_path(out).write_text(json.dumps(record))
        again, holder = locks.acquire(out, print)  # its process is alive: left to it
        assert again is None and holder is not None and holder.pid == child.pid
        assert child.poll() is None  # and still alive: asked with signal 0, nothing sent
    finally:
        child.communicate(b"")
    assert child.returncode == 0

    def not_ours(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_ours)  # another user's process: it exists
    assert locks._alive(child.pid) is True


def test_holders_describe_themselves_with_the_local_start_time() -> None:
    started = 1_700_000_000.0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    assert locks.Holder(host="h", pid=5, started=started).describe() == f"host h, pid 5, since {when}"
    assert locks.Holder().describe() == "host ?, pid ?, since ?"


def _stale(path: Path, token: str, **record: object) -> None:
    """A lock of another host at ``path``, not renewed for a day (``record`` overrides its fields)."""
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0.0, "token": token, **record}))
    old = time.time() - 86400
    os.utime(path, (old, old))


def test_only_the_very_lock_judged_stale_is_taken_aside(tmp_path: Path) -> None:
    path = locks.lock_path(tmp_path / "a.h5")
    assert locks._take_aside(path, locks.Holder(), 300) is False  # released meanwhile: nothing taken
    _stale(path, "b", lease_s=300)  # stale too, but another run's lock than the one judged
    assert locks._take_aside(path, locks.Holder(token="a"), 300) is False
    assert locks.Holder.read(path).token == "b" and not list(tmp_path.glob("*.stale-*"))  # put back
    assert locks._take_aside(path, locks.Holder.read(path), 300) is True and not path.exists()


def test_leftovers_of_set_aside_locks_are_judged_by_the_lease_given_and_spare_the_current_holder(
    tmp_path: Path,
) -> None:
    out, one, two = tmp_path / "a.h5", "1" * 32, "2" * 32  # set-aside names end in a 32-hex token
    (tmp_path / "run_config.json").write_text("{}")  # an --out of virchow-rt slides
    lock = locks.lock_path(out)
    lock.write_text(json.dumps({"host": "node-17", "pid": 1, "started": 0.0, "token": "t"}))  # live
    _stale(lock.with_name(f"{lock.name}.stale-{one}"), "t")  # a copy of the live lock, older version
    _stale(lock.with_name(f"{lock.name}.stale-{two}"), "u")  # a gone holder's, older version (no lease_s)
    for token in "tu":
        locks.partial_path(out, token).write_bytes(b"half")
    removed, kept = locks.clear_stale_locks(tmp_path, lease_s=300)
    assert [p.name for p, _ in kept] == [".a.h5.lock"]
    assert sorted(p.name for p, _, _ in removed) == [
        f".a.h5.lock.stale-{one}",
        f".a.h5.lock.stale-{two}",
        ".a.h5.u.partial",
    ]
    assert locks.partial_path(out, "t").exists()  # never the file of the lock's holder now


def test_locked_outputs_are_read_from_lock_names_only(tmp_path: Path) -> None:
    token = "0123456789abcdef" * 2
    names = ("..lock", ".x.h5.lockfoo", ".my.lock.h5.lock", f".a.h5.lock.stale-{token}",
             f".b.h5.lock.release-{token}", ".c.h5.lock.stale-1", ".sub")  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "caseA").mkdir()
    (tmp_path / "caseA" / ".d.h5.lock").write_text("{}")
    assert [p.name for p in locks._locked_outputs(tmp_path, False)] == ["a.h5", "b.h5", "my.lock.h5"]
    mirrored = locks._locked_outputs(tmp_path, True)
    assert [p.relative_to(tmp_path).as_posix() for p in mirrored] == [
        "a.h5",
        "b.h5",
        "caseA/d.h5",
        "my.lock.h5",
    ]
