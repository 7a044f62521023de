"""FLOPs, achieved TFLOP/s and the measured matmul peak."""

from __future__ import annotations

import itertools

import pytest

from virchow_rt._deps import is_importable
from virchow_rt.benchmark import roofline
from virchow_rt.benchmark.roofline import achieved_tflops, measure_matmul_peak, peak_key
from virchow_rt.benchmark.timing import Stats
from virchow_rt.errors import InputError
from virchow_rt.registry import get_variant


def test_peak_classes() -> None:
    assert peak_key("cpu", "fp32") == "cpu-fp32"
    assert peak_key("cpu", "fp16") == "cpu-fp32"  # no fp16 matmul units on a CPU
    assert peak_key("cpu", "bf16-autocast") == "cpu-bf16"
    assert peak_key("cuda", "fp16-autocast") == "cuda-fp16"
    with pytest.raises(InputError, match="no matmul peak class"):
        peak_key("tpu", "fp32")


def test_achieved_tflops_from_the_variant_flops() -> None:
    flops = get_variant("virchow2").flops_per_tile()
    assert 3.0e11 < flops < 3.6e11  # the ~330-340 GFLOP/tile of the model card
    assert achieved_tflops(flops, 100.0) == pytest.approx(flops * 100 / 1e12)
    assert achieved_tflops(flops, None) is None


def test_cpu_fp32_matmul_peak_is_the_best_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real matmuls run, on a clock whose samples are known: 3t, t, 2t per library (its best is t)."""
    t = 1e-3
    steps = itertools.chain.from_iterable((0.0, d) for d in itertools.cycle([3 * t, t, 2 * t]))
    readings = itertools.accumulate(steps)  # each sample reads the clock at its start and its end

    def clock() -> float:
        return next(readings)

    real_time_calls = roofline.time_calls
    monkeypatch.setattr(roofline, "time_calls", lambda fn, **kw: real_time_calls(fn, clock=clock, **kw))
    peak = measure_matmul_peak("cpu", "fp32", size=256, repeats=3)
    assert peak["key"] == "cpu-fp32" and peak["size"] == 256
    assert "numpy" in peak["by_library"]  # always there; torch and onnxruntime where installed
    for library in ("torch", "onnxruntime"):
        assert (library in peak["by_library"]) == is_importable(library)
    for figure in peak["by_library"].values():  # 2·n³ FLOPs over the best sample, in TFLOP/s
        assert figure["size"] == 256 and figure["tflops"] == pytest.approx(2 * 256**3 / t / 1e12)
    assert peak["library"] in peak["by_library"]
    assert peak["tflops"] == max(v["tflops"] for v in peak["by_library"].values())


def test_the_peak_is_the_fastest_library(monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = {"numpy": 4e-3, "torch": 1e-3, "onnxruntime": 2e-3}

    def measure(library: str, n: int, device: str, dtype: str, repeats: int) -> Stats:
        return Stats((seconds[library] * 2, seconds[library]))

    monkeypatch.setattr(roofline, "_measure", measure)
    peak = measure_matmul_peak("cpu", "fp32", size=4096, repeats=2)
    assert peak["library"] == "torch" and peak["tflops"] == pytest.approx(2 * 4096**3 / 1e-3 / 1e12)
    assert peak["by_library"]["numpy"]["size"] == 2048  # numpy's cap: its GEMM is slow at 4096
    assert peak["by_library"]["numpy"]["tflops"] == pytest.approx(2 * 2048**3 / 4e-3 / 1e12)


def test_a_peak_no_library_can_measure_says_why() -> None:
    peak = measure_matmul_peak("cuda", "fp16", size=64, repeats=1)
    if peak["tflops"] is None:  # no GPU here
        assert peak["library"] is None and "fp16" in peak["reason"] and "cuda" in peak["reason"]
    else:
        assert peak["library"] == "torch" and peak["tflops"] > 0
