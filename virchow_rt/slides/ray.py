"""``virchow-rt slides --ray``: one job's slides spread over Ray workers, on one machine or a cluster.

Each worker is a Ray Core actor that opens the backend once (engine load, compilation, warm-up) and runs
the single-node slide pipeline (parallel reading ahead of pipelined batches) on one slide at a time,
writing the same ``<slide>.h5`` files as a local run. Actors rather than Ray Data: a slide's result is a
file on a shared folder, not rows to collect, and what needs handling is per slide, which actors give
directly:

- retries: an actor is created with ``max_restarts`` and ``max_task_retries``; when its process dies
  (killed, out of memory, node lost) Ray starts it again and gives it the same slide again;
- backpressure: the driver hands each worker one slide at a time, so no slide waits behind a slow one;
- exactly once: each worker runs the same :class:`~virchow_rt.slides.job.SlideJob` as a local run, whose
  per-slide lock (``O_EXCL``, a lease renewed while held) and atomic rename hold across processes and hosts.
  A worker that dies mid-slide leaves only its ``.partial`` file and its lock; a retry on the same host
  finds the lock stale at once (its process is gone), takes it over and redoes the slide. A lock left by a
  node that is gone is stale once its lease (``--lock-lease``) runs out; until then a retry elsewhere
  records the slide as ``locked``.

Slide paths and ``--out`` must be local to a single machine or on a filesystem every node mounts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from virchow_rt.errors import InputError, MissingDependency, VirchowError, warn_random_weights
from virchow_rt.files import check_output
from virchow_rt.slides import folder
from virchow_rt.slides.coords import check_source
from virchow_rt.slides.job import SlideJob
from virchow_rt.slides.reader import find_slides
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import SlideRecord, now, write_summary

#: attempts of one slide whose worker dies (Ray restarts the worker in between)
SLIDE_ATTEMPTS = 3
#: restarts of one worker (its process died) before Ray gives it up
MAX_RESTARTS = 2 * SLIDE_ATTEMPTS
#: on a cluster without GPUs, one worker per this many CPUs
CPUS_PER_CPU_WORKER = 8


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependency("--ray needs Ray: pip install 'virchow-rt[ray]'") from None
    return ray


class SlideWorker:
    """One Ray worker: the backend opened once, then any number of slides, one at a time."""

    def __init__(self, model: str, out_dir: str, settings: SlideSettings, backend: str):
        self._error: VirchowError | None = None
        self._opened = contextlib.ExitStack()  # the job's model stays open for the worker's life
        try:
            self._job = self._opened.enter_context(SlideJob.opened(model, out_dir, settings, backend))
        except VirchowError as err:  # kept for describe(): Ray reports a constructor's error as a death
            self._error = err
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._name = f"{socket.gethostname()}:{os.getpid()}" + (f" gpu {gpus}" if gpus else "")

    def describe(self) -> dict[str, Any]:
        """What the driver needs once: the model entry, the resolved settings, the folder's config."""
        if self._error is not None:
            raise self._error
        info = self._job.embedder.info
        return {
            "model": self._job.model_entry,
            "settings": self._job.settings,
            "config": self._job.config,
            "random_weights": bool(info.random_weights),
            "variant": info.variant,
        }

    def run(self, path: str, prefix: str) -> tuple[dict[str, Any], list[tuple[bool, str]]]:
        """Embed one slide (or skip it); returns its summary record and its lines (True: a warning)."""
        if self._error is not None:
            raise self._error
        lines: list[tuple[bool, str]] = []
        record = self._job.run(
            Path(path),
            prefix,
            lambda line: lines.append((False, line)),
            lambda line: lines.append((True, line)),
            worker=self._name,
        )
        return record.to_dict(), lines


def _connect(ray: Any, address: str) -> bool:
    """Connect to Ray (``local``: a new instance on this machine); True when this call started it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise InputError(
            f"--ray {address}: no Ray cluster found"
            f" ({err}); start one with `ray start --head`, or use --ray local"
        ) from None
    return True


def _check_fits(ray: Any, count: int, gpus_per_worker: float) -> None:
    """Refuse more workers than the cluster can run at once (Ray would wait for them forever)."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if count > cpus or count * gpus_per_worker > gpus + 1e-9:
        raise InputError(
            f"{count} Ray workers with {gpus_per_worker:g} GPUs and 1 CPU each do not fit this cluster "
            f"({cpus:g} CPUs, {gpus:g} GPUs); give fewer --ray-workers or a smaller --gpus-per-worker"
        )


