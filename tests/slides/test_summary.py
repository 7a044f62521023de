"""``summary.json`` is built from one state file per slide: a run that saw a slide locked or complete never
undoes another run's "done", concurrent runs lose no slide, and every state and summary is written durably."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from slide_helpers import FakeBackend

from virchow_rt.slides import SlideRecord, SlideSettings, process_slides
from virchow_rt.slides import summary as summary_module

QUIET = {"log": lambda line: None, "warn": lambda line: None}


def test_a_run_that_finds_a_slide_locked_keeps_the_other_runs_done(make_slide, tmp_path: Path) -> None:
    slides = [make_slide(f"s{i}.tif", seed=i).path for i in range(2)]
    out = tmp_path / "out"
    process_slides(slides, FakeBackend(), out, **QUIET)  # "another host" finished both
    other = {"host": "node-17", "pid": 1, "started": 0.0, "lease_s": 300, "run": "r", "token": "t"}
    (out / ".s1.h5.lock").write_text(json.dumps(other))  # and is looking at s1 again right now
    summary = process_slides(slides, FakeBackend(), out, **QUIET)
    saved = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in saved["slides"]] == ["done", "done"]
    assert [s["status"] for s in summary["this_run"]] == ["skipped", "locked"]
    assert saved["slides"][1]["tiles"] > 0 and saved["slides"][1]["timings"]["total_s"] > 0


def test_the_summary_is_rebuilt_from_the_slides_states(make_slide, tmp_path: Path) -> None:
    """Each run writes its slides' states; the summary lists every slide any run finished."""
    a, b = make_slide("a.tif").path, make_slide("b.tif").path
    out = tmp_path / "out"
    process_slides([a], FakeBackend(), out, **QUIET)
    (out / "summary.json").write_text("{")  # torn by an old version, or lost: nothing depends on it
    summary = process_slides([b], FakeBackend(), out, **QUIET)
    assert {s["name"]: s["status"] for s in summary["slides"]} == {"a": "done", "b": "done"}
    assert [s["name"] for s in summary["this_run"]] == ["b"] and summary["totals"]["done"] == 1
    state = json.loads((out / "slide_states" / "a.json").read_text())
    assert state["status"] == "done" and state["output"] == str(out / "a.h5")


def test_concurrent_runs_lose_no_slide_in_the_summary(tmp_path: Path) -> None:
    """Runs finish at once: whoever writes the summary last lists what every run recorded before."""
    out = tmp_path / "out"
    out.mkdir()
    model = summary_module.ModelEntry("", "backend:x", "v", "fp32", "fake", True, "random", 48, "cls_mean")
    start = threading.Barrier(4)

    def run(name: str) -> None:
        start.wait()
        for i in range(10):
            record = SlideRecord(name=f"{name}{i}", path=f"/slides/{name}{i}.tif", status="done")
            summary_module.write_state(out, record)
            summary_module.write_summary(out, [record], SlideSettings(), model, "now", 1.0)

    threads = [threading.Thread(target=run, args=(name,)) for name in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["slides"]) == 40 and {s["status"] for s in saved["slides"]} == {"done"}
    assert saved["runs"] == 40


def test_states_and_summary_are_fsynced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:  # noqa: ANN001 - os.replace's signature
        events.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    record = SlideRecord(name="s", path="/slides/s.tif", status="done")
    summary_module.write_state(tmp_path, record)
    assert events == ["fsync file", "rename s.json", "fsync folder"]
    events.clear()
    model = summary_module.ModelEntry("", "backend:x", "v", "fp32", "fake", True, "random", 48, "cls_mean")
    summary_module.write_summary(tmp_path, [record], SlideSettings(), model, "now", 1.0)
    assert events == ["fsync file", "rename summary.json", "fsync folder"]
    assert json.loads((tmp_path / "slide_states" / "s.json").read_text())["status"] == "done"


EVIL = '{"name": "evil", "path": "x", '
CRAFTED = {  # what another user of a shared folder may leave in slide_states/ (or as summary.json)
    "fifo": lambda p: os.mkfifo(p),  # read: hangs the run while it holds the summary lock
    "device": lambda p: p.symlink_to("/dev/zero"),  # read: fills memory
    "deep": lambda p: p.write_text(EVIL + '"warnings": ' + "[" * 50000 + "]" * 50000 + "}"),
    "nested": lambda p: p.write_text(EVIL + '"warnings": ' + "[" * 900 + "]" * 900 + "}"),
    "types": lambda p: p.write_text(EVIL + '"timings": {"total_s": "x"}, "tiles": "9"}'),
    "no name": lambda p: p.write_text('{"path": "x", "status": "done"}'),
    "latin-1": lambda p: p.write_bytes(b'{"name": "\xe9vil", "path": "x"}'),
}  # fmt: skip


@pytest.mark.parametrize("craft", list(CRAFTED))
@pytest.mark.parametrize("where", ["slide_states/evil.json", "summary.json"])
def test_a_crafted_state_or_summary_file_is_ignored_not_a_hang_or_traceback(
    tmp_path: Path, craft: str, where: str
) -> None:
    model = summary_module.ModelEntry("", "backend:x", "v", "fp32", "fake", True, "random", 48, "cls_mean")
    record = SlideRecord(name="s", path="/slides/s.tif", status="done", timings={"total_s": 1.0})
    summary_module.write_state(tmp_path, record)
    CRAFTED[craft](tmp_path / where)
    result: list = []
    worker = threading.Thread(  # a hang fails the test instead of stopping the suite
        target=lambda: result.append(
            summary_module.write_summary(tmp_path, [record], SlideSettings(), model, "now", 1.0)
        ),  # fmt: skip
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), f"write_summary hangs on a {craft} {where}"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert result and saved["slides"][0]["name"] == "s" and saved["slides"][0]["status"] == "done"
    for kept in saved["slides"][1:]:  # a readable record: its fields of the wrong type left out
        assert kept["name"] == "evil" and (kept["tiles"], kept["warnings"], kept["timings"]) == (0, [], {})
    typed = summary_module.SlideRecord.from_dict({"name": "e", "path": "x", "tiles": "9", "warnings": [[]]})
    assert (typed.tiles, typed.warnings) == (0, [])
