"""The driver of a ``--ray`` job: a queue of slides handed one at a time to the Ray workers that are alive.

:class:`SlideQueue` holds the rules (no Ray in it, so they are tested without a cluster): a slide whose
worker was lost goes back to the front of the queue, and fails only once :data:`SLIDE_ATTEMPTS` different
workers were lost while running it (it may be what kills them); a slide still locked by a lost worker waits
until that lock's lease runs out. :func:`run_pool` drives the workers (Ray actors made by
:mod:`virchow_rt.slides.ray`; the ``ray`` module is passed in, never imported here): each live worker gets
one slide, a lost one is asked again every :data:`PROBE_EVERY_S` until Ray has restarted it (then it gets
slides again) or it is gone for good, and the console says once per node what was lost and what moved.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from virchow_rt.errors import VirchowError
from virchow_rt.slides.summary import SlideRecord, now

#: different workers lost while running one slide before it fails (it may be what kills them)
SLIDE_ATTEMPTS = 3
#: seconds between questions to a lost worker (Ray answers at once while it cannot reach it)
PROBE_EVERY_S = 2.0
#: seconds without any live worker before the slides left fail (Ray could not restart one anywhere)
NO_WORKER_WAIT_S = 600.0
#: losses on one node within this many seconds are reported as one line
REPORT_AFTER_S = 1.0
#: a slide locked by a lost worker is asked about again at least this often
LOCK_RECHECK_S = 30.0

Log = Callable[[str], None]


@dataclass
class QueuedSlide:
    """One slide of the job as the driver sees it: how often it was handed out and where it was lost."""

    index: int  # 1-based, as the console numbers slides
    path: Path
    key: str  # what its files are named after (reader.keyed_slides)
    attempts: int = 0  # times handed to a worker
    lost_on: list[str] = field(default_factory=list)  # workers lost while running it
    not_before: float = 0.0  # monotonic time before which it is not handed out
    lock_wait_until: float | None = None  # waiting for a lost worker's lock: until then, at most

    @property
    def name(self) -> str:
        """As the console shows it: its file name, with the sub-folders of its key (--mirror-folders)."""
        return f"{self.key}{self.path.suffix}"


class SlideQueue:
    """The slides not yet handed out (or handed back), in order; no Ray here."""

    def __init__(self, slides: Iterable[Path] | Mapping[Path, str], attempts: int = SLIDE_ATTEMPTS) -> None:
        """``slides``: paths (each keyed by its name), or path -> key."""
        keys = slides if isinstance(slides, Mapping) else {Path(p): Path(p).stem for p in slides}
        self._items = [QueuedSlide(i, Path(p), k) for i, (p, k) in enumerate(keys.items(), 1)]
        self.limit = attempts

    def __len__(self) -> int:
        return len(self._items)

    def take(self, now: float) -> QueuedSlide | None:
        """The first slide that may be handed out at ``now`` (counted as an attempt), or None."""
        for i, item in enumerate(self._items):
            if item.not_before <= now:
                item.attempts += 1
                return self._items.pop(i)
        return None

    def lost(self, slide: QueuedSlide, worker: str) -> str | None:
        """``worker`` was lost while running ``slide``: back to the front, or why it fails now."""
        slide.lost_on.append(worker)
        workers = list(dict.fromkeys(slide.lost_on))
        if len(workers) >= self.limit:
            return (
                f"{len(workers)} Ray workers were lost while running it ({', '.join(workers)}): it may be "
                "what kills them (memory?); check it, then rerun to retry it"
            )
        self._items.insert(0, slide)
        return None

    def later(self, slide: QueuedSlide, at: float) -> None:
        """``slide`` came back untried (a lost worker's lock): not an attempt; hand it out again at ``at``."""
        slide.not_before = at
        slide.attempts -= 1
        self._items.append(slide)

    def items(self) -> list[QueuedSlide]:
        """The slides waiting, in order (not removed)."""
        return list(self._items)

    def next_at(self) -> float | None:
        """When the first slide may be handed out (None: the queue is empty)."""
        return min((item.not_before for item in self._items), default=None)

    def drain(self) -> list[QueuedSlide]:
        """Every slide left, removed from the queue."""
        items, self._items = self._items, []
        return items


@dataclass
class _Worker:
    """One Ray actor as the driver sees it: probing (ref: a describe() or none yet), idle, busy or gone."""

    handle: Any
    name: str = "?"
    host: str | None = None
    pid: int | None = None
    node: str = ""
    ip: str = "?"
    ref: Any = None  # its run (busy) or its describe (probing) in flight
    slide: QueuedSlide | None = None
    probing: bool = True
    probe_at: float = 0.0  # probing, no describe in flight: ask again then
    gone: bool = False  # for good: Ray will not restart it, or it cannot open the model
    lost: bool = False  # lost at least once: its return is announced

    @property
    def live(self) -> bool:
        return not self.gone and not self.probing


@dataclass
class _Loss:
    ip: str
    workers: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    errors: set[str] = field(default_factory=set)
    first: float = 0.0


class RayPool:
    """The driver's loop over the workers; ``records`` says what became of each slide."""

    def __init__(
        self, ray: Any, handles: list[Any], slides: list[Path] | Mapping[Path, str], log: Log, warn: Log
    ) -> None:
        """``slides``: paths (each keyed by its name), or path -> key (reader.keyed_slides)."""
        self.ray, self.log, self.warn = ray, log, warn
        self.workers = [_Worker(handle) for handle in handles]
        self.queue = SlideQueue(slides)
        self.records = {str(q.path): SlideRecord.for_slide(q.path, q.key, status="not started")
                        for q in self.queue.items()}  # fmt: skip
        self.total = len(self.queue)
        self.first: dict[str, Any] | None = None  # the first worker's describe()
        self.lost: list[dict[str, Any]] = []  # each worker lost, for the summary
        self._lost_ids: set[tuple[str | None, int | None]] = set()  # (host, pid) of lost workers
        self._reports: dict[str, _Loss] = {}
        self._none_since: float | None = None
        self._failed = self._embedded = 0
        self._bar: Any = None
        self._wall0 = time.perf_counter()

    # -- the loop ---------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Wait until the first worker has opened the model; returns its describe() (raises its error)."""
        while self.first is None:
            self._step(time.monotonic())
        return self.first

    def run(self) -> None:
        """Hand out every slide; returns when each is done, failed or left to another run."""
        self._bar = tqdm(total=self.total, unit="slide", desc="slides", disable=None, file=sys.stderr)
        try:
            while len(self.queue) or any(w.slide for w in self.workers):
                now = time.monotonic()
                for worker in self.workers:
                    if worker.live and worker.slide is None and not self._hand_out(worker, now):
                        break
                self._step(now)
        finally:
            self._bar.close()

    def close(self) -> None:
        """Report the losses not yet reported and end every worker."""
        for node in list(self._reports):
            self._report(node)
        for worker in self.workers:
            self.ray.kill(worker.handle)

    def live(self) -> int:
        return sum(w.live for w in self.workers)

    def _step(self, now: float) -> None:
        for worker in self.workers:  # ask the lost workers again
            if worker.probing and not worker.gone and worker.ref is None and worker.probe_at <= now:
                worker.ref = worker.handle.describe.remote()
        for node, loss in list(self._reports.items()):
            if now - loss.first >= REPORT_AFTER_S:
                self._report(node)
        self._check_any_worker(now)
        refs = {w.ref: w for w in self.workers if w.ref is not None}
        wake = [w.probe_at for w in self.workers if w.probing and not w.gone and w.ref is None]
        wake += [loss.first + REPORT_AFTER_S for loss in self._reports.values()]
        if any(w.live and w.slide is None for w in self.workers) and self.queue.next_at() is not None:
            wake.append(self.queue.next_at())
        if self._none_since is not None:
            wake.append(self._none_since + NO_WORKER_WAIT_S)
        timeout = min(max(min(wake, default=now + 5.0) - now, 0.02), 5.0)
        if not refs:
            time.sleep(timeout)
            return
        ready, _ = self.ray.wait(list(refs), num_returns=1, timeout=timeout)
        for ref in ready:
            worker = refs[ref]
            worker.ref = None
            if worker.probing:
                self._probed(worker, ref)
            else:
                self._finished(worker, ref)

    def _hand_out(self, worker: _Worker, now: float) -> bool:
        slide = self.queue.take(now)
        if slide is None:
            return False
        worker.slide = slide
        prefix = f"[{slide.index}/{self.total}] {slide.name}"
        worker.ref = worker.handle.run.remote(str(slide.path), prefix, slide.attempts, slide.key)
        self.records[str(slide.path)].status = "pending"
        return True

    def _check_any_worker(self, now: float) -> None:
        """No live worker: wait up to NO_WORKER_WAIT_S for Ray to restart one; then fail the slides left."""
        if self.first is None or self.live() or not len(self.queue):  # (a busy worker is a live one)
            self._none_since = None
            return
        gone = all(w.gone for w in self.workers)
        if self._none_since is None:
            self._none_since = now
            if not gone:
                self.warn(
                    f"no Ray worker is left; waiting up to {NO_WORKER_WAIT_S:g} s for Ray to restart one (a "
                    "node with room must join); stop with Ctrl-C and rerun the same command to resume later"
                )
        if gone or now - self._none_since >= NO_WORKER_WAIT_S:
            why = "every Ray worker is gone for good" if gone else (
                f"no Ray worker was left to run it for {NO_WORKER_WAIT_S:g} s (their nodes were lost)"
            )  # fmt: skip
            for slide in self.queue.drain():
                self._fail(slide, f"{why}; rerun to retry it", worker=None)

    # -- what comes back ---------------------------------------------------------------------------------

    def _probed(self, worker: _Worker, ref: Any) -> None:
        exceptions = self.ray.exceptions
        try:
            info = self.ray.get(ref)
        except exceptions.RayTaskError as err:
            if not isinstance(err.cause, VirchowError):
                raise
            if self.first is None:  # the model does not open: its own one-line error, the job stops
                raise err.cause from None
            worker.gone = True
            self.warn(f"Ray worker {worker.name} cannot open the model ({err.cause}); it is left out")
            return
        except exceptions.ActorDiedError:  # for good: Ray will not restart it
            if self.first is None:
                raise  # no worker has started yet: what Ray says is the job's error
            worker.gone = True
            return
        except exceptions.RayActorError:  # not restarted yet (its node is gone, or no room elsewhere)
            worker.probe_at = time.monotonic() + PROBE_EVERY_S
            return
        worker.name, worker.host, worker.pid = info["worker"], info["host"], info["pid"]
        worker.node, worker.ip, worker.probing = info["node"], info["ip"], False
        if worker.lost:
            self.log(f"Ray worker {worker.name} is back on node {worker.ip}: {self.live()} of "
                     f"{len(self.workers)} workers")  # fmt: skip
        if self.first is None:
            self.first = info

    def _finished(self, worker: _Worker, ref: Any) -> None:
        slide, worker.slide = worker.slide, None
        assert slide is not None
        try:
            data, lines, held = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, VirchowError):  # a missing package, a full disk: the job stops
                raise err.cause from None  # with its own one-line error (each slide would fail so)
            raise
        except self.ray.exceptions.RayActorError as err:
            self._lose(worker, slide, err)
            return
        record = SlideRecord.from_dict(data)
        if record.status == "locked" and held and self._wait_for_lock(slide, held):
            return
        for is_warning, line in lines:
            (self.warn if is_warning else self.log)(line)
        self._record(record)

    def _lose(self, worker: _Worker, slide: QueuedSlide, err: Exception) -> None:
        worker.probing = worker.lost = True
        worker.probe_at = 0.0  # ask at once: Ray answers when it has restarted it
        self._lost_ids.add((worker.host, worker.pid))
        self.lost.append({"worker": worker.name, "node": worker.node, "ip": worker.ip, "at": now(),
                          "slide": slide.name, "error": type(err).__name__})  # fmt: skip
        loss = self._reports.setdefault(worker.node, _Loss(worker.ip, first=time.monotonic()))
        loss.workers.append(worker.name)
        loss.errors.add(type(err).__name__)
        reason = self.queue.lost(slide, worker.name)
        if reason is None:
            loss.moved.append(slide.name)
        else:
            self._fail(slide, reason, worker=worker.name)

    def _report(self, node: str) -> None:
        loss = self._reports.pop(node)
        n, moved = len(loss.workers), loss.moved
        names = f" ({', '.join(moved)})" if moved else ""
        self.warn(
            f"lost Ray node {loss.ip} ({node[:8] or '?'}), or its worker process: {n} worker"
            f"{'s' * (n > 1)} gone ({', '.join(sorted(loss.errors))}); {len(moved)} slide"
            f"{'s' * (len(moved) != 1)} moved back to the queue{names}; {self.live()} of {len(self.workers)} "
            f"workers left for {len(self.queue)} slides waiting (Ray restarts a lost worker where it fits)"
        )

    def _wait_for_lock(self, slide: QueuedSlide, held: dict[str, Any]) -> bool:
        """True when ``slide`` is locked by a lost worker and goes back to wait for its lease to run out."""
        if (held.get("host"), held.get("pid")) not in self._lost_ids:
            return False  # another run's: left to it
        now, left = time.monotonic(), float(held.get("left_s") or 0.0)
        if slide.lock_wait_until is None:
            slide.lock_wait_until = now + 2 * float(held.get("lease_s") or 0.0) + LOCK_RECHECK_S
            self.log(f"{slide.name}: still locked by a lost worker ({held.get('host')}, pid "
                     f"{held.get('pid')}); retried when its lease runs out, in {left:.0f} s")  # fmt: skip
        if now > slide.lock_wait_until:
            return False
        self.queue.later(slide, now + min(left + 0.5, LOCK_RECHECK_S))
        return True

    def _fail(self, slide: QueuedSlide, reason: str, worker: str | None) -> None:
        record = SlideRecord.for_slide(slide.path, slide.key, status="failed", reason=reason, worker=worker,
                                       attempts=slide.attempts)  # fmt: skip
        self.warn(f"{slide.name}: FAILED: {reason}")
        self._record(record)

    def _record(self, record: SlideRecord) -> None:
        self.records[record.path] = record
        self._failed += record.status == "failed"
        self._embedded += record.embedded_tiles if record.status == "done" else 0
        if self._bar is not None:
            self._bar.update()
            rate = self._embedded / (time.perf_counter() - self._wall0)
            self._bar.set_postfix_str(
                f"{rate:.1f} tiles/s, {self._failed} failed, {self.live()}/{len(self.workers)} workers"
            )
