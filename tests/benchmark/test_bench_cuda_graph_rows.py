"""torch-cuda rows measure like with like: every slot warmed up before timing, graphs at every batch size.

A stand-in for the torch-cuda backend keeps its slot and graph bookkeeping (slots taken in turn from the
first in each pipeline pass; a slot's first full batch runs eager and is captured, later ones replay);
the real one is checked on a GPU by the ``gpu`` tier and the GPU check.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from bench_fakes import FakeBackend, fake_embed

from virchow_rt.benchmark import run_benchmark, runner
from virchow_rt.benchmark.backends import graph_use
from virchow_rt.benchmark.rows import Machine
from virchow_rt.errors import RandomWeightsWarning

GPU = Machine(has_cuda=True, importable=("torch", "timm", "cuda.bindings.runtime"))


class FakeGraphBackend(FakeBackend):
    """torch-cuda's slots and CUDA graphs without a GPU: counts the runs that replay and that run eager."""

    def __init__(self, max_batch: int, slots: int = 3) -> None:
        super().__init__("torch-cuda", max_batch=max_batch)
        self.slots, self.captured, self.replayed, self.eager = slots, set(), 0, 0

    def pipeline(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for k, batch in enumerate(batches):  # a fresh schedule per pass: slot 0 first
            full, slot = len(batch) == self.max_batch, k % self.slots
            if full and slot in self.captured:
                self.replayed += 1
            else:
                self.eager += 1
                if full:
                    self.captured.add(slot)
            yield fake_embed(batch)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        step = self.max_batch or len(tiles)
        return np.concatenate(list(self.pipeline(tiles[i : i + step] for i in range(0, len(tiles), step))))

    def graph_use(self) -> dict[str, int]:
        return {"replayed": self.replayed, "eager": self.eager, "slots_captured": len(self.captured)}

    def time_compute(self, tiles: np.ndarray, *, repeats: int, warmup: int) -> list[float]:
        return [1e-3] * repeats


def test_graph_use_counts_the_runs_since_an_earlier_reading() -> None:
    backend = FakeGraphBackend(max_batch=4)
    assert graph_use(FakeBackend()) is None  # a backend that does not count
    before = graph_use(backend)
    backend.run(np.zeros((12, 8, 8, 3), np.uint8))  # three full batches, slots 0-2: captured, eager
    assert graph_use(backend, since=before) == {"replayed": 0, "eager": 3, "slots_captured": 3}


def test_torch_cuda_rows_replay_graphs_at_every_batch_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    opened: list[FakeGraphBackend] = []

    def open_fake(spec: Any, device: str, *, max_batch: int | None = None, **_: Any) -> FakeBackend:
        if spec.kind != "torch-cuda":
            return FakeBackend(spec.backend)  # the reference
        opened.append(FakeGraphBackend(max_batch or 0))
        return opened[-1]

    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls: GPU))
    monkeypatch.setattr(runner, "open_row_backend", open_fake)
    monkeypatch.setattr(runner.BenchmarkRun, "build_reference", lambda self, w, r: None)
    monkeypatch.setattr(runner.roofline, "measure_peaks", lambda keys: {})
    with pytest.warns(RandomWeightsWarning):
        report = run_benchmark(
            "virchow2g-mini-tiny", tmp_path / "out", random_weights=True, backends=["torch-cuda"],
            batch_sizes=[4, 8], tiles=16, repeats=2, warmup=1, progress=False, echo=lambda _: None,
        )  # fmt: skip
    rows = {r["batch_size"]: r for r in report["results"] if r["backend"] == "torch-cuda"}
    # one backend per batch size, sized for it: graphs replay only for full (max_batch) batches
    assert [b.max_batch for b in opened] == [4, 8] and all(b.closed for b in opened)
    for batch, row in rows.items():
        assert row["status"] == "ok", row["reason"]
        # every timed batch replayed: the slots were captured in the warm-up, none in a timed pass
        assert row["cuda_graphs"] == {"replayed": 2 * 16 // batch, "eager": 0, "slots_captured": 3}
    reference = next(r for r in report["results"] if r["backend"] == "torch-eager")
    assert reference["cuda_graphs"] is None


@pytest.mark.gpu
def test_torch_cuda_rows_replay_graphs_on_a_gpu(tmp_path: Any) -> None:
    pytest.importorskip("torch")
    with pytest.warns(RandomWeightsWarning):
        report = run_benchmark(
            "virchow2-tiny", tmp_path / "out", random_weights=True, backends=["torch-cuda"],
            batch_sizes=[4, 8], tiles=16, repeats=2, progress=False, echo=lambda _: None,
        )  # fmt: skip
    rows = {r["batch_size"]: r for r in report["results"] if r["backend"] == "torch-cuda"}
    assert set(rows) == {4, 8}
    for batch, row in rows.items():
        assert row["status"] == "ok", row["reason"]
        assert row["cuda_graphs"] == {"replayed": 2 * 16 // batch, "eager": 0, "slots_captured": 3}
        assert row["parity"]["min_cosine"] >= 0.999
