"""File helpers shared by every writer: atomic replacement and the lock for shared read-merge-write files."""

from __future__ import annotations

import threading

import pytest

from virchow_rt.manifest import atomic_path, file_lock


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_file_lock_is_exclusive(tmp_path):
    pytest.importorskip("fcntl", reason="flock is POSIX-only; elsewhere the lock is a no-op")
    shared = tmp_path / "timing.cache"
    entered = threading.Event()

    def other_writer() -> None:
        with file_lock(shared):
            entered.set()

    with file_lock(shared):
        thread = threading.Thread(target=other_writer)
        thread.start()
        assert not entered.wait(0.3)  # blocked while this holder has the lock
    assert entered.wait(10)  # and gets it once released
    thread.join()
    assert (tmp_path / "timing.cache.lock").exists() and not shared.exists()
