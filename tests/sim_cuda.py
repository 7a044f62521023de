"""Simulated CUDA for the pipeline tests: numpy byte arrays at fake addresses, copies done at once.

SIMULATION, not CUDA: it checks only data flow and ordering bookkeeping (events recorded before they
are waited on); the real layer is tested on a GPU in the ``gpu`` tier.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np


class Memory:
    """Fake address space: allocations are numpy byte arrays at distinct, 256-byte aligned addresses."""

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 0x1000

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


def fake_cuda(mem: Memory, log: list[tuple[Any, ...]], capture: dict[str, Any]) -> types.SimpleNamespace:
    class Buffer:
        def __init__(self, nbytes: int) -> None:
            self.nbytes, self.ptr, self.closed = nbytes, mem.alloc(nbytes), False

        def view(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
            raw = mem.at(self.ptr, self.nbytes).view(dtype)
            return raw if shape is None else raw[: int(np.prod(shape))].reshape(shape)

        def close(self) -> None:
            self.closed = True

    class Event:
        def __init__(self) -> None:
            self.recorded_on: Any = None

        def record(self, stream: Any = None) -> None:
            self.recorded_on = stream if stream is not None else 0

        def synchronize(self) -> None:
            assert self.recorded_on is not None, "host waited for an event never recorded"

        def close(self) -> None:
            pass

    class Stream:
        ptr = 0xABC

        def wait(self, event: Event) -> None:
            assert event.recorded_on is not None, "a stream waited for an event never recorded"

        def synchronize(self) -> None:
            pass

        def close(self) -> None:
            pass

    def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
        log.append(("copy", kind, nbytes))
        mem.at(dst, nbytes)[:] = mem.at(src, nbytes)

    class Graph:
        def __init__(self, replay: Any) -> None:
            self.replay = replay

        def launch(self, stream: Any) -> None:
            log.append(("graph",))
            self.replay()

        def close(self) -> None:
            pass

    def capture_graph(stream: Any, enqueue: Any) -> Graph:
        # a real graph replays the kernels with the addresses and shape of the capture: so does this one
        capture["on"] = True
        try:
            assert enqueue()
        finally:
            capture["on"] = False
        ctx, addr, shape = capture.pop("captured")
        return Graph(lambda: ctx.compute(addr, shape))

    class EventTimer:  # no device clock here: each measured call "takes" 1 ms
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def measure(self, fn: Any) -> float:
            log.append(("timed",))
            fn()
            return 1e-3

    return types.SimpleNamespace(
        PinnedBuffer=Buffer, DeviceBuffer=Buffer, Event=Event, Stream=Stream, copy_async=copy_async,
        capture_graph=capture_graph, set_device=lambda index: None, GraphExec=Graph, EventTimer=EventTimer,
    )  # fmt: skip
