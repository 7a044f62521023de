"""GPU paths of the benchmark: CUDA-event peaks, GPU rows, GPU memory (skipped where no GPU is visible)."""

from __future__ import annotations

import pytest

from virchow_rt.benchmark import run_benchmark
from virchow_rt.benchmark.report import validate_report
from virchow_rt.benchmark.roofline import measure_matmul_peak

pytestmark = pytest.mark.gpu


def test_cuda_fp16_matmul_peak_is_timed_with_events() -> None:
    """The peak against the same matmul timed here with torch's own events, 20 in a row: within a factor
    of two (seconds taken for milliseconds, or a per-call division lost, is 1000x or 4x off)."""
    torch = pytest.importorskip("torch")
    n = 4096
    peak = measure_matmul_peak("cuda", "fp16", size=n, repeats=3)
    assert peak["library"] == "torch" and peak["by_library"]["torch"]["size"] == n
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))
    with torch.inference_mode():
        for _ in range(3):
            torch.matmul(a, b)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            torch.matmul(a, b)
        end.record()
        end.synchronize()
    independent = 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12  # elapsed_time: milliseconds
    assert 0.5 < peak["tflops"] / independent < 2, (peak["tflops"], independent)


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
