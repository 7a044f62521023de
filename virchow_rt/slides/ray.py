"""``virchow-rt slides --ray``: one job's slides spread over Ray workers, on one machine or a cluster.

Each worker is a Ray Core actor that opens the backend once (engine load, compilation, warm-up) and runs
the single-node slide pipeline (parallel reading ahead of pipelined batches) on one slide at a time,
writing the same ``<slide>.h5`` files as a local run. The driver keeps the queue
(:mod:`virchow_rt.slides.ray_pool`) and hands each live worker one slide at a time.

Why actors with a driver-side queue, and not Ray's own retries. Opening the model is the expensive part
(an engine load, a compilation), so it must stay open across slides: an actor keeps it; a plain task would
reopen it per slide or need a per-process cache Ray does not promise to keep. Ray Data would give rows to
collect, but a slide's result is a file on a shared folder. And the unit of retry must be the slide, not
the worker: Ray's ``max_task_retries`` gives a failed slide back to the *same* actor, which waits for that
actor's restart, never coming when its node is gone and no node has room; a task's ``max_retries`` cannot
tell a node that went away from a slide that kills every worker it runs on. So:

- actors are created with ``max_restarts=-1`` (Ray restarts a lost one wherever it fits, e.g. on a node
  that joins, and it opens the model there) and ``max_task_retries=0`` (a slide on a lost actor comes
  back to the driver at once, as ``ActorUnavailableError`` / ``ActorDiedError``);
- the driver puts that slide back at the front of the queue for the workers left (the pool shrinks to the
  live ones), asks the lost actor again every few seconds and gives it slides once Ray has restarted it
  (the pool grows back); a slide fails only for its own reasons, or once
  :data:`~virchow_rt.slides.ray_pool.SLIDE_ATTEMPTS` different workers were lost while running it;
- exactly once: each worker runs the same :class:`~virchow_rt.slides.job.SlideJob` as a local run, whose
  per-slide lock (``O_EXCL``, a lease renewed while held) and atomic rename hold across processes and hosts.
  A lost worker leaves its lock and its ``.partial`` file. The worker that takes the slide over takes the
  lock over (at once when the holder's process is gone on its own machine, else once the lease,
  ``--lock-lease``, has run out: until then the driver holds the slide back and retries it) and removes the
  ``.partial`` file of the lease it took over.

The console says once per node that workers were lost and how many slides moved; the summary lists the
lost workers (``ray.lost_workers``) and each slide's final ``host`` / ``worker`` and its ``attempts``.
Slide paths and ``--out`` must be local to a single machine or on a filesystem every node mounts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from virchow_rt.errors import InputError, MissingDependency, VirchowError, warn_random_weights
from virchow_rt.files import check_output
from virchow_rt.slides import folder, locks
from virchow_rt.slides.coords import check_source
from virchow_rt.slides.job import SlideJob
from virchow_rt.slides.ray_pool import RayPool
from virchow_rt.slides.reader import keyed_slides
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import now, write_summary

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
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._name = f"{self._host}:{self._pid}" + (f" gpu {gpus}" if gpus else "")

    def describe(self) -> dict[str, Any]:
        """Who this worker is and where (asked again after a loss), and what the driver needs once: the
        model entry, the resolved settings, the folder's config."""
        if self._error is not None:
            raise self._error
        import ray  # this runs in a Ray worker

        info = self._job.embedder.info
        return {
            "worker": self._name,
            "host": self._host,
            "pid": self._pid,
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "model": self._job.model_entry,
            "settings": self._job.settings,
            "config": self._job.config,
            "random_weights": bool(info.random_weights),
            "variant": info.variant,
        }

    def run(
        self, path: str, prefix: str, attempts: int, key: str
    ) -> tuple[dict[str, Any], list[tuple[bool, str]], dict[str, Any] | None]:
        """Embed one slide (or skip it) as ``key`` (``<out>/<key>.h5``): its summary record, its lines (True:
        a warning) and, when another holds its lock, who and for how long yet (the driver waits out the lease
        of a worker it lost)."""
        if self._error is not None:
            raise self._error
        lines: list[tuple[bool, str]] = []
        record = self._job.run(
            Path(path),
            prefix,
            lambda line: lines.append((False, line)),
            lambda line: lines.append((True, line)),
            worker=self._name,
            attempts=attempts,
            key=key,
        )
        held = None
        if record.status == "locked":
            out, lease = self._job.output(key), self._job.settings.lock_lease
            holder = locks.Holder.read(locks.lock_path(out))
            left = locks.lease_left(out, lease)
            held = {"host": holder.host, "pid": holder.pid, "lease_s": holder.lease_s or lease,
                    "left_s": left or 0.0}  # fmt: skip
        return record.to_dict(), lines, held


def _connect(ray: Any, address: str) -> bool:
    """Connect to Ray (``local``: a new instance on this machine); True when this call started it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    try:
        # "local" is said to Ray too: with no address, Ray joins a cluster already running on this machine
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
    keyed = keyed_slides(slides, settings.recursive, settings.mirror_folders)
    if settings.coords:
        check_source(settings.coords, list(keyed))
    out_dir = check_output(out_dir, "--out", folder=True)
    folder.check_layout(out_dir, keyed, settings)  # files leading out of --out, or shared: refused now
    if workers is not None and workers < 1:
        raise InputError(f"--ray-workers {workers}: give 1 or more")
    started_ray = _connect(ray, address)
    try:
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        count = workers or _default_workers(ray, gpus_per_worker)
        _check_fits(ray, count, gpus_per_worker)
        # restarted wherever it fits, forever; a slide on a lost worker comes back to the driver at once
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=-1, max_task_retries=0)(
            SlideWorker
        )
        model = str(Path(model).resolve())
        handles = [actor.remote(model, str(out_dir.resolve()), settings, backend) for _ in range(count)]
        return _run_job(ray, handles, keyed, out_dir, log, warn)
    finally:
        if started_ray:
            ray.shutdown()


def _run_job(
    ray: Any,
    handles: list[Any],
    slides: dict[Path, str],
    out_dir: Path,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    started, wall0 = now(), time.perf_counter()
    pool = RayPool(ray, handles, slides, log, warn)
    try:
        first = pool.start()  # the first worker has opened the model (or its error is raised)
        with folder.writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            folder.claim(out_dir, first["config"])
    except BaseException:
        with contextlib.suppress(Exception):  # what stopped the run is what the user must read
            pool.close()
        raise
    if first["random_weights"]:
        warn_random_weights(
            f"{first['variant']} has random weights; every output is labelled random_weights=true"
        )

    def summarize() -> dict[str, Any]:
        records = list(pool.records.values())
        hosts = sorted({r.host for r in records if r.host})
        extra = {"ray": {"workers": len(handles), "workers_left": pool.live(), "hosts": hosts,
                         "lost_workers": pool.lost}}  # fmt: skip
        with folder.writing(out_dir):
            return write_summary(
                out_dir, records, first["settings"], first["model"], started, time.perf_counter() - wall0,
                extra,
            )  # fmt: skip

    try:
        pool.run()
    except BaseException:
        with contextlib.suppress(Exception):
            pool.close()
        with contextlib.suppress(Exception):
            summarize()
        raise
    try:
        pool.close()
    except Exception as err:  # noqa: BLE001 - every slide is done: the summary must still be written
        warn(f"warning: the Ray workers did not close cleanly ({type(err).__name__}: {err})")
    return summarize()
