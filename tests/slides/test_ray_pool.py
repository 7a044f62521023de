"""The driver of a ``--ray`` job, without Ray: its queue's rules, and its loop over stand-in workers.

``FakeRay`` answers ``wait`` / ``get`` / ``kill`` as Ray does, and ``FakeActor`` is a worker whose slides
finish, lock or lose it as a test says, and which comes back (with a new pid) when Ray would restart it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virchow_rt.slides import ray_pool
from virchow_rt.slides.ray_pool import RayPool, SlideQueue

PIDS = itertools.count(100)


class FakeRay:
    class exceptions:  # noqa: N801 - the shape of ray.exceptions
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            def __init__(self, cause: Exception) -> None:
                super().__init__(str(cause))
                self.cause = cause

        class RayActorError(RayError):
            pass

        class ActorDiedError(RayActorError):
            pass

        class ActorUnavailableError(RayActorError):
            pass

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        deadline = time.monotonic() + (timeout or 0)
        while True:
            ready = [r for r in refs if r.ready_at <= time.monotonic()]
            if ready or time.monotonic() >= deadline:
                return ready[:num_returns], [r for r in refs if r not in ready[:num_returns]]
            time.sleep(0.002)

    def get(self, ref: FakeRef):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor: FakeActor) -> None:
        actor.killed = True


class FakeRef:
    def __init__(self, call: Callable[[], object]) -> None:
        self.ready_at, self.value, self.error = time.monotonic() + 0.005, None, None
        try:
            self.value = call()
        except Exception as err:  # noqa: BLE001 - handed to the driver as Ray would
            self.error = err


class _Method:
    def __init__(self, call: Callable) -> None:
        self.call = call

    def remote(self, *args) -> FakeRef:
        return FakeRef(lambda: self.call(*args))


Errors = FakeRay.exceptions


class FakeActor:
    """A worker on node ``node``; ``slide(actor, path)`` says what running ``path`` does (a record's status
    and who holds its lock; or raise to lose the worker)."""

    def __init__(self, node: int, slide: Callable, restart_after: float | None = None) -> None:
        self.node, self.slide, self.restart_after = node, slide, restart_after
        self.pid, self.down_until, self.killed = next(PIDS), None, False
        self.describe, self.run = _Method(self._describe), _Method(self._run)

    @property
    def name(self) -> str:
        return f"fake:{self.pid}"

    def lose(self) -> Errors.ActorUnavailableError:
        """Lost: unavailable until Ray restarts it (never, when ``restart_after`` is None)."""
        self.down_until = (
            float("inf") if self.restart_after is None else time.monotonic() + self.restart_after
        )
        return Errors.ActorUnavailableError("Socket closed")

    def _describe(self) -> dict:
        if self.down_until is not None:
            if time.monotonic() < self.down_until:
                raise Errors.ActorUnavailableError("restarting")
            self.pid, self.down_until = next(PIDS), None  # restarted: a new process
        return {"worker": self.name, "host": "fake", "pid": self.pid, "node": f"node{self.node}",
                "ip": f"10.0.0.{self.node}"}  # fmt: skip

    def _run(self, path: str, prefix: str, attempts: int, key: str) -> tuple:
        assert self.down_until is None, "a slide was handed to a lost worker"
        status, held = self.slide(self, Path(path))
        record = {"name": key, "path": path, "status": status, "worker": self.name,
                  "attempts": attempts}  # fmt: skip
        return record, [(False, f"{prefix}: {status}")], held


def done(actor: FakeActor, path: Path) -> tuple:
    return "done", None


def run_pool(actors: list[FakeActor], names: list[str]) -> tuple[dict, list[str], RayPool]:
    lines: list[str] = []
    pool = RayPool(FakeRay(), actors, [Path(f"/slides/{n}.tif") for n in names], lines.append, lines.append)
    pool.start()
    try:
        pool.run()
    finally:
        pool.close()
    return {Path(p).stem: r for p, r in pool.records.items()}, lines, pool


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_pool, "PROBE_EVERY_S", 0.02)
    monkeypatch.setattr(ray_pool, "REPORT_AFTER_S", 0.05)


def test_a_lost_slide_goes_first_and_fails_only_after_several_different_workers() -> None:
    queue = SlideQueue([Path("a"), Path("b"), Path("c")], attempts=3)
    a = queue.take(0.0)
    assert a is not None and a.path == Path("a") and a.attempts == 1
    assert queue.lost(a, "w1") is None and queue.take(0.0) is a and a.attempts == 2  # first again
    assert queue.lost(a, "w1") is None  # the same worker again: still one worker
    assert queue.take(0.0) is a and queue.lost(a, "w2") is None
    assert queue.take(0.0) is a
    reason = queue.lost(a, "w3")
    assert reason is not None and reason.startswith("3 Ray workers were lost while running it (w1, w2, w3)")
    assert len(queue) == 2
    b = queue.take(0.0)
    assert b is not None
    queue.later(b, 5.0)  # handed back untried: waits, and was not an attempt
    assert b.attempts == 0 and queue.take(1.0).path == Path("c") and queue.take(1.0) is None
    assert queue.next_at() == 5.0 and queue.take(5.0) is b


def test_a_slide_locked_by_a_lost_worker_waits_for_its_lease_then_runs_on_the_worker_left() -> None:
    expires = {}

    def lost_on_b(actor: FakeActor, path: Path) -> tuple:
        if path.stem == "b" and actor is actors[1]:
            expires["b"] = time.monotonic() + 0.3  # its lock outlives it (a host that cannot be asked)
            raise actor.lose()
        if path.stem == "b" and time.monotonic() < expires["b"]:
            left = expires["b"] - time.monotonic()
            return "locked", {"host": "fake", "pid": lost_pid, "lease_s": 0.3, "left_s": left}
        if path.stem == "c":  # another run's lock: left to it
            return "locked", {"host": "elsewhere", "pid": 7, "lease_s": 300, "left_s": 200}
        return "done", None

    actors = [FakeActor(1, lost_on_b), FakeActor(2, lost_on_b)]
    lost_pid = actors[1].pid
    start = time.monotonic()
    records, lines, pool = run_pool(actors, ["a", "b", "c"])
    assert time.monotonic() - start >= 0.3  # it waited for the lease
    assert (records["b"].status, records["b"].worker, records["b"].attempts) == ("done", actors[0].name, 2)
    assert records["c"].status == "locked" and records["c"].attempts == 1
    waits = [line for line in lines if "b.tif: still locked by a lost worker" in line]
    assert len(waits) == 1 and "retried when its lease runs out" in waits[0]
    [report] = [line for line in lines if "lost Ray node" in line]
    assert "10.0.0.2 (node2)" in report and "1 slide moved back to the queue (b.tif)" in report
    assert "1 of 2 workers left" in report
    [gone] = pool.lost
    assert {k: v for k, v in gone.items() if k != "at"} == {"worker": f"fake:{lost_pid}", "node": "node2",
                                                            "ip": "10.0.0.2", "slide": "b.tif",
                                                            "error": "ActorUnavailableError"}  # fmt: skip
    assert all(a.killed for a in actors)


def test_a_slide_that_kills_every_worker_fails_after_three_and_the_others_are_done() -> None:
    def poison(actor: FakeActor, path: Path) -> tuple:
        if path.stem == "poison":
            raise actor.lose()
        return "done", None

    actors = [FakeActor(n, poison, restart_after=0.05) for n in (1, 2)]  # Ray restarts them each time
    records, lines, _ = run_pool(actors, ["poison", "a", "b"])
    assert records["poison"].status == "failed" and records["poison"].attempts == 3
    assert records["poison"].reason.startswith("3 Ray workers were lost while running it (fake:")
    assert records["a"].status == records["b"].status == "done"
    assert len([line for line in lines if "poison.tif: FAILED" in line]) == 1
    assert len([line for line in lines if " is back on node " in line]) >= 2  # the pool grew back


@pytest.mark.parametrize("gone_for_good", [False, True])
def test_with_no_worker_left_the_slides_left_fail_with_the_reason(monkeypatch, gone_for_good) -> None:
    monkeypatch.setattr(ray_pool, "NO_WORKER_WAIT_S", 0.2)

    def lost_on_a(actor: FakeActor, path: Path) -> tuple:
        if gone_for_good:  # Ray will not restart it: its probe says the actor died
            actor._describe = lambda: (_ for _ in ()).throw(Errors.ActorDiedError("dead"))
            actor.describe = _Method(actor._describe)
        raise actor.lose()

    records, lines, _ = run_pool([FakeActor(1, lost_on_a)], ["a", "b"])
    assert [r.status for r in records.values()] == ["failed", "failed"]
    why = (
        "every Ray worker is gone for good" if gone_for_good else "no Ray worker was left to run it for 0.2 s"
    )
    assert all(r.reason.startswith(why) for r in records.values()), records
    assert len([line for line in lines if "no Ray worker is left; waiting" in line]) == 1


def test_ray_local_starts_its_own_ray_not_one_already_running_here() -> None:
    pytest.importorskip("h5py")
    from virchow_rt.slides import ray as distributed

    calls: list[dict] = []

    class Ray:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            calls.append(kwargs)

    assert distributed._connect(Ray(), "local") is True
    assert calls[0]["address"] == "local"  # Ray's default (no address) joins a cluster running here


def test_each_worker_gets_the_slide_s_key_and_the_records_are_named_by_it() -> None:
    """--mirror-folders: two slides of one name; the worker writes each under its key."""
    slides = {Path("/drive/caseA/s.tif"): "caseA/s", Path("/drive/caseB/s.tif"): "caseB/s"}
    lines: list[str] = []
    pool = RayPool(FakeRay(), [FakeActor(1, done)], slides, lines.append, lines.append)
    pool.start()
    try:
        pool.run()
    finally:
        pool.close()
    assert {p: r.name for p, r in pool.records.items()} == {str(p): key for p, key in slides.items()}
    assert sorted(lines) == ["[1/2] caseA/s.tif: done", "[2/2] caseB/s.tif: done"]
