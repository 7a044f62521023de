"""``virchow-rt slides``: many slides -> one ``.h5`` each in this process, resumable, failures isolated.

A rerun skips every slide whose ``.h5`` is complete and valid for this model and these settings (checked,
not just present) and redoes the rest. A slide that cannot be read is reported with its reason, leaves no
file, and does not stop the others; the exit code is then 1. Each slide is one
:class:`~virchow_rt.slides.task.SlideTask` of the run's :class:`~virchow_rt.slides.job.SlideJob`, the next
slides prepared while the model runs one (:func:`~virchow_rt.slides.cohort.embed_cohort`), read from local
copies with ``cache_dir`` (:class:`~virchow_rt.slides.cache.SlideCache`); the run ends by rebuilding
``summary.json`` (:mod:`virchow_rt.slides.summary`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from virchow_rt.backends.base import Backend
from virchow_rt.errors import warn_random_weights
from virchow_rt.files import check_output
from virchow_rt.slides import folder
from virchow_rt.slides.cache import SlideCache
from virchow_rt.slides.cohort import embed_cohort
from virchow_rt.slides.coords import check_source
from virchow_rt.slides.job import SlideJob
from virchow_rt.slides.reader import keyed_slides
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import SlideRecord, now, write_summary


def process_slides(
    slides: Sequence[str | Path],
    model: str | Path | Backend,
    out_dir: str | Path,
    settings: SlideSettings | None = None,
    *,
    backend: str = "auto",
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Embed every slide into ``out_dir/<key>.h5`` and rebuild ``out_dir/summary.json``; returns the summary.

    ``model`` is an exported model file or folder (opened with ``backend``), or an open :class:`Backend` or
    ``Embedder``. Complete, valid files for this model and these settings are skipped; failures are recorded,
    not raised. The summary's ``this_run`` says what this run did with each slide given. A slide's key is its
    name, or with ``settings.mirror_folders`` its path under the folder given (:func:`keyed_slides`).
    """
    settings = settings or SlideSettings()
    settings.check()
    keyed = keyed_slides(slides, settings.recursive, settings.mirror_folders)
    paths = list(keyed)
    if settings.coords:
        check_source(settings.coords, paths)
    out_dir = check_output(out_dir, "--out", folder=True)  # before any work; made once there is work
    folder.check_layout(out_dir, keyed, settings)  # files leading out of --out, or shared: refused now
    started, wall0 = now(), time.perf_counter()
    records: list[SlideRecord] = []
    with SlideJob.opened(model, out_dir, settings, backend) as job:
        with folder.writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)  # only now: a model that fails to open leaves none
            folder.claim(out_dir, job.config)
        info = job.embedder.info
        if info.random_weights:
            warn_random_weights(
                f"{info.variant} has random weights; every output is labelled random_weights=true"
            )

        def summarize() -> dict[str, Any]:
            # also after an interrupt: the summary lists every slide given, what was done and what was not
            left = paths[len(records) :]
            records.extend(SlideRecord.for_slide(p, keyed[p], status="not started") for p in left)
            with folder.writing(out_dir):
                return write_summary(
                    out_dir, records, job.settings, job.model_entry, started, time.perf_counter() - wall0
                )

        try:
            with contextlib.ExitStack() as stack:
                cache = None
                if settings.cache_dir:  # copies ahead of the slides prepared ahead, and of the one in use
                    ahead = settings.prefetch_slides + 2
                    made = SlideCache(settings.cache_dir, paths, size=settings.cache_size, ahead=ahead,
                                      skip=lambda path: job.is_complete(path, keyed[path]))  # fmt: skip
                    cache = stack.enter_context(made)
                embed_cohort(job, keyed, records, log, warn, cache)
        except BaseException:
            with contextlib.suppress(Exception):  # what stopped the run is what the user must read
                summarize()
            raise
        return summarize()
