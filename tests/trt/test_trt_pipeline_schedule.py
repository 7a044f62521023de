"""The pipelined executor's bookkeeping (:class:`SlotSchedule`): order, overlap, ragged tail, slot reuse."""

from __future__ import annotations

import pytest

from virchow_rt.backends.tensorrt import SlotSchedule, Step
from virchow_rt.errors import InputError

GPU_OPS = ("fill", "h2d", "compute", "d2h")


def run_schedule(sizes: list[int], slots: int) -> list[Step]:
    """Every step, in the order the executor runs them, for batches of ``sizes`` arriving one by one."""
    schedule = SlotSchedule(slots)
    steps: list[Step] = []
    for rows in sizes:
        steps += schedule.submit(rows)
    return steps + schedule.drain()


def index(steps: list[Step], op: str, batch: int) -> int:
    return next(i for i, s in enumerate(steps) if s.op == op and s.batch == batch)


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_every_batch_runs_every_step_once_in_order(n: int, slots: int) -> None:
    steps = run_schedule([8] * n, slots)
    for k in range(n):
        ops = [s.op for s in steps if s.batch == k]
        assert ops == [*GPU_OPS, "wait", "emit"]
    assert [s.batch for s in steps if s.op == "emit"] == list(range(n))  # results in submission order


@pytest.mark.parametrize("slots", [2, 3])
def test_next_copy_in_is_queued_before_this_batch_is_waited_for(slots: int) -> None:
    steps = run_schedule([8] * 10, slots)
    for k in range(9):
        # while batch k computes, batch k+1 is filled and copied in ...
        assert index(steps, "h2d", k + 1) < index(steps, "wait", k)
        assert index(steps, "compute", k + 1) < index(steps, "wait", k)
        # ... and batch k-1's copy-out is queued before batch k+1 arrives
        if k:
            assert index(steps, "d2h", k - 1) < index(steps, "fill", k + 1)


@pytest.mark.parametrize("slots", [2, 3])
def test_slots_are_reused_only_after_their_batch_was_emitted(slots: int) -> None:
    steps = run_schedule([8] * 11, slots)
    busy: dict[int, int] = {}
    for step in steps:
        if step.op == "fill":
            assert step.slot not in busy, f"slot {step.slot} refilled while batch {busy.get(step.slot)} in it"
            assert step.slot == step.batch % slots
            busy[step.slot] = step.batch
        elif step.op == "emit":
            assert busy.pop(step.slot) == step.batch
        assert len(busy) <= slots  # buffers for at most `slots` batches exist
    assert busy == {}


def test_host_blocks_only_when_all_slots_are_in_flight() -> None:
    schedule = SlotSchedule(3)
    first = [schedule.submit(8) for _ in range(3)]
    assert all(s.op in GPU_OPS for steps in first for s in steps)  # nothing waits while slots are free
    fourth = schedule.submit(8)
    assert [(s.op, s.batch) for s in fourth[:2]] == [("wait", 0), ("emit", 0)]
    assert [s.slot for s in fourth[2:]] == [0] * 4


def test_ragged_tail_keeps_its_size() -> None:
    steps = run_schedule([16, 16, 16, 5], 2)
    tail = [s for s in steps if s.batch == 3]
    assert {s.rows for s in tail} == {5}
    assert [s.op for s in tail] == [*GPU_OPS, "wait", "emit"]
    assert steps[-1] == Step("emit", 3, 1, 5)


def test_empty_batch_comes_out_in_order_without_a_slot() -> None:
    steps = run_schedule([4, 0, 4], 3)
    assert [(s.batch, s.rows) for s in steps if s.op == "emit"] == [(0, 4), (1, 0), (2, 4)]
    empty = [s for s in steps if s.batch == 1]
    assert empty == [Step("emit", 1, -1, 0)]


def test_nothing_submitted_drains_to_nothing() -> None:
    assert SlotSchedule(2).drain() == []


def test_one_slot_cannot_overlap() -> None:
    with pytest.raises(InputError, match="at least 2 slots"):
        SlotSchedule(1)