def _default_workers(ray: Any, gpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)) // CPUS_PER_CPU_WORKER)


def process_slides_ray(
    slides: Sequence[str | Path],
    model: str | Path,
    out_dir: str | Path,
    settings: SlideSettings | None = None,
    *,
    address: str = "local",
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    backend: str = "auto",
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """:func:`~virchow_rt.slides.local.process_slides` over Ray workers; returns the job's summary.

    ``address``: ``local`` (a new Ray instance here), ``auto`` (the cluster this machine is part of) or a
    Ray address. ``workers`` defaults to one per visible GPU (``gpus_per_worker`` each, default 1), or on a
    cluster without GPUs one per 8 CPUs. ``model`` is an exported model file every node can read.
    """
    settings = settings or SlideSettings()
    settings.check()
    ray = _ray()
    paths = find_slides(slides, recursive=settings.recursive)
    if settings.coords:
        check_source(settings.coords, paths)
    out_dir = check_output(out_dir, "--out", folder=True)
    if workers is not None and workers < 1:
        raise InputError(f"--ray-workers {workers}: give 1 or more")
    started_ray = _connect(ray, address)
    try:
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        count = workers or _default_workers(ray, gpus_per_worker)
        _check_fits(ray, count, gpus_per_worker)
        actor = ray.remote(
            num_cpus=1,
            num_gpus=gpus_per_worker,
            max_restarts=MAX_RESTARTS,
            max_task_retries=SLIDE_ATTEMPTS - 1,
        )(SlideWorker)
        model = str(Path(model).resolve())
        pool = [actor.remote(model, str(out_dir.resolve()), settings, backend) for _ in range(count)]
        return _run_job(ray, pool, paths, out_dir, log, warn)
    finally:
        if started_ray:
            ray.shutdown()


def _run_job(
    ray: Any,
    pool: list[Any],
    paths: list[Path],
    out_dir: Path,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    started, wall0 = now(), time.perf_counter()
    try:
        first = ray.get([worker.describe.remote() for worker in pool])[0]  # each opened the model
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None  # the worker could not open the model: its own one-line error
    out_dir.mkdir(parents=True, exist_ok=True)
    folder.claim(out_dir, first["config"])
    if first["random_weights"]:
        warn_random_weights(
            f"{first['variant']} has random weights; every output is labelled random_weights=true"
        )
    records = {str(p): SlideRecord.for_slide(p, status="not started") for p in paths}
    queue = deque(enumerate(paths, 1))
    idle, running = list(pool), {}
    failed = embedded = 0
    bar = tqdm(total=len(paths), unit="slide", desc="slides", disable=None, file=sys.stderr)
    try:
        while queue or running:
            while idle and queue:
                i, path = queue.popleft()
                worker = idle.pop()
                ref = worker.run.remote(str(path), f"[{i}/{len(paths)}] {path.name}")
                running[ref] = (worker, path)
                records[str(path)].status = "pending"
            [ref], _ = ray.wait(list(running), num_returns=1)
            worker, path = running.pop(ref)
            idle.append(worker)
            record = records[str(path)]
            try:
                data, lines = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, VirchowError):  # a missing package, a full disk: the job stops
                    raise err.cause from None  # with its own one-line error (each slide would fail so)
                raise
            except ray.exceptions.RayActorError as err:
                record.status = "failed"
                record.reason = (
                    f"its worker died {SLIDE_ATTEMPTS} times on it ({type(err).__name__}); rerun to retry it"
                )
                warn(f"{path.name}: FAILED: {record.reason}")
            else:
                record = records[str(path)] = SlideRecord.from_dict(data)
                for is_warning, line in lines:
                    (warn if is_warning else log)(line)
            failed += record.status == "failed"
            embedded += record.embedded_tiles if record.status == "done" else 0
            bar.update()
            bar.set_postfix_str(f"{embedded / (time.perf_counter() - wall0):.1f} tiles/s, {failed} failed")
    finally:
        bar.close()
        for worker in pool:
            ray.kill(worker)
        hosts = sorted({r.host for r in records.values() if r.host})
        summary = write_summary(
            out_dir, list(records.values()), first["settings"], first["model"], started,
            time.perf_counter() - wall0, extra={"ray": {"workers": len(pool), "hosts": hosts}},
        )  # fmt: skip
    return summary
