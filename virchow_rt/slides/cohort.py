"""A cohort of slides through one model without the model waiting between slides.

Each slide is a :class:`~virchow_rt.slides.task.SlideTask` in three stages. While the model runs slide k
(on the caller's thread), a thread prepares the next ``prefetch_slides`` slides (lock, resume check, open,
tissue mask, grid, QC picture, first batches read) and another finishes slide k-1 (its file completed and
renamed, its state, its line). What is in flight stays bounded: one slide in the model, at most
``prefetch_slides`` prepared (each holding ``prefetch_batches`` batches and its reader's window), one being
finished. ``prefetch_slides=0`` runs the stages of one slide after another, as before.

Everything a user sees stays as a sequential run shows it: each slide's lines come out in slide order
(:class:`OrderedLines`), each slide's record and state say what a sequential run would say, and a run
stopped (Ctrl-C, a full disk) finishes the slide already embedded, marks the one in the model interrupted
and leaves the prepared ones untouched (their locks released, no state written). With a
:class:`~virchow_rt.slides.cache.SlideCache`, each slide is read from its local copy and the copy removed
once the slide is finished.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from virchow_rt.slides.cache import SlideCache
from virchow_rt.slides.job import SlideJob
from virchow_rt.slides.summary import SlideRecord
from virchow_rt.slides.task import SlideTask

Log = Callable[[str], None]


class OrderedLines:
    """The lines of slides handled at once, shown in slide order whichever thread writes them: a slide's
    lines wait until every slide before it is :meth:`done`, so the log reads as a sequential run's."""

    def __init__(self, log: Log, warn: Log) -> None:
        self._out = (log, warn)
        self._lock = threading.Lock()
        self._current = 0
        self._held: dict[int, list[tuple[bool, str]]] = {}
        self._closed = False

    def channel(self, index: int) -> tuple[Log, Log]:
        """(log, warn) of slide ``index``."""
        return (lambda line: self._line(index, False, line)), (lambda line: self._line(index, True, line))

    def _line(self, index: int, is_warning: bool, line: str) -> None:
        with self._lock:
            if self._closed:
                return
            if index == self._current:
                self._out[is_warning](line)
            else:
                self._held.setdefault(index, []).append((is_warning, line))

    def done(self, index: int) -> None:
        """Slide ``index`` has said all it will: the next slide's lines come out from now on."""
        with self._lock:
            self._current = max(self._current, index + 1)
            for is_warning, line in self._held.pop(self._current, []):
                self._out[is_warning](line)

    def close(self) -> None:
        """Drop the lines of slides whose turn never came (a stopped run: they are "not started")."""
        with self._lock:
            self._closed = True
            self._held.clear()


def embed_cohort(
    job: SlideJob,
    slides: Mapping[Path, str],
    records: list[SlideRecord],
    log: Log,
    warn: Log,
    cache: SlideCache | None = None,
) -> None:
    """Every slide of ``slides`` (path -> key, in order) through ``job``; each slide's record is appended to
    ``records`` when its turn comes (pending until it is finished). Raises what stops the run (Ctrl-C, a full
    disk, a missing package) once the slide before the one in the model is finished."""
    paths = list(slides)
    n, ahead = len(paths), job.settings.prefetch_slides
    lines = OrderedLines(log, warn)
    stopping = threading.Event()

    def prepare(i: int) -> SlideTask | None:
        if stopping.is_set():
            return None  # the run is stopping: leave the slide as it is
        path = paths[i]
        key = slides[path]
        slide_log, slide_warn = lines.channel(i)
        try:
            read_from = cache.local(path, slide_warn) if cache is not None else None
            return job.prepare(path, f"[{i + 1}/{n}] {key}{path.suffix}", slide_log, slide_warn,
                               read_from=read_from, read_ahead=ahead > 0, key=key)  # fmt: skip
        except BaseException:
            _release(cache, path)
            raise

    def finish(i: int, task: SlideTask) -> None:
        try:
            task.finish()
        finally:
            _release(cache, task.path)
            lines.done(i)

    preparing: deque[Future[SlideTask | None]] = deque()
    finishing: Future[None] | None = None
    task: SlideTask | None = None
    preparer = ThreadPoolExecutor(1, thread_name_prefix="virchow-rt-prepare")
    finisher = ThreadPoolExecutor(1, thread_name_prefix="virchow-rt-finish")
    try:
        for i, path in enumerate(paths):
            records.append(SlideRecord.for_slide(path, slides[path]))  # pending: interrupted if it stops here
            if ahead == 0:  # one slide after another, every stage on this thread
                task = prepare(i)
                assert task is not None
                records[-1] = task.record
                task.embed()
                finish(i, task)
                task = None
                continue
            while len(preparing) < min(n - i, 1 + ahead):  # slides i+1 .. i+ahead prepare while i runs
                preparing.append(preparer.submit(prepare, i + len(preparing)))
            task = preparing[0].result()
            preparing.popleft()  # only now: a Ctrl-C while waiting leaves the slide to the cleanup below
            assert task is not None
            records[-1] = task.record
            task.embed()  # the model, on this thread; raises only what stops the run
            if finishing is not None:
                finishing.result()  # slide i-1 is complete before slide i is handed on
            finishing, task = finisher.submit(finish, i, task), None
        if finishing is not None:
            finishing.result()
    except BaseException:
        stopping.set()
        if cache is not None:
            cache.stop()  # a slide waiting for its copy is not copied now
        if task is not None:  # in the model (or embedded) when the run stopped
            task.stop()
        raise
    finally:
        if finishing is not None:  # an embedded slide is finished whatever stops the run
            with contextlib.suppress(BaseException):
                finishing.result()
        for future in preparing:  # prepared ahead, never started: left as they were found
            if not future.cancel():
                with contextlib.suppress(BaseException):
                    prepared = future.result()
                    if prepared is not None:
                        prepared.close()
        preparer.shutdown(wait=True)
        finisher.shutdown(wait=True)
        lines.close()


def _release(cache: SlideCache | None, path: Path) -> None:
    if cache is not None:
        cache.release(path)
