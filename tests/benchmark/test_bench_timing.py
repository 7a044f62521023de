"""The timing library: statistics, warm-up / repeat accounting, stream latencies, on a fake clock."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from virchow_rt.benchmark.timing import LatencyRecorder, Stats, percentile, split_batches, time_calls
from virchow_rt.errors import InputError


class FakeClock:
    """A clock that advances only when the code under test 'works' (``advance``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_stats_median_spread_percentiles() -> None:
    s = Stats((1.0, 2.0, 3.0, 4.0, 100.0))
    assert s.n == 5
    assert s.median == 3.0
    assert s.min == 1.0 and s.max == 100.0
    assert s.mean == pytest.approx(22.0)
    assert s.percentile(50) == 3.0
    assert s.percentile(99) == pytest.approx(4.0 + 0.96 * 96.0)  # linear interpolation between 4 and 100
    assert s.rel_spread == pytest.approx(99.0 / 3.0)
    d = s.to_dict(scale=1e3)
    assert d["median"] == 3000.0 and d["p50"] == 3000.0 and d["samples"][0] == 1000.0


def test_stats_rejects_empty_and_negative() -> None:
    with pytest.raises(InputError, match="zero timing samples"):
        Stats(())
    with pytest.raises(InputError, match="finite"):
        Stats((1.0, float("nan")))
    with pytest.raises(InputError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_time_calls_warms_up_untimed_and_times_each_repeat() -> None:
    clock = FakeClock()
    durations = iter([10.0, 10.0, 1.0, 2.0, 3.0])  # two slow warm-ups (compilation), then three timed calls
    calls = []

    def work() -> None:
        calls.append(1)
        clock.advance(next(durations))

    stats = time_calls(work, repeats=3, warmup=2, clock=clock)
    assert len(calls) == 5
    assert stats.samples == (1.0, 2.0, 3.0)
    assert stats.median == 2.0


def test_time_calls_syncs_before_each_clock_read() -> None:
    clock = FakeClock()
    pending = []

    def work() -> None:  # "asynchronous" work: only finishes when synced
        pending.append(4.0)

    def sync() -> None:
        while pending:
            clock.advance(pending.pop())

    stats = time_calls(work, repeats=2, warmup=1, clock=clock, sync=sync)
    assert stats.samples == (4.0, 4.0)


def _recorded(stream, batches, clock):
    recorder = LatencyRecorder(clock)
    outputs = list(recorder.results(stream(recorder.feed(batches))))
    return recorder, outputs


def test_latency_of_a_synchronous_stream_is_the_call_time() -> None:
    clock = FakeClock()
    batches = [np.full((2, 1), i, np.float32) for i in range(4)]

    def stream(it):
        for b in it:
            clock.advance(0.5)
            yield b * 2

    recorder, outputs = _recorded(stream, batches, clock)
    assert recorder.latencies_s == pytest.approx([0.5] * 4)
    assert [float(o[0, 0]) for o in outputs] == [0.0, 2.0, 4.0, 6.0]
    recorder.reset()
    assert recorder.latencies_s == []


def test_latency_of_an_overlapping_stream_counts_time_in_flight() -> None:
    """A stream that takes batch k+1 before returning batch k: each batch's latency spans two steps."""
    clock = FakeClock()
    batches = [np.zeros((1, 1)) + i for i in range(3)]

    def stream(it):
        it = iter(it)
        prev = next(it)
        for b in itertools.chain(it, [None]):
            clock.advance(1.0)
            yield prev
            prev = b
            if prev is None:
                return

    recorder, outputs = _recorded(stream, batches, clock)
    # batch 0: taken at t=0, back at t=1; batch 1: taken early at t=0, back at t=2; batch 2: t=1 -> t=3
    assert recorder.latencies_s == pytest.approx([1.0, 2.0, 2.0])
    assert [float(o[0, 0]) for o in outputs] == [0.0, 1.0, 2.0]


def test_latency_recorder_rejects_more_results_than_batches() -> None:
    recorder = LatencyRecorder()
    list(recorder.results([np.zeros(1)] * 2))
    with pytest.raises(InputError, match="2 results came back for 0 batches"):
        _ = recorder.latencies_s


def test_split_batches_views_in_order() -> None:
    tiles = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    batches = split_batches(tiles, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), tiles)
    assert all(b.flags.c_contiguous for b in batches)
    with pytest.raises(InputError, match="batch size"):
        split_batches(tiles, 0)


def test_event_timer_uses_cuda_python_where_installed_else_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import virchow_rt._deps as deps
    from virchow_rt.benchmark.timing import CudaEventTimer

    real = deps.is_importable
    if real("cuda.bindings.runtime"):
        from virchow_rt.backends.cuda.api import EventTimer

        assert isinstance(CudaEventTimer()._impl, EventTimer)
    monkeypatch.setattr(deps, "is_importable", lambda name: False if name.startswith("cuda") else real(name))

    class FakeEvent:  # torch.cuda.Event: each pair spans 5 ms
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: FakeEvent) -> float:
            return 5.0

    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(Event=FakeEvent)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    timer = CudaEventTimer()
    assert timer._impl is None  # cuda-python "missing": torch's events
    assert timer.measure(lambda: None) == pytest.approx(0.005)
