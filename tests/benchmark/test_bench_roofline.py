"""FLOPs, achieved TFLOP/s and the measured matmul peak."""

from __future__ import annotations

import math

import pytest

from virchow_rt.benchmark.roofline import achieved_tflops, measure_matmul_peak, peak_key
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


def test_cpu_fp32_matmul_peak_is_the_best_library() -> None:
    peak = measure_matmul_peak("cpu", "fp32", size=256, repeats=2)
    assert peak["key"] == "cpu-fp32" and peak["size"] == 256
    assert "numpy" in peak["by_library"]  # always there; torch and onnxruntime where installed
    assert peak["library"] in peak["by_library"]
    assert math.isfinite(peak["tflops"]) and 1e-4 < peak["tflops"] < 100  # a CPU: 0.1 GFLOP/s .. 100 TFLOP/s
    assert peak["tflops"] == max(v["tflops"] for v in peak["by_library"].values())
    assert all(v["size"] == 256 for v in peak["by_library"].values())


def test_a_peak_no_library_can_measure_says_why() -> None:
    peak = measure_matmul_peak("cuda", "fp16", size=64, repeats=1)
    if peak["tflops"] is None:  # no GPU here
        assert peak["library"] is None and "fp16" in peak["reason"] and "cuda" in peak["reason"]
    else:
        assert peak["library"] == "torch" and peak["tflops"] > 0
