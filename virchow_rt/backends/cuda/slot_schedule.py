"""The pipelined executor's bookkeeping, pure: which batch uses which buffer slot, and when to wait.

:class:`~virchow_rt.backends.tensorrt.TensorRTBackend` follows these steps; they are
unit-tested on the CPU.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from virchow_rt.errors import InputError


@dataclass(frozen=True)
class Step:
    """One action of the pipelined executor: ``op`` on ``batch`` (of ``rows`` tiles) in ``slot``.

    ops: "fill" (host copies the batch into the slot's pinned input), "h2d", "compute", "d2h" (queued
    on their streams, never blocking), "wait" (host blocks until the slot's D2H is done), "emit"
    (host hands out the result). A batch of zero rows uses no slot (-1) and is only emitted.
    """

    op: str
    batch: int
    slot: int
    rows: int


class SlotSchedule:
    """Round-robin assignment of batches to ``slots`` buffer sets, results in submission order.

    A slot is reused only after the host has waited for its previous batch's D2H and emitted it, so
    with ``slots >= 2`` batch k+1's H2D is always queued before batch k's D2H is waited for.
    """

    def __init__(self, slots: int) -> None:
        if slots < 2:
            raise InputError(f"a pipeline needs at least 2 slots to overlap copies with compute, got {slots}")
        self.slots = slots
        self.submitted = 0
        self.in_flight: collections.deque[Step] = collections.deque()  # their "d2h" steps, oldest first

    def _retire_oldest(self) -> list[Step]:
        d2h = self.in_flight.popleft()
        return [Step("wait", d2h.batch, d2h.slot, d2h.rows), Step("emit", d2h.batch, d2h.slot, d2h.rows)]

    def submit(self, rows: int) -> list[Step]:
        """Steps to run, in order, when the next batch (of ``rows`` tiles) arrives."""
        k = self.submitted
        self.submitted += 1
        steps: list[Step] = []
        if rows == 0:  # nothing to compute, but it must come out after the batches before it
            while self.in_flight:
                steps += self._retire_oldest()
            return [*steps, Step("emit", k, -1, 0)]
        while len(self.in_flight) >= self.slots:
            steps += self._retire_oldest()
        slot = k % self.slots
        assert all(s.slot != slot for s in self.in_flight), "round-robin slot still busy"
        steps += [Step(op, k, slot, rows) for op in ("fill", "h2d", "compute", "d2h")]
        self.in_flight.append(steps[-1])
        return steps

    def drain(self) -> list[Step]:
        """Steps that hand out every batch still in flight, in order."""
        steps: list[Step] = []
        while self.in_flight:
            steps += self._retire_oldest()
        return steps
