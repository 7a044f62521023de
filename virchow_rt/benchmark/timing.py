"""The one timing library of the benchmark: warm-up, timed repeats, median and spread, percentiles.

Host timing uses :func:`time.perf_counter`; on a GPU, compute-only timing uses CUDA events (from
``virchow_rt.backends.cuda.api`` when it offers them, else ``torch.cuda``) so that the figure is what
the device did, not what the host waited for. Every function takes an injectable ``clock`` so the
tests can check the arithmetic without timing anything.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from virchow_rt.errors import InputError

Clock = Callable[[], float]


@dataclass(frozen=True)
class Stats:
    """Summary of N timed samples (seconds): median and spread, percentiles."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise InputError("cannot summarize zero timing samples; use repeats >= 1")
        if not all(math.isfinite(s) and s >= 0 for s in self.samples):
            raise InputError(f"timing samples must be finite and >= 0, got {self.samples}")

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def mean(self) -> float:
        return float(statistics.fmean(self.samples))

    @property
    def min(self) -> float:
        return float(min(self.samples))

    @property
    def max(self) -> float:
        return float(max(self.samples))

    @property
    def stdev(self) -> float:
        return float(statistics.stdev(self.samples)) if self.n > 1 else 0.0

    def percentile(self, q: float) -> float:
        """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default method)."""
        return percentile(self.samples, q)

    @property
    def rel_spread(self) -> float:
        """(max - min) / median: how far apart the repeats were, as a fraction of the median."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        """Plain numbers for JSON, multiplied by ``scale`` (1e3 for milliseconds)."""
        return {
            "n": self.n,
            "median": self.median * scale,
            "mean": self.mean * scale,
            "min": self.min * scale,
            "max": self.max * scale,
            "stdev": self.stdev * scale,
            "p50": self.percentile(50) * scale,
            "p99": self.percentile(99) * scale,
            "rel_spread": self.rel_spread,
            "samples": [s * scale for s in self.samples],
        }


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of ``samples``."""
    if not samples:
        raise InputError("cannot take a percentile of zero samples")
    if not 0 <= q <= 100:
        raise InputError(f"percentile must be between 0 and 100, got {q}")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def time_calls(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> Stats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (``sync`` before clock reads)."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        if sync:
            sync()
        samples.append(clock() - start)
    return Stats(tuple(samples))


class LatencyRecorder:
    """Notes when a stream takes each batch and when that batch's result comes back.

    Wrap the stream's input with :meth:`feed` and its output with :meth:`results`; latency k is
    return time k minus take time k. For a synchronous backend that is exactly the call's time; for
    one that overlaps batches it includes the time the batch spent in flight, which is the latency a
    streaming user sees. Results must come back in input order (every Backend keeps order).
    """

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.taken: list[float] = []
        self.returned: list[float] = []

    def reset(self) -> None:
        self.taken.clear()
        self.returned.clear()

    def feed(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for batch in batches:
            self.taken.append(self.clock())
            yield batch

    def results(self, outputs: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for out in outputs:
            self.returned.append(self.clock())
            yield out

    @property
    def latencies_s(self) -> list[float]:
        if len(self.returned) > len(self.taken):
            raise InputError(f"{len(self.returned)} results came back for {len(self.taken)} batches taken")
        return [done - taken for taken, done in zip(self.taken, self.returned, strict=False)]


def split_batches(tiles: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Contiguous views of ``tiles`` (N, S, S, 3) in batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    return [np.ascontiguousarray(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]


class CudaEventTimer:
    """Times device work with CUDA events on the current stream (compute-only figures on a GPU).

    Uses ``virchow_rt.backends.cuda.api.EventTimer`` where cuda-python is installed (no torch needed), else
    ``torch.cuda.Event``. ``measure(fn)`` returns the device time of the work ``fn`` enqueues, in seconds.
    """

    def __init__(self) -> None:
        from virchow_rt._deps import is_importable

        self._impl: Any = None
        # backends.cuda.api always imports (it loads cuda-python lazily): ask for cuda-python itself
        if is_importable("cuda.bindings.runtime"):
            import virchow_rt.backends.cuda.api as rt_cuda

            self._impl = rt_cuda.EventTimer()
        if self._impl is None:
            from virchow_rt._deps import optional_import

            self._torch = optional_import("torch", "to time GPU work with CUDA events")

    def measure(self, fn: Callable[[], Any]) -> float:
        if self._impl is not None:
            return float(self._impl.measure(fn))
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3  # elapsed_time is in milliseconds

    def time_calls(self, fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> Stats:
        """Warm-up, then ``repeats`` device-timed calls of ``fn``."""
        for _ in range(warmup):
            self.measure(fn)
        return Stats(tuple(self.measure(fn) for _ in range(repeats)))
