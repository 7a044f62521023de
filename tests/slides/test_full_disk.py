"""A full disk stops the run with one line and keeps every finished slide: whether the OS says so, HDF5 says
so in its own words, the room is missing before the file is begun, or the run's own files cannot be
written; the summary written on the way out never replaces the reason the run stopped."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from slide_helpers import FakeBackend

from virchow_rt.errors import OutputError
from virchow_rt.slides import SlideSettings, features, local, process_slides, writer
from virchow_rt.slides.writer import check_complete

QUIET = {"log": lambda s: None, "warn": lambda s: None}
# what h5py raises when HDF5 meets a full disk while flushing or closing (its text, on one line here)
HDF5_FULL = (
    "Can't decrement id ref count (file write failed: time = Tue Dec  1 10:00:00 2026\n, filename = "
    "'/out/.s1.h5.x.partial', file descriptor = 7, errno = 28, error message = 'No space left on device', "
    "buf = 0x55d0c0, total write size = 1048576, bytes this sub-write = 1048576, bytes actually written = "
    "18446744073709551615, offset = 0)"
)


@pytest.fixture
def slides(make_slide) -> list[Path]:
    return [make_slide(f"s{i}.tif", seed=i).path for i in range(3)]


def full_on(name: str, error: BaseException):
    """``FeatureWriter.finish`` that raises ``error`` for slide ``name`` (as HDF5's flush on a full disk)."""
    real = writer.FeatureWriter.finish

    def finish(self, *args, **kwargs):  # noqa: ANN001, ANN202 - FeatureWriter.finish's signature
        if self.path.name.startswith(f".{name}.h5"):
            raise error
        return real(self, *args, **kwargs)

    return finish


@pytest.mark.parametrize(
    "error",
    [RuntimeError(HDF5_FULL), OSError(f"Unable to synchronously flush file ({HDF5_FULL})")],
    ids=["h5py-runtime-error", "h5py-os-error-without-errno"],
)
def test_hdf5s_own_words_for_a_full_disk_stop_the_run_in_one_line(slides, tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    monkeypatch.setattr(writer.FeatureWriter, "finish", full_on("s1", error))
    with pytest.raises(
        OutputError, match=rf"disk holding {out} is full .*s1\.h5.*rerun the same command"
    ) as err:
        process_slides(slides, FakeBackend(), out, SlideSettings(batch_size=4), **QUIET)
    assert "\n" not in str(err.value)
    assert check_complete(out / "s0.h5", {}) is None and not (out / "s1.h5").exists()
    assert not (out / "s2.h5").exists() and not list(out.glob(".*"))  # nothing half-made, no lock left


class ClosingFails:
    """An h5py file after HDF5 met a full disk: every later close raises again."""

    def __init__(self, real):  # noqa: ANN001
        self.real = real

    def close(self) -> None:
        self.real.close()
        raise RuntimeError(HDF5_FULL)


def test_a_file_that_cannot_be_closed_after_a_full_disk_stops_in_one_line(slides, tmp_path, monkeypatch):
    """HDF5 fails a write on a full disk and then every close of that file: the run still stops with the
    one line, and its temporary file and lock are removed (the close's error used to replace it all)."""
    out, real = tmp_path / "out", writer.FeatureWriter.append

    def append(self, coords, features):  # noqa: ANN001, ANN202
        if self.path.name.startswith(".s1.h5"):
            self._file = ClosingFails(self._file)
            raise OSError(errno.ENOSPC, f"Can't synchronously write data ({HDF5_FULL})")
        return real(self, coords, features)

    monkeypatch.setattr(writer.FeatureWriter, "append", append)
    with pytest.raises(OutputError, match=r"disk holding .* is full .*s1\.h5") as err:
        process_slides(slides, FakeBackend(), out, SlideSettings(batch_size=4), **QUIET)
    assert "\n" not in str(err.value)
    assert check_complete(out / "s0.h5", {}) is None and not list(out.glob(".*"))  # no .partial, no lock


@pytest.mark.parametrize("full", ["before the file", "while it is written"])
def test_a_disk_without_room_for_the_rest_of_the_file_stops_before_hdf5_meets_it(
    slides, tmp_path, monkeypatch, full
):
    out, made, writes = tmp_path / "out", [], []
    real_usage, real_init, real_append = (
        shutil.disk_usage,
        writer.FeatureWriter.__init__,
        writer.FeatureWriter.append,
    )

    def usage(path):  # noqa: ANN001, ANN202
        found = real_usage(path)
        return found._replace(free=1 << 20) if full == "before the file" or writes else found

    def init(self, path, *args, **kwargs):  # noqa: ANN001, ANN202
        made.append(Path(path).name)
        real_init(self, path, *args, **kwargs)

    def append(self, *args):  # noqa: ANN001, ANN202
        writes.append(self.path.name)
        real_append(self, *args)

    monkeypatch.setattr(features.shutil, "disk_usage", usage)
    monkeypatch.setattr(writer.FeatureWriter, "__init__", init)
    monkeypatch.setattr(writer.FeatureWriter, "append", append)
    with pytest.raises(OutputError, match=r"is full .*s0\.h5 \(the file still needs about .* MiB and 16 MiB"):
        process_slides(slides, FakeBackend(), out, SlideSettings(batch_size=4), **QUIET)
    assert len(made) == (0 if full == "before the file" else 1) and len(writes) <= 1  # stopped at once
    assert not list(out.glob("*.h5")) and not list(out.glob(".*"))  # no file, no temporary file, no lock


def test_the_summary_on_the_way_out_never_replaces_why_the_run_stopped(slides, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(writer.FeatureWriter, "finish", full_on("s1", RuntimeError(HDF5_FULL)))

    def no_room(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local, "write_summary", no_room)
    with pytest.raises(OutputError, match=r"disk holding .* is full .*s1\.h5"):
        process_slides(slides, FakeBackend(), out, SlideSettings(batch_size=4), **QUIET)


def test_the_runs_own_files_unwritable_is_one_line(slides, tmp_path, monkeypatch):
    """The summary after every slide went well, and the folder's claim before any: one line each."""
    out = tmp_path / "out"

    def no_room(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local, "write_summary", no_room)
    with pytest.raises(OutputError, match=rf"cannot write in --out {out} \(No space left on device\); free"):
        process_slides(slides[:1], FakeBackend(), out, SlideSettings(batch_size=4), **QUIET)
    assert check_complete(out / "s0.h5", {}) is None  # the slide itself is kept

    monkeypatch.setattr(local.folder, "_create", no_room)
    with pytest.raises(OutputError, match=r"cannot write in --out .*No space left on device"):
        process_slides(slides[:1], FakeBackend(), tmp_path / "other", SlideSettings(batch_size=4), **QUIET)


def test_a_failed_slides_reason_is_one_line(slides, tmp_path, monkeypatch):
    from virchow_rt.slides import task

    real = task.SlideTask._open

    def bad_open(self, read_ahead):  # noqa: ANN001, ANN202
        if self.path.stem == "s1":
            raise ValueError("first line\nsecond line\n  third")
        return real(self, read_ahead)

    monkeypatch.setattr(task.SlideTask, "_open", bad_open)
    summary = process_slides(slides, FakeBackend(), tmp_path / "out", SlideSettings(batch_size=4), **QUIET)
    reasons = {s["name"]: s["reason"] for s in summary["slides"] if s["status"] == "failed"}
    assert reasons == {"s1": "ValueError: first line second line third"}


def test_the_file_is_on_disk_before_it_is_renamed_into_place(slides, tmp_path, monkeypatch):
    from virchow_rt.slides import task

    synced: list[str] = []
    real_replace = task.os.replace

    def replace(src, dst):  # noqa: ANN001, ANN202 - os.replace is the module's: other files pass too
        real_replace(src, dst)
        if Path(dst).suffix == ".h5":
            synced.append(f"renamed {Path(dst).name}")

    def fsync(path: Path) -> None:
        synced.append(("folder " if path.is_dir() else "") + path.name)

    monkeypatch.setattr(task, "fsync_path", fsync)
    monkeypatch.setattr(task.os, "replace", replace)
    process_slides(slides[:1], FakeBackend(), tmp_path / "out", SlideSettings(batch_size=4), **QUIET)
    assert synced[1:] == ["renamed s0.h5", "folder out"] and synced[0].startswith(".s0.h5.")


def test_a_full_disk_at_a_slides_lock_stops_in_one_line_and_leaves_no_lock(slides, tmp_path, monkeypatch):
    """The lock is created (an inode) but its record cannot be written: the empty lock used to stay and
    keep every rerun off the slide until its lease ran out."""
    from virchow_rt.slides import locks

    out, real, records = tmp_path / "out", locks.json, []

    class FullAtTheSecondLock:  # locks' own json: the first lock (s0's) is written, the second is not
        loads = staticmethod(real.loads)

        @staticmethod
        def dump(record, fh):  # noqa: ANN001, ANN205
            records.append(record)
            if len(records) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real.dump(record, fh)

    monkeypatch.setattr(locks, "json", FullAtTheSecondLock)
    with pytest.raises(OutputError, match=rf"cannot write in --out {out} \(No space left on device\)"):
        process_slides(slides, FakeBackend(), out, SlideSettings(batch_size=4), **QUIET)
    assert not list(out.glob(".*.lock")) and check_complete(out / "s0.h5", {}) is None


@pytest.mark.parametrize("closing", ["closes", "fails to close"])
def test_a_ray_job_stopped_says_why_whatever_its_pool_and_summary_do(tmp_path, monkeypatch, closing):
    """--ray: the driver's pool fails to close (its cluster gone) and the summary cannot be written: the
    user still reads what stopped the run."""
    from virchow_rt.slides import ray as ray_job

    class Pool:
        def __init__(self, *args):  # noqa: ANN002
            self.records, self.lost = {}, 0

        def start(self) -> dict:
            return {"config": {"encoder": "fake"}, "random_weights": False, "settings": None, "model": None}

        def run(self) -> None:
            raise OutputError("the disk holding out is full")

        def close(self) -> None:
            if closing == "fails to close":
                raise RuntimeError("ray: GCS connection lost")

        def live(self) -> int:
            return 0

    def no_room(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ray_job, "RayPool", Pool)
    monkeypatch.setattr(ray_job, "write_summary", no_room)
    with pytest.raises(OutputError, match="the disk holding out is full"):
        ray_job._run_job(None, [], {}, tmp_path / "out", print, print)

    # every slide done, the pool fails to close: the summary is still written, with one warning
    monkeypatch.setattr(Pool, "run", lambda self: None)
    monkeypatch.setattr(ray_job, "write_summary", lambda *args: {"written": True})
    warned: list[str] = []
    assert ray_job._run_job(None, [], {}, tmp_path / "out", print, warned.append) == {"written": True}
    assert len(warned) == (closing == "fails to close")


@pytest.mark.parametrize("err", [errno.EACCES, errno.ENOSPC])
def test_a_qc_picture_that_cannot_be_written_leaves_its_slide_done(slides, tmp_path, monkeypatch, err):
    """The picture is written after the .h5 is in place: failing there is the slide's warning (it used to
    record a complete slide as failed, or stop the run saying its temporary file was removed)."""
    real = features.SlideFeatures.write_qc

    def write_qc(self):  # noqa: ANN001, ANN202
        if self.slide.name == "s1":
            raise OSError(err, os.strerror(err))
        return real(self)

    monkeypatch.setattr(features.SlideFeatures, "write_qc", write_qc)
    out = tmp_path / "out"
    summary = process_slides(slides, FakeBackend(), out, SlideSettings(batch_size=4, qc=True), **QUIET)
    records = {s["name"]: s for s in summary["slides"]}
    assert [r["status"] for r in records.values()] == ["done"] * 3
    assert records["s1"]["warnings"] == [
        f"its QC picture was not written ([Errno {err}] {os.strerror(err)}); the features are complete"
    ]
    assert check_complete(out / "s1.h5", {}) is None and not (out / "s1.qc.png").exists()
    assert (out / "s0.qc.png").exists() and (out / "s2.qc.png").exists()


def test_a_slide_too_large_for_what_is_free_fails_alone(slides, tmp_path, monkeypatch):
    """Above the 16 MiB kept free but short of what one slide needs: that slide fails with the numbers,
    the run goes on (a smaller slide may fit); it used to stop every run at that slide."""
    real = shutil.disk_usage

    def usage(path):  # noqa: ANN001, ANN202
        return real(path)._replace(free=features.DISK_MARGIN + 1)

    monkeypatch.setattr(features.shutil, "disk_usage", usage)
    summary = process_slides(slides, FakeBackend(), tmp_path / "out", SlideSettings(batch_size=4), **QUIET)
    assert [s["status"] for s in summary["this_run"]] == ["failed"] * 3
    assert summary["slides"][1]["reason"].startswith("its features need about 0.0 MiB and 16.0 MiB are free")
    assert not list((tmp_path / "out").glob("*.h5")) and not list((tmp_path / "out").glob(".*"))


@pytest.mark.parametrize(
    ("err", "fix"),
    [(errno.ENOSPC, "free some space"), (errno.EACCES, "fix the folder's permissions"),
     (errno.EROFS, "give a writable --out"), (errno.ENAMETOOLONG, "fix that")],
)  # fmt: skip
def test_the_runs_own_files_say_which_file_and_the_fix_for_that_error(tmp_path, err, fix):
    from virchow_rt.slides import folder

    with pytest.raises(OutputError) as raised, folder.writing(tmp_path):
        raise OSError(err, os.strerror(err), str(tmp_path / "summary.json"))
    assert str(raised.value) == (
        f"cannot write in --out {tmp_path} ({tmp_path / 'summary.json'}: {os.strerror(err)}); {fix}, then "
        "rerun the same command to resume"
    )
