"""One slide -> one ``<out>/<key>.h5``: the job every slide of a run shares, local or on a Ray worker.

A slide's key is its name, or with ``--mirror-folders`` its path under the folder given, without the suffix
(:func:`~virchow_rt.slides.reader.keyed_slides`): its files in ``--out``, its state and record follow it.

A :class:`SlideJob` holds what the slides of a run have in common: the model (an
:class:`~virchow_rt.embed.Embedder` over the open backend), its identity as every output records it, the
settings (pooling resolved to the model's own) and the root attributes a complete file must carry.
:meth:`SlideJob.run` turns one slide into a :class:`~virchow_rt.slides.summary.SlideRecord`: skipped when its
file is complete and valid for this run, left to another run that holds its lock, failed alone (a bad slide
never stops the others), or embedded into a temporary file under the lock's lease and renamed into place
only while the lease is still this run's. The lock holder records the outcome in the slide's state file.
:meth:`SlideJob.prepare` gives the same work as a :class:`~virchow_rt.slides.task.SlideTask` in three
stages (prepare, embed, finish), which a cohort overlaps across slides (:mod:`virchow_rt.slides.cohort`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from virchow_rt.backends.base import Backend
from virchow_rt.embed import Embedder
from virchow_rt.errors import VirchowError
from virchow_rt.slides.coords import coords_sha256
from virchow_rt.slides.embed import opened_backend
from virchow_rt.slides.features import ModelIdentity
from virchow_rt.slides.grid import grid_name
from virchow_rt.slides.reader import slide_file
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import ModelEntry, SlideRecord
from virchow_rt.slides.task import SlideTask
from virchow_rt.slides.writer import FORMAT_VERSION, resume_problem

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
        mirror = self.settings.mirror_folders  # where each slide's files are: one layout per folder
        return {"encoder": self.embedder.info.variant, **self.expected, "mirror_folders": mirror}

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

    def output(self, key: str) -> Path:
        """``<out>/<key>.h5`` of the slide with key ``key`` (:func:`~virchow_rt.slides.reader.keyed_slides`),
        refused (:class:`~virchow_rt.errors.InputError`) unless it stays inside ``--out``."""
        return slide_file(self.out_dir, key, ".h5")

    def wanted(self, path: Path, key: str | None = None) -> dict[str, Any]:
        """The root attributes ``path``'s complete file (that of ``key``, default its name) must carry
        (``OSError`` if it cannot be read; an :class:`~virchow_rt.errors.InputError` if its ``--coords`` file
        cannot)."""
        wanted = {**self.expected, "slide_size_bytes": path.stat().st_size}
        if self.settings.coords:  # the same path may hold new tiles since
            wanted["coords_sha256"] = coords_sha256(self.settings.coords, key or path.stem)
        return wanted

    def is_complete(self, path: Path, key: str | None = None) -> bool:
        """True when ``path``'s file (that of ``key``, default its name) is complete and valid for this run: a
        look without the lock (a hint, e.g. to copy no slide that will be skipped); :meth:`SlideTask.prepare`
        decides under the lock."""
        try:
            out = self.output(key or path.stem)
            if not out.exists():
                return False
            return resume_problem(out, self.wanted(path, key), self.settings.slide_mpp) is None
        except (OSError, VirchowError):
            return False

    def prepare(
        self,
        path: Path,
        prefix: str,
        log: Log,
        warn: Log,
        worker: str | None = None,
        *,
        read_from: Path | None = None,
        read_ahead: bool = True,
        attempts: int | None = None,
        key: str | None = None,
    ) -> SlideTask:
        """The slide's first stage (:meth:`SlideTask.prepare`): lock, resume check, open (``read_from``: a
        local copy to read instead), tiling, QC picture, first batches read ahead; then call ``embed`` and
        ``finish`` on the task (or ``close`` it to leave the slide untouched). ``key``: the slide's key
        (default: its name)."""
        task = SlideTask(self, path, prefix, log, warn, worker, read_from, attempts, key)
        return task.prepare(read_ahead)

    def run(
        self,
        path: Path,
        prefix: str,
        log: Log,
        warn: Log,
        worker: str | None = None,
        attempts: int | None = None,
        key: str | None = None,
    ) -> SlideRecord:
        """One slide under its lock, its stages one after another; the record says how it went (done,
        skipped, failed or locked). ``worker`` and ``attempts`` (a ``--ray`` run: which worker, and how
        many times the slide was handed to one) are recorded as given; ``key``: the slide's key."""
        task = self.prepare(path, prefix, log, warn, worker, read_ahead=False, attempts=attempts, key=key)
        task.embed()
        return task.finish()
