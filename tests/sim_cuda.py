"""Simulated CUDA for the pipeline tests: numpy byte arrays at fake addresses, streams that run late.

SIMULATION, not CUDA. Work queued on a stream (a copy, an engine run, a graph replay) is not done when
it is queued: it waits in the stream's queue until something forces it, as late as a real GPU may
legally run it: ``Stream.synchronize``, ``Event.synchronize`` (the work queued before the event's
record), or, when a stream runs, its ``wait`` on an event (the other stream runs up to that record
first). A wait captures the event's record at the time of the wait, as ``cudaStreamWaitEvent`` does.
So a missing or misplaced wait, or a host buffer refilled before the copy that reads it ran, gives
wrong numbers in the test instead of passing by luck. Copies read their source when they run.

A producer of GPU arrays may queue its writes on a :class:`SimStream` too (``Memory.producer``) and
hand over its handle; other integer streams (the legacy stream 1, a made-up 7) hold no queued work.
The real layer is tested on a GPU in the ``gpu`` tier.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import numpy as np


class Memory:
    """Fake address space and device: allocations are numpy byte arrays at distinct, 256-byte aligned
    addresses; ``streams`` are the simulated streams made so far (by ``ptr``)."""

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 0x1000
        self.streams: dict[int, SimStream] = {}

    def alloc(self, nbytes: int) -> int:
        base = self.next
        self.next = (base + nbytes + 0x1000 + 255) // 256 * 256
        self.blocks[base] = np.zeros(nbytes, np.uint8)
        return base

    def at(self, addr: int, nbytes: int) -> np.ndarray:
        for base, block in self.blocks.items():
            if base <= addr and addr + nbytes <= base + len(block):
                return block[addr - base : addr - base + nbytes]
        raise AssertionError(f"access to unallocated memory {addr:#x}+{nbytes}")

    def stream(self, ptr: int) -> SimStream:
        """The simulated stream whose handle is ``ptr`` (what an executor is given)."""
        assert ptr in self.streams, f"work queued on {ptr:#x}, which is not one of the pipeline's streams"
        return self.streams[ptr]

    def producer(self, ptr: int, data: np.ndarray) -> int:
        """A stream that will write ``data`` at ``ptr`` when something waits for it; returns its handle."""
        stream = SimStream(self)
        stream.enqueue(
            lambda: self.at(ptr, data.nbytes).__setitem__(slice(None), data.view(np.uint8).ravel())
        )
        return stream.ptr

    def idle(self) -> bool:
        return all(s.done == len(s.ops) for s in self.streams.values())


_handles = itertools.count(0x5000, 0x10)


class SimStream:
    """A queue of work run in order, only as far as something needs it."""

    def __init__(self, mem: Memory) -> None:
        self.ptr = next(_handles)
        self.ops: list[Callable[[], None]] = []
        self.done = 0  # ops run so far
        self.running = False
        self.closed = False
        mem.streams[self.ptr] = self

    def enqueue(self, op: Callable[[], None]) -> None:
        self.ops.append(op)

    def run_until(self, position: int) -> None:
        if self.done >= position:
            return
        assert not self.running, "streams wait for each other in a cycle: a real GPU would hang here"
        self.running = True
        try:
            while self.done < position:
                op = self.ops[self.done]
                self.done += 1
                op()
        finally:
            self.running = False

    def wait(self, event: Any) -> None:
        assert event.recorded_on is not None, "a stream waited for an event never recorded"
        mark = event.mark  # the record this wait is for: a later re-record does not change it
        self.enqueue(lambda: _reach(mark))

    def synchronize(self) -> None:
        self.run_until(len(self.ops))

    def close(self) -> None:
        assert self.done == len(self.ops), "a stream was destroyed with work still queued"
        self.closed = True


def _reach(mark: tuple[SimStream, int] | None) -> None:
    if mark is not None:
        stream, position = mark
        stream.run_until(position)


def fake_cuda(mem: Memory, log: list[tuple[Any, ...]], capture: dict[str, Any]) -> types.SimpleNamespace:
    """A stand-in for :mod:`virchow_rt.backends.cuda.api` over ``mem``; ``log`` gets what ran, in the
    order it ran: ("copy", kind, nbytes), ("graph",), ("timed",) (and the executors' own entries)."""

    class Buffer:
        def __init__(self, nbytes: int) -> None:
            self.nbytes, self.ptr, self.closed = nbytes, mem.alloc(nbytes), False

        def view(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
            raw = mem.at(self.ptr, self.nbytes).view(dtype)
            return raw if shape is None else raw[: int(np.prod(shape))].reshape(shape)

        def close(self) -> None:
            assert mem.idle(), "a buffer was freed while queued work may still use it"
            self.closed = True

    class Event:
        def __init__(self) -> None:
            self.recorded_on: Any = None
            self.mark: tuple[SimStream, int] | None = None  # None: complete (a stream the sim does not own)

        def record(self, stream: Any = None) -> None:
            self.recorded_on = stream if stream is not None else 0
            if isinstance(stream, int):  # a raw handle: a simulated producer's stream, or one with no work
                stream = mem.streams.get(stream)
            self.mark = (stream, len(stream.ops)) if isinstance(stream, SimStream) else None

        def synchronize(self) -> None:
            assert self.recorded_on is not None, "host waited for an event never recorded"
            _reach(self.mark)

        def close(self) -> None:
            pass

    def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: SimStream) -> None:
        def copy() -> None:
            log.append(("copy", kind, nbytes))
            mem.at(dst, nbytes)[:] = mem.at(src, nbytes)

        stream.enqueue(copy)

    class Graph:
        def __init__(self, replay: Callable[[], None]) -> None:
            self.replay = replay

        def launch(self, stream: SimStream) -> None:
            def run() -> None:
                log.append(("graph",))
                self.replay()

            stream.enqueue(run)

        def close(self) -> None:
            pass

    def capture_graph(stream: SimStream, enqueue: Callable[[], bool]) -> Graph:
        # a real graph replays the kernels with the addresses and shape of the capture: so does this one
        queued = len(stream.ops)
        capture["on"] = True
        try:
            assert enqueue()
        finally:
            capture["on"] = False
        assert len(stream.ops) == queued, "work captured into a graph must not also run"
        ctx, addr, shape = capture.pop("captured")
        return Graph(lambda: ctx.compute(addr, shape))

    class EventTimer:  # no device clock here: each measured call "takes" 1 ms
        def __init__(self, stream: SimStream) -> None:
            self.stream = stream

        def measure(self, fn: Callable[[], Any]) -> float:
            log.append(("timed",))
            fn()
            self.stream.synchronize()  # the end event's synchronize
            return 1e-3

    return types.SimpleNamespace(
        PinnedBuffer=Buffer, DeviceBuffer=Buffer, Event=Event, Stream=lambda: SimStream(mem),
        copy_async=copy_async, capture_graph=capture_graph, set_device=lambda index: None, GraphExec=Graph,
        EventTimer=EventTimer,
    )  # fmt: skip
