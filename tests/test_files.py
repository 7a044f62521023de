"""File helpers shared by every writer: atomic replacement and the lock for shared read-merge-write files."""

from __future__ import annotations

import json
import os
import threading

import pytest

from virchow_rt import files
from virchow_rt.files import atomic_path, file_lock, write_json


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


def test_json_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """A power cut must leave the old manifest or the new one, never an empty file (issue 20, item 12)."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src: os.PathLike, dst: os.PathLike) -> None:
        events.append(("replace", os.fspath(dst)))
        replace(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the file an fsync flushed")
    monkeypatch.setattr(files.os, "fsync", record_fsync)
    monkeypatch.setattr(files.os, "replace", record_replace)
    target = tmp_path / "manifest.json"
    write_json(target, {"artifacts": []})
    assert json.loads(target.read_text()) == {"artifacts": []}
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".manifest.json."))  # the data, before the rename
    assert events[2][1] == str(tmp_path)  # the folder holding the new name, after it


def test_json_lines_keep_every_whole_line_and_drop_a_torn_last_one(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert files.read_json_lines(path) == []  # nothing written yet
    files.append_json_line(path, {"row": 1, "name": "a\nb"})
    files.append_json_line(path, [2.5])
    with open(path, "a") as fh:
        fh.write('{"row": 3, "tiles_per')  # its writer killed mid-line
    assert files.read_json_lines(path) == [{"row": 1, "name": "a\nb"}, [2.5]]
    path.write_text('{"row": 1}\nnot json\n{"row": 3}\n')
    with pytest.raises(ValueError, match="rows.jsonl, line 2: not JSON"):
        files.read_json_lines(path)


def test_salvaged_json_lines_skip_and_count_a_damaged_line_and_keep_the_rest(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert files.salvage_json_lines(path) == ([], [])
    # a damaged line 2; the last line still being written
    path.write_text('{"row": 1}\nnot json\n\n{"row": 3}\n{"row": 4, "tiles')
    found, bad = files.salvage_json_lines(path)
    assert found == [{"row": 1}, {"row": 3}] and [number for number, _ in bad] == [2]


def _lock_error(path) -> str:
    with pytest.raises(files.OutputError) as err, files.exclusive_lock(path, "busy"):
        pytest.fail("locked")
    assert "\n" not in str(err.value) and f"lock file {path} (" in str(err.value)
    return str(err.value)


def test_exclusive_lock_follows_no_symbolic_link(tmp_path):
    (tmp_path / ".lock").symlink_to(tmp_path / "target")  # dangling: opening it for writing creates target
    assert "(a symbolic link): delete it if no run is using it" in _lock_error(tmp_path / ".lock")
    assert not (tmp_path / "target").exists() and (tmp_path / ".lock").is_symlink()


def test_exclusive_lock_refuses_a_fifo_or_folder_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    found: dict[str, str] = {}
    worker = threading.Thread(target=lambda: found.update(fifo=_lock_error(tmp_path / "fifo")), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "opening a FIFO as the lock blocked"
    assert "(not a regular file: a pipe or device)" in found["fifo"]
    assert "Is a directory" in _lock_error(tmp_path / "folder")
    assert (tmp_path / "fifo").exists() and (tmp_path / "folder").is_dir()


def test_exclusive_lock_of_another_user_is_one_line(tmp_path, monkeypatch):
    lock, real_open = tmp_path / ".lock", os.open

    def denied(path, *args, **kwargs):  # as a lock file another user left (root may open anything)
        if os.fspath(path) == os.fspath(lock):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", denied)
    assert "(Permission denied): delete it if no run is using it, or write elsewhere" in _lock_error(lock)


def test_exclusive_lock_is_held_then_removed(tmp_path):
    lock = tmp_path / ".lock"
    with files.exclusive_lock(lock, "another run holds it"):
        assert lock.is_file()
        with pytest.raises(files.OutputError, match="^another run holds it$"):
            with files.exclusive_lock(lock, "another run holds it"):
                pytest.fail("locked twice")
    assert not lock.exists()
