"""One slide of a job in three stages, so that a cohort can run them for different slides at once.

- :meth:`SlideTask.prepare` (any thread): the slide's lock, the resume check, the slide opened (from a local
  copy when one is given), its tissue mask, grid and QC picture (drawn, kept in memory), and its first
  batches read ahead.
- :meth:`SlideTask.embed` (the model's thread): the tiles through the model into the temporary file.
- :meth:`SlideTask.finish` (any thread): the file completed and renamed into place while the lease is still
  this run's, then its QC picture written, the slide's state and its line; then everything is released
  (:meth:`SlideTask.close`).

Each stage judges what it meets as one sequential step would: a slide that cannot be read fails alone (its
state says why), a full disk or a missing package stops the run, a lost lease leaves the slide to the run
that took it. What ``prepare`` meets is judged in ``embed``, and a slide's state is written in ``finish``
only: a run stopped before a prepared slide's turn leaves that slide's state and files as they were. The
only files removed are this run's own temporary file and that of a run whose process ended on this machine
holding the slide; a file another run made is never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from virchow_rt.embed import Embedder
from virchow_rt.errors import InputError, MissingDependency, OutputError, VirchowError
from virchow_rt.files import current_umask, fsync_path
from virchow_rt.slides import folder, locks, summary
from virchow_rt.slides.features import ModelIdentity, NoRoom, SlideFeatures
from virchow_rt.slides.locks import Lease, LeaseLost, partial_path
from virchow_rt.slides.reader import Slide, open_slide, slide_file
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import SlideRecord
from virchow_rt.slides.writer import resume_problem, stored_counts


class SlideJob(Protocol):
    """What a task reads of its :class:`~virchow_rt.slides.job.SlideJob` (a protocol, so that the job, which
    makes tasks, and the task do not import each other)."""

    settings: SlideSettings
    out_dir: Path
    embedder: Embedder
    identity: ModelIdentity

    def output(self, key: str) -> Path: ...

    def wanted(self, path: Path, key: str | None = None) -> dict[str, Any]: ...


Log = Callable[[str], None]


class SlideTask:
    """One slide of a :class:`~virchow_rt.slides.job.SlideJob` in stages: :meth:`prepare`, :meth:`embed`,
    :meth:`finish`.

    ``read_from``: a local copy of ``path`` to read instead (the file records ``path``). ``key``: the slide's
    key, which its files in ``--out`` and ``--coords`` and its record are named after (default: its name).
    ``record`` is the slide's :class:`SlideRecord`; :attr:`needs_model` says whether :meth:`embed` has work
    to do.
    """

    def __init__(
        self,
        job: SlideJob,
        path: Path,
        prefix: str,
        log: Log,
        warn: Log,
        worker: str | None = None,
        read_from: Path | None = None,
        attempts: int | None = None,
        key: str | None = None,
    ) -> None:
        self.key = key or path.stem
        self.job, self.path, self.out = job, path, job.output(self.key)
        self.prefix, self.log, self.warn = prefix, log, warn
        self.read_from = read_from or path
        self.record = SlideRecord.for_slide(path, self.key, host=socket.gethostname(), worker=worker,
                                            attempts=attempts)  # fmt: skip
        self.lease: Lease | None = None
        self._slide: Slide | None = None
        self._features: SlideFeatures | None = None
        self._error: Exception | None = None  # met while preparing: judged by embed(), in slide order
        self._tmp: Path | None = None
        self._busy_s = 0.0  # this slide's own stages from its opening on, not its wait for the model

    @property
    def needs_model(self) -> bool:
        """True while the slide is still to be embedded (nothing so far decided its outcome)."""
        return self.record.status == "pending"

    # --- stage 1 ---------------------------------------------------------------------------------------
    def prepare(self, read_ahead: bool = True) -> SlideTask:
        """Lock, resume check, open, tiling, QC picture and (``read_ahead``) the first batches read."""
        record = self.record
        try:  # the file size tells another slide of the same name apart (its .h5 would be taken)
            wanted = self.job.wanted(self.path, self.key)
        except OSError as err:  # gone since it was listed, or not on this node's filesystem
            record.status, record.reason = "failed", f"cannot read {self.path} here ({err.strerror or err})"
            self.warn(f"{self.prefix}: FAILED: {record.reason}")
            return self
        except InputError as err:  # its --coords file went missing or unreadable
            record.status, record.reason = "failed", " ".join(str(err).split())
            self.warn(f"{self.prefix}: FAILED: {record.reason}")
            return self
        with folder.writing(self.job.out_dir):  # a full disk, no permission: one line, no lock left
            self.out.parent.mkdir(parents=True, exist_ok=True)  # a mirrored sub-folder of --out
            lease, other = locks.acquire(self.out, self.warn, self.job.settings.lock_lease)
        if lease is None:  # another run is writing this slide: leave it to that run
            record.status = "locked"
            record.reason = f"another run is writing it ({other.describe() if other else '?'})"
            self.log(f"{self.prefix}: {record.reason}; skipped here")
            return self
        self.lease = lease
        try:
            if lease.replaced is not None and lease.replaced.token:
                # the temporary file of the lease taken over (its holder ended here, or its host went away,
                # or it was stopped past its lease): it can never be renamed into place, so it is nobody's
                partial_path(self.out, lease.replaced.token).unlink(missing_ok=True)
            if not self._skip_complete(wanted):
                self._open(read_ahead)
        except Exception as err:  # noqa: BLE001 - judged by embed(), on the model's thread, in slide order
            self._error = err
        except BaseException:  # stopped while preparing on the caller's thread (a sequential run)
            self.stop()
            raise
        return self

    def _skip_complete(self, wanted: dict[str, Any]) -> bool:
        """True (the record says so) when the file is complete and valid for this run; else note the redo."""
        out, record = self.out, self.record
        if not out.exists():
            return False
        reason = resume_problem(out, wanted, self.job.settings.slide_mpp)
        if reason is None:
            record.status, record.output = "skipped", str(out)
            record.tiles, record.regions = stored_counts(out)
            self.log(f"{self.prefix}: complete, skipped ({record.tiles} tiles in {out.name})")
            return True
        if record.redone_because is None:
            record.redone_because = f"{out.name} {reason}"
            self.log(f"{self.prefix}: redoing, {out.name} {reason}")
        return False

    def _open(self, read_ahead: bool) -> None:
        s, record, job = self.job.settings, self.record, self.job
        start = time.perf_counter()
        try:
            slide = self._slide = open_slide(self.read_from, slide_mpp=s.slide_mpp, reader=s.reader)
            record.reader, record.level0_mpp = slide.reader, slide.mpp
            mpp = s.grid_mpp
            if not s.coords and mpp < slide.mpp * 0.99:  # finer than the scan: every tile an upsampled one
                record.warnings.append(
                    f"--mpp {mpp:g} is finer than the scan ({slide.mpp:.4g} µm/px): tiles are upsampled "
                    f"{slide.mpp / mpp:.2g}x; use --mpp {slide.mpp:.4g} or coarser"
                )
                self.warn(f"{self.path.name}: warning: {record.warnings[-1]}")
            record.timings["open_s"] = time.perf_counter() - start
            qc = slide_file(job.out_dir, self.key, ".qc.png") if s.qc else None
            show = sys.stderr.isatty() if s.progress is None else s.progress
            assert self.lease is not None
            self._features = SlideFeatures(slide, job.embedder, s, job.identity, record, qc=qc,
                                           check=self.lease.raise_if_lost, progress=show, source=self.path,
                                           read_ahead=read_ahead, key=self.key)  # fmt: skip
        finally:
            self._busy_s += time.perf_counter() - start

    # --- stage 2 ---------------------------------------------------------------------------------------
    def embed(self) -> None:
        """Run the prepared slide through the model into its temporary file (nothing to do unless
        :attr:`needs_model`). Raises only what stops the run; the slide is then released."""
        if not self.needs_model:
            return
        start = time.perf_counter()
        try:
            self._judged(self._embed)
        except BaseException:
            self.stop()
            raise
        finally:
            self._busy_s += time.perf_counter() - start

    def _embed(self) -> None:
        if self._error is not None:
            raise self._error
        assert self.lease is not None and self._features is not None
        self._tmp = partial_path(self.out, self.lease.token)
        self._features.embed(self._tmp)

    # --- stage 3 ---------------------------------------------------------------------------------------
    def finish(self) -> SlideRecord:
        """Complete and rename the file, write the slide's state and its line, release everything; returns
        the record. Raises only what stops the run."""
        try:
            if self.lease is not None:  # nothing to finish for a slide that was unreadable or locked
                self._judged(self._finish)
        except BaseException:
            self.stop()
            raise
        finally:
            self.close()
        return self.record

    def _finish(self) -> None:
        record, out = self.record, self.out
        if record.status == "locked":  # its lease was lost: the slide is another run's now
            return
        if record.status == "skipped":
            self._write_pt()
            state = summary.read_state(self.job.out_dir, record.name)
            if state is None or state.status != "done":  # "done" keeps its record (and timings)
                self._save_state()
            return
        if record.status != "pending":  # failed: its state says why
            self._save_state()
            return
        start = time.perf_counter()
        assert self.lease is not None and self._features is not None and self._tmp is not None
        self._features.finish()
        self.lease.check()  # another run took the slide over while this one was stopped: leave its file alone
        fsync_path(self._tmp)  # on disk before it is renamed into place: a crash leaves it whole or absent
        os.chmod(self._tmp, 0o666 & ~current_umask())  # the permissions a plain open() would give it
        os.replace(self._tmp, out)
        fsync_path(out.parent)  # the rename itself on disk
        record.timings["total_s"] = total = self._busy_s + time.perf_counter() - start
        record.status, record.output = "done", str(out)
        record.tiles_per_s = record.embedded_tiles / total if total > 0 else None
        # only now: a QC picture is never left without its complete file; neither it nor the .pt undoes it
        self._beside(self._features.write_qc, "its QC picture")
        self._beside(self._write_pt, "its .pt file")
        self._save_state()
        t = record.timings
        skipped = f", {record.skipped_tiles} unreadable tiles skipped" if record.skipped_tiles else ""
        self.log(
            f"{self.prefix}: {record.embedded_tiles} tiles{skipped} in {t['total_s']:.1f} s "
            f"({record.tiles_per_s or 0:.1f} tiles/s; read {t['read_s']:.1f} s over workers, "
            f"waited {t['read_wait_s']:.1f} s, model {t['embed_s']:.1f} s) -> {out}"
        )

    def _beside(self, write: Callable[[], None], what: str) -> None:
        """Write a file beside the slide's complete ``.h5``; a failure is the slide's warning, not its end."""
        try:
            write()
        except (OSError, VirchowError) as err:
            reason = " ".join(str(err).split())
            self.record.warnings.append(f"{what} was not written ({reason}); the features are complete")
            self.warn(f"{self.prefix}: warning: {self.record.warnings[-1]}")

    def _judged(self, step: Callable[[], None]) -> None:
        """Run ``step``; a slide's own failure is recorded (the run goes on), a lost lease leaves the slide to
        the other run; a full disk or a missing package is raised (every later slide would fail so)."""
        record = self.record
        try:
            try:
                step()
            except (MissingDependency, LeaseLost):
                raise
            except Exception as err:  # noqa: BLE001 - one bad slide must not stop the others
                if not self.needs_model:
                    raise  # writing the outcome itself failed (its state file): as a sequential run
                if _disk_full(err):  # every slide after it would fail the same way: stop
                    detail = f" ({err.strerror})" if isinstance(err, NoRoom) else ""
                    raise OutputError(
                        f"the disk holding {self.job.out_dir} is full (or over quota) while writing "
                        f"{self.out.name}{detail}; its temporary file was removed and finished slides are "
                        "kept: free some space and rerun the same command to resume"
                    ) from err
                record.status = "failed"
                # our errors carry a full sentence; anything else gets its type, so it reads; one line
                reason = str(err) if isinstance(err, VirchowError) else f"{type(err).__name__}: {err}"
                record.reason = " ".join(reason.split())
                self.warn(f"{self.prefix}: FAILED: {record.reason}")
        except LeaseLost as err:  # nothing of the other run's was touched; our temporary file goes
            record.status, record.reason = "locked", str(err)
            self.warn(f"{self.prefix}: {record.reason}")

    def _save_state(self) -> None:
        assert self.lease is not None
        self.lease.check()  # never over the state of a run that took the slide over
        try:
            summary.write_state(self.job.out_dir, self.record)
        except OSError as err:
            raise OutputError(
                f"cannot write the state of {self.record.name} in {self.job.out_dir / summary.STATES_DIR} "
                f"({err}); free some space or fix the folder's permissions, then rerun to resume"
            ) from err

    def _write_pt(self) -> None:
        out_dir = self.job.out_dir
        if self.job.settings.also_pt and not folder.pt_path(out_dir, self.key).exists():
            folder.write_pt(out_dir, self.out, self.key)  # from the complete .h5, no model run

    # --- lifetime --------------------------------------------------------------------------------------
    def stop(self) -> None:
        """The run stops with this slide unfinished: its state says interrupted (best effort); release it."""
        if self.needs_model and self.lease is not None:
            self.record.status, self.record.reason = "interrupted", "the run was stopped; rerun to resume"
            with contextlib.suppress(Exception):
                self._save_state()
        with contextlib.suppress(Exception):  # what stopped the run is the error to read, not a close's
            self.close()

    def close(self) -> None:
        """Stop reading, remove this run's temporary file, close the slide, release the lock, each even if
        one before it fails (its error is raised after). Safe twice; a task closed before its turn leaves
        the slide as it found it (no state written)."""
        with contextlib.ExitStack() as steps:  # run last-in first-out: the lock is released last
            if self.lease is not None:
                steps.callback(self.lease.release)
            if self._slide is not None:
                steps.callback(self._slide.close)
            if self._tmp is not None:
                steps.callback(self._tmp.unlink, missing_ok=True)  # ours: its name holds this lease's token
            if self._features is not None:
                steps.callback(self._features.close)


#: how HDF5 reports a full disk in a RuntimeError's text ("... errno = 28, error message = 'No space ...'")
_FULL_DISK = re.compile(
    rf"No space left on device|Disk quota exceeded|errno = ({errno.ENOSPC}|{errno.EDQUOT})\b"
)


def _disk_full(err: BaseException | None) -> bool:
    """True when ``err`` (or what caused it) says the disk is full or over quota: an OS error, or h5py's
    ``RuntimeError``/``OSError`` that carries HDF5's text of it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, OSError | RuntimeError) and _FULL_DISK.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False
