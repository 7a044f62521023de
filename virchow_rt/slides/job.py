"""One slide -> one ``<out>/<slide>.h5``: the job every slide of a run shares, local or on a Ray worker.

A :class:`SlideJob` holds what the slides of a run have in common: the model (an
:class:`~virchow_rt.embed.Embedder` over the open backend), its identity as every output records it, the
settings (pooling resolved to the model's own) and the root attributes a complete file must carry.
:meth:`SlideJob.run` turns one slide into a :class:`~virchow_rt.slides.summary.SlideRecord`: skipped when its
file is complete and valid for this run, left to another run that holds its lock, failed alone (a bad slide
never stops the others), or embedded into a temporary file under the lock's lease and renamed into place
only while the lease is still this run's. The lock holder records the outcome in the slide's state file.
The only files removed are this run's own temporary file and that of a run whose process ended on this
machine holding the slide; a file another run made (an older ``.h5`` included) is never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virchow_rt.backends.base import Backend
from virchow_rt.embed import Embedder
from virchow_rt.errors import MissingDependency, OutputError, VirchowError
from virchow_rt.files import current_umask
from virchow_rt.slides import folder, locks, summary
from virchow_rt.slides.embed import opened_backend
from virchow_rt.slides.features import ModelIdentity, embed_to_file
from virchow_rt.slides.grid import grid_name
from virchow_rt.slides.locks import Lease, LeaseLost
from virchow_rt.slides.reader import open_slide
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import ModelEntry, SlideRecord
from virchow_rt.slides.writer import FORMAT_VERSION, resume_problem, stored_counts

Log = Callable[[str], None]


class SlideJob:
    """What every slide of one run shares; :meth:`run` does one slide. The embedder stays the caller's."""

    def __init__(self, embedder: Embedder, identity: ModelIdentity, settings: SlideSettings, out_dir: Path):
        info = embedder.info
        self.embedder, self.identity, self.out_dir = embedder, identity, Path(out_dir)
        self.settings = dataclasses.replace(settings, pooling=settings.pooling or info.pooling)
        self.dim = embedder.embedding_dim(self.settings.pooling)
        s = self.settings
        #: root attributes a complete file of this run must carry (anything else changed -> redo)
        self.expected: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model_sha256": identity.sha256,
            "pooling": s.pooling,
            "embedding_dim": self.dim,
            "patch_size": s.tile_size,
            "target_mpp": float(s.grid_mpp),
            "min_tissue": float(s.min_tissue),
            "regions": s.regions_text,
            "grid_rule": grid_name(s.grid, s.edge_tiles),
            "coords_source": str(s.coords or ""),
        }
        if s.coords:  # the coords file sets the target (a given --mpp is checked against it)
            del self.expected["target_mpp"]

    @classmethod
    @contextlib.contextmanager
    def opened(
        cls,
        model: str | Path | Backend | Any,
        out_dir: str | Path,
        settings: SlideSettings,
        backend: str = "auto",
    ) -> Iterator[SlideJob]:
        """The job with ``model`` open: a model file or export folder (opened with ``backend`` and closed
        after), or an open :class:`Backend` or ``Embedder`` (kept open)."""
        with (
            opened_backend(model, backend) as runner,
            Embedder(runner, batch_size=settings.batch_size) as emb,
        ):
            yield cls(emb, ModelIdentity.of(model, runner), settings, Path(out_dir))

    @property
    def config(self) -> dict[str, Any]:
        """The output folder's configuration (``run_config.json``, see :mod:`virchow_rt.slides.folder`)."""
        return {"encoder": self.embedder.info.variant, **self.expected}

    @property
    def model_entry(self) -> ModelEntry:
        info = self.embedder.info
        return ModelEntry(
            file=self.identity.file,
            sha256=self.identity.sha256,
            variant=info.variant,
            precision=info.precision,
            backend=self.embedder.backend.name,
            random_weights=bool(info.random_weights),
            weights_sha256=info.weights_sha256,
            embedding_dim=self.dim,
            pooling=str(self.settings.pooling),
        )

    def output(self, path: Path) -> Path:
        return self.out_dir / f"{path.stem}.h5"

    def run(self, path: Path, prefix: str, log: Log, warn: Log, worker: str | None = None) -> SlideRecord:
        """One slide under its lock; the record says how it went (done, skipped, failed or locked)."""
        record = SlideRecord.for_slide(path, host=socket.gethostname(), worker=worker)
        slide = _Attempt(path, self.output(path), record, prefix, log, warn)
        try:  # the file size tells another slide of the same name apart (its .h5 would be taken)
            wanted = {**self.expected, "slide_size_bytes": path.stat().st_size}
        except OSError as err:  # gone since it was listed, or not on this node's filesystem
            record.status, record.reason = "failed", f"cannot read {path} here ({err.strerror or err})"
            warn(f"{prefix}: FAILED: {record.reason}")
            return record
        with locks.held(slide.out, warn, self.settings.lock_lease) as (lease, other):
            if lease is None:  # another run is writing this slide: leave it to that run
                record.status = "locked"
                record.reason = f"another run is writing it ({other.describe() if other else '?'})"
                log(f"{prefix}: {record.reason}; skipped here")
                return record
            slide.lease = lease
            try:
                self._under_lock(slide, wanted)
            except LeaseLost as err:  # nothing of the other run's was touched; our temporary file is gone
                record.status, record.reason = "locked", str(err)
                warn(f"{prefix}: {record.reason}")
            except BaseException:
                if record.status == "pending":  # stopped mid-slide: its state says so (best effort)
                    record.status, record.reason = "interrupted", "the run was stopped; rerun to resume"
                    with contextlib.suppress(Exception):
                        self._save_state(slide)
                raise
        return record

    def _under_lock(self, slide: _Attempt, wanted: dict[str, Any]) -> None:
        lease, record, out = slide.held, slide.record, slide.out
        if lease.replaced_gone and lease.replaced is not None and lease.replaced.token:
            # the temporary file of the run whose process ended here holding this slide: nobody's now
            _partial(out, lease.replaced.token).unlink(missing_ok=True)
        if self._skip_complete(slide, wanted):
            self._write_pt(out)
            state = summary.read_state(self.out_dir, record.name)
            if state is None or state.status != "done":  # "done" keeps its record (and timings)
                self._save_state(slide)
            return
        try:
            self._process(slide)
        except (MissingDependency, LeaseLost):
            raise  # every other slide would fail the same way / the slide is another run's now
        except Exception as err:  # noqa: BLE001 - one bad slide must not stop the others
            if _disk_full(err):  # every slide after it would fail the same way: stop
                raise OutputError(
                    f"the disk holding {self.out_dir} is full (or over quota) while writing {out.name}; its "
                    "temporary file was removed and finished slides are kept: free some space and rerun the "
                    "same command to resume"
                ) from err
            record.status = "failed"
            # our errors carry a full sentence; anything else gets its type, so it reads
            record.reason = str(err) if isinstance(err, VirchowError) else f"{type(err).__name__}: {err}"
            slide.warn(f"{slide.prefix}: FAILED: {record.reason}")
            self._save_state(slide)
            return
        self._write_pt(out)
        self._save_state(slide)
        t = record.timings
        skipped = f", {record.skipped_tiles} unreadable tiles skipped" if record.skipped_tiles else ""
        slide.log(
            f"{slide.prefix}: {record.embedded_tiles} tiles{skipped} in {t['total_s']:.1f} s "
            f"({record.tiles_per_s or 0:.1f} tiles/s; read {t['read_s']:.1f} s over workers, "
            f"waited {t['read_wait_s']:.1f} s, model {t['embed_s']:.1f} s) -> {out}"
        )

    def _save_state(self, slide: _Attempt) -> None:
        slide.held.check()  # never over the state of a run that took the slide over
        try:
            summary.write_state(self.out_dir, slide.record)
        except OSError as err:
            raise OutputError(
                f"cannot write the state of {slide.record.name} in {self.out_dir / summary.STATES_DIR} "
                f"({err}); free some space or fix the folder's permissions, then rerun to resume"
            ) from err

    def _write_pt(self, out: Path) -> None:
        if self.settings.also_pt and not (self.out_dir / "pt_files" / f"{out.stem}.pt").exists():
            folder.write_pt(self.out_dir, out)  # from the complete .h5, no model run

    def _skip_complete(self, slide: _Attempt, wanted: dict[str, Any]) -> bool:
        """True (the record says so) when the file is complete and valid for this run; else note the redo."""
        out, record = slide.out, slide.record
        if not out.exists():
            return False
        reason = resume_problem(out, wanted, self.settings.slide_mpp)
        if reason is None:
            record.status, record.output = "skipped", str(out)
            record.tiles, record.regions = stored_counts(out)
            slide.log(f"{slide.prefix}: complete, skipped ({record.tiles} tiles in {out.name})")
            return True
        if record.redone_because is None:
            record.redone_because = f"{out.name} {reason}"
            slide.log(f"{slide.prefix}: redoing, {out.name} {reason}")
        return False

    def _process(self, attempt: _Attempt) -> None:
        s, record, path = self.settings, attempt.record, attempt.path
        start = time.perf_counter()
        with open_slide(path, slide_mpp=s.slide_mpp, reader=s.reader) as slide:
            record.reader, record.level0_mpp = slide.reader, slide.mpp
            mpp = s.grid_mpp
            if not s.coords and mpp < slide.mpp * 0.99:  # finer than the scan: every tile an upsampled one
                record.warnings.append(
                    f"--mpp {mpp:g} is finer than the scan ({slide.mpp:.4g} µm/px): tiles are upsampled "
                    f"{slide.mpp / mpp:.2g}x; use --mpp {slide.mpp:.4g} or coarser"
                )
                attempt.warn(f"{path.name}: warning: {record.warnings[-1]}")
            record.timings["open_s"] = time.perf_counter() - start
            qc = self.out_dir / f"{path.stem}.qc.png" if s.qc else None
            with _temporary(attempt.out, attempt.held) as tmp:
                show = sys.stderr.isatty() if s.progress is None else s.progress
                embed_to_file(slide, self.embedder, s, self.identity, tmp, record, qc=qc,
                              check=attempt.held.raise_if_lost, progress=show)  # fmt: skip
        record.timings["total_s"] = total = time.perf_counter() - start
        record.status, record.output = "done", str(attempt.out)
        record.tiles_per_s = record.embedded_tiles / total if total > 0 else None


@dataclass
class _Attempt:
    """One slide being run: where it goes, its record, where its lines go, and its lock once held."""

    path: Path
    out: Path
    record: SlideRecord
    prefix: str
    log: Log
    warn: Log
    lease: Lease | None = None

    @property
    def held(self) -> Lease:
        assert self.lease is not None, "the slide's lock is not held"
        return self.lease


def _partial(out: Path, token: str) -> Path:
    """The temporary file of ``out`` written under the lease ``token`` (only that lease's run makes it)."""
    return out.with_name(f".{out.name}.{token}.partial")


@contextlib.contextmanager
def _temporary(out: Path, lease: Lease) -> Iterator[Path]:
    """A temporary file for ``out``, renamed onto it if the block succeeds and the lease is still ours."""
    tmp = _partial(out, lease.token)
    try:
        yield tmp
        lease.check()  # another run took the slide over while this one was stopped: leave its file alone
        # the file gets the permissions a plain open() would give it
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # ours: its name holds this lease's token


def _disk_full(err: BaseException | None) -> bool:
    """True when ``err`` (or what caused it: h5py wraps the OS error) says the disk is full or over quota."""
    while err is not None:
        if isinstance(err, OSError) and (
            err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False
