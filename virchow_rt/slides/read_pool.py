"""The reading worker processes: one pool per worker count, shared by the slides of a run, started quiet.

Workers are started with ``spawn`` (safe beside threads) and SIGINT blocked from their first instruction,
ignore Ctrl-C (the parent stops the run, so a terminal shows one line, not a traceback per worker) and exit
as soon as their parent is gone. The shared pool lives as long as the Python process. A worker that dies
(a slide that crashes its decoder) breaks the whole pool: :func:`shared_pool` then gives a fresh one, and
:func:`private_pool` gives a reader a pool of its own to find out whether its own tiles were the cause
(slides read at once, in a cohort, share the pool; only the slide that crashes it may fail).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

#: how often a reading worker checks that the process that started it is still alive (seconds)
PARENT_CHECK_S = 0.5
_POOLS: dict[int, ProcessPoolExecutor] = {}  # worker count -> the shared pool, made on first need
_LOCK = threading.Lock()  # slides read at once (a cohort) ask for the pool from several threads


def shared_pool(workers: int, broken: ProcessPoolExecutor | None = None) -> ProcessPoolExecutor:
    """The shared pool of ``workers`` processes (made on first need); ``broken``: a pool found broken,
    replaced by a fresh one unless another thread did so already."""
    with _LOCK:
        pool = _POOLS.get(workers)
        if pool is not None and pool is broken:
            del _POOLS[workers]
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        if pool is None:
            pool = _POOLS[workers] = _new_pool(workers)
        return pool


def private_pool() -> ProcessPoolExecutor:
    """A pool of one worker process that is the caller's own (shut it down when done)."""
    return _new_pool(1)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)
    )
    _start_workers(pool, workers)
    return pool


def _start_workers(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start every worker now, with SIGINT blocked from its first instruction: a thread's signal mask is
    inherited by the processes it starts, across exec. A Ctrl-C reaching a worker that is still importing
    would otherwise print a traceback before :func:`_worker_init` ignores it. Blocking in this thread
    only leaves the main thread to receive the Ctrl-C meant for the run."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for _ in range(workers):  # each submit before a worker is up starts one more process
            pool.submit(os.getpid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _worker_init(parent: int) -> None:
    """In each reading worker: ignore Ctrl-C and exit as soon as the parent is gone. A parent killed with
    SIGKILL (the OOM killer, a scheduler) never shuts its pool down; without this its workers would live on
    with PPID 1. A polling thread, not PR_SET_PDEATHSIG: that fires when the *thread* that started the
    worker ends, and the pool outlives the thread that first used it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pending from startup is now ignored

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@atexit.register
def _close_pools() -> None:
    with _LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=False, cancel_futures=True)
        _POOLS.clear()
