"""The GPU check's child processes: their environment, their time limits, and nothing left behind.

Every child gets the tree (and the carried wheels) first on ``PYTHONPATH``. Past its limit a child gets
SIGINT (pytest writes its summary and JUnit XML; scripts unwind), then SIGKILL with every process it
started; whatever a child leaves running when it ends is killed too: the check adopts orphans
(a subreaper, on Linux) and walks ``/proc`` for them. Children stay in the check's process group, so a
device command killed with its group takes them all along.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the tree: tests/ and bench/ live there, not in a wheel
GRACE_S = 10.0  # from SIGINT to SIGKILL: pytest writes its summary and JUnit XML meanwhile
WATCH_S = 2.0  # how often a running child's results so far are read (``run_logged``'s ``watch``)


class StepFailed(Exception):
    """A step that ran but did not succeed; ``result`` keeps what it found (the tests' outcomes)."""

    def __init__(self, reason: str, result: Any = None) -> None:
        super().__init__(reason)
        self.result = result


class StepStopped(StepFailed):
    """A child stopped at its time limit; ``result`` keeps what it had measured by then."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP reached the check: the step in progress is stopped, what was found is kept."""


def child_env(site: Path | None = None) -> dict[str, str]:
    """The environment of every child: the tree (and carried wheels) first on PYTHONPATH, unbuffered."""
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_T0"}
    paths = [str(ROOT), *([str(site)] if site else []), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def budget_start() -> float:
    """The perf_counter() value the budget counts from: when gpu_check.sh started (GPU_CHECK_T0), else now."""
    now = time.perf_counter()
    try:
        waited = time.time() - float(os.environ["GPU_CHECK_T0"])
    except (KeyError, ValueError):
        return now
    return now - waited if 0 <= waited < 600 else now


def become_subreaper() -> bool:
    """Adopt the orphans of our children (Linux), so that processes a step leaves behind can be found."""
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` that still run (read from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue  # not a process, or it ended meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def stop_leftovers() -> int:
    """SIGKILL every process this one started that still runs, then reap them; returns how many."""
    killed: set[int] = set()
    for _ in range(3):  # a dying parent's children are adopted by us a moment later
        pids = [p for p in descendants(os.getpid()) if p not in killed]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    while True:  # reap what we adopted (our own Popen children were waited for already)
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return len(killed)


def run_logged(
    cmd: list[str],
    log: Path,
    timeout: float,
    *,
    env: dict[str, str],
    cwd: Path,
    watch: Callable[[], None] | None = None,
) -> int:
    """Run ``cmd`` with its output appended to ``log``; returns its exit code.

    Past ``timeout`` seconds it gets SIGINT, and GRACE_S later SIGKILL with every process it started
    (:class:`StepStopped`); whatever it leaves running when it ends is killed too. ``watch`` is called
    every WATCH_S while it runs (to keep its results so far; an error there is logged, not raised).
    """
    with log.open("a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
        )
        deadline = time.monotonic() + max(timeout, 1.0)
        try:
            while True:
                try:
                    return proc.wait(timeout=max(0.0, min(WATCH_S, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        break
                    if watch is not None:
                        _call(watch, fh)
            proc.send_signal(signal.SIGINT)  # pytest writes its summary and XML; scripts unwind
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            raise StepStopped(f"stopped at its time limit of {timeout:.0f} s")
        finally:
            left = [p for p in descendants(os.getpid()) if p != proc.pid]
            stop_leftovers()
            proc.wait()
            if left:
                fh.write(f"(killed {len(left)} processes it left running)\n")


def _call(watch: Callable[[], None], log: Any) -> None:
    try:
        watch()
    except Exception as err:  # noqa: BLE001 - reading results early must never stop the child
        log.write(f"(could not read its results so far: {type(err).__name__}: {err})\n")
        log.flush()


class SoFar:
    """What a running child has measured so far, read from the files it writes as it measures.

    ``read()`` returns it (None: nothing yet). Calling this returns the latest good reading: one that
    raises keeps the one before, and is logged once (``log``), not at every WATCH_S.
    """

    def __init__(self, read: Callable[[], Any], log: Callable[[str], None]) -> None:
        self.read, self.log = read, log
        self.found: Any = None
        self.failed = False

    def __call__(self) -> Any:
        try:
            found = self.read()
        except Exception as err:  # noqa: BLE001 - reading results early must never lose those read before
            if not self.failed:
                self.failed = True
                why = f"{type(err).__name__}: {err}"
                self.log(f"(could not read its results so far, keeping those read before: {why})")
            return self.found
        if found is not None:
            self.found = found
        return self.found


def last_line(log: Path) -> str:
    """The last line of ``log`` that says something (an exception, usually)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()[-40:] if ln.strip()]
    return lines[-1][:300] if lines else ""
