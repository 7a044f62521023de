"""Reading worker processes die with their parent and stay quiet on Ctrl-C.

A `slides` run reads with worker processes. Killed with SIGKILL (the OOM killer, a scheduler), the
parent never shuts its pool down: its workers must still exit, not live on with PPID 1. Ctrl-C on a
terminal reaches every process of the foreground group: the workers must leave the stop to the parent,
so the console shows the one "interrupted" line, not a traceback per worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")  # third-party, from the bench extra

HERE = Path(__file__).parent
SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from slide_helpers import FakeBackend
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    class Slow(FakeBackend):  # a batch takes 0.2 s: the run is mid-slide for a while
        def run(self, tiles):
            time.sleep(0.2)
            return super().run(tiles)

    args = build_parser().parse_args(["slides", *sys.argv[3:], "--model", "fake", "--out", sys.argv[2],
                                      "--batch", "2", "--workers", "2"])
    args.model = Slow()
    try:
        sys.exit(run_cli(args))
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(130)
    """
)


def wait_for(what: str, condition, timeout: float = 120.0):  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_mid_slide(make_slide, tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """A `slides` run with 2 reading processes, returned mid-slide, with the workers' PIDs."""
    slide = make_slide("s0.tif").path
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(HERE), str(out), str(slide)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    wait_for("the slide's temporary file", lambda: run.poll() is None and list(out.glob(".*.partial")))
    parent = psutil.Process(run.pid)

    def readers() -> list[int] | None:
        found = [c.pid for c in parent.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
        return found if len(found) >= 2 else None  # the pool starts its workers as work arrives

    return run, wait_for("2 reading workers", readers)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_reading_workers_exit_when_their_parent_is_killed(make_slide, tmp_path: Path) -> None:
    run, workers = start_mid_slide(make_slide, tmp_path)
    assert len(workers) == 2
    run.kill()
    run.communicate(timeout=30)
    wait_for(f"workers {workers} to exit after their parent's SIGKILL", lambda: all(map(gone, workers)), 30)


def test_ctrl_c_shows_one_line_not_a_traceback_per_worker(make_slide, tmp_path: Path) -> None:
    run, workers = start_mid_slide(make_slide, tmp_path)
    os.killpg(run.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    log = run.communicate(timeout=60)[0]
    assert run.returncode == 130, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    wait_for("the workers to exit", lambda: all(map(gone, workers)), 30)
