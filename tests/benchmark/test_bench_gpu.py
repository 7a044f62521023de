"""GPU paths of the benchmark: CUDA-event peaks, GPU rows, GPU memory (skipped where no GPU is visible)."""

from __future__ import annotations

import pytest

from virchow_rt.benchmark import run_benchmark
from virchow_rt.benchmark.report import validate_report
from virchow_rt.benchmark.roofline import measure_matmul_peak

pytestmark = pytest.mark.gpu


def test_cuda_fp16_matmul_peak_is_timed_with_events() -> None:
    peak = measure_matmul_peak("cuda", "fp16", size=2048, repeats=3)
    assert peak["library"] == "torch"
    assert 1.0 < peak["tflops"] < 5000  # any CUDA GPU with tensor cores does more than 1 TFLOP/s in fp16


def test_bench_tiny_torch_rows_on_the_gpu(tmp_path) -> None:
    report = run_benchmark(
        "virchow2-tiny",
        tmp_path,
        random_weights=True,
        backends=["torch-eager"],
        batch_sizes=[4],
        tiles=8,
        repeats=2,
        progress=False,
        echo=lambda _: None,
    )
    assert validate_report(report) == []
    ok = {r["precision"]: r for r in report["results"] if r["status"] == "ok"}
    assert set(ok) == {"fp32", "fp16-autocast"}
    assert all(r["device"] == "cuda" and r["peak_memory"]["gpu_peak_mb"] > 0 for r in ok.values())
    assert all(r["compute_tiles_per_s"] > 0 and r["compute_reason"] is None for r in ok.values())  # events
    assert ok["fp16-autocast"]["parity"]["min_cosine"] >= 0.999
    assert report["environment"]["gpu"] and report["matmul_peaks"]["cuda-fp16"]["tflops"] > 1.0
