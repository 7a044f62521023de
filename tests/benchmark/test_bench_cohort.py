"""The cohort benchmark's arithmetic: model-busy fraction, gaps between slides, workers needed; the stand-in
model takes the time its rate says without using the CPU."""

from __future__ import annotations

import time

import numpy as np
import pytest

from virchow_rt.benchmark.cohort import StandInBackend, cohort_timing, stand_in_info, workers_needed
from virchow_rt.errors import InputError


def test_gaps_are_the_model_idle_time_between_one_slide_and_the_next():
    # slide a: 2 batches (3 + 2 tiles), slide b: 1 batch (4), slide c: 2 batches (4 + 1)
    batches = [(0.0, 1.0, 3), (1.0, 2.0, 2), (2.5, 3.5, 4), (3.6, 4.6, 4), (4.6, 5.0, 1)]
    timing = cohort_timing(batches, [5, 0, 4, 5], wall_s=6.0)  # the empty slide ran no batch
    assert timing.gaps_s == pytest.approx((0.5, 0.1))
    assert timing.model_s == pytest.approx(4.4) and timing.span_s == pytest.approx(5.0)
    assert timing.busy == pytest.approx(4.4 / 6.0) and timing.busy_in_span == pytest.approx(4.4 / 5.0)
    assert timing.slides == 3 and timing.tiles == 14 and timing.slides_per_hour == pytest.approx(1800)
    row = timing.to_dict()
    assert row["gap_ms"]["median"] == pytest.approx(300) and row["gap_ms"]["n"] == 2
    assert row["idle_between_slides_s"] == pytest.approx(0.6) and row["outside_batches_s"] == pytest.approx(
        1.0
    )
    assert row["idle_within_slides_s"] == pytest.approx(0.0, abs=1e-9)
    waited = cohort_timing([(0.0, 1.0, 3), (1.5, 2.0, 2)], [5], wall_s=2.0).to_dict()  # one slide, a wait
    assert waited["idle_within_slides_s"] == pytest.approx(0.5) and waited["idle_between_slides_s"] == 0
    with pytest.raises(InputError, match="do not match"):
        cohort_timing(batches, [5, 4], wall_s=6.0)


def test_the_stand_in_sleeps_batch_over_rate_and_returns_the_models_shape():
    backend = StandInBackend(stand_in_info("virchow2"), rate=200.0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = backend.run(np.zeros((20, 224, 224, 3), np.uint8))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert out.shape == (20, 2560) and out.dtype == np.float32
    assert wall >= 0.1 and cpu < 0.05  # 20 tiles at 200 tiles/s: 0.1 s, asleep
    ((start, end, tiles),) = backend.batches
    assert tiles == 20 and end - start >= 0.1
    with pytest.raises(InputError, match="above 0"):
        StandInBackend(stand_in_info("virchow2"), rate=0)


def test_workers_needed_is_the_busy_cores_a_rate_takes():
    assert (
        workers_needed(1600, 8.3) == 14 and workers_needed(10000, 1.27) == 13 and workers_needed(1, 0.1) == 1
    )
