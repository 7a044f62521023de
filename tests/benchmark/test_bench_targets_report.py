"""Targets, the report schema check, and the Markdown a person reads."""

from __future__ import annotations

import json
import math

import pytest

from virchow_rt.benchmark.report import render_markdown, validate_report, write_report
from virchow_rt.benchmark.rows import ROWS_BY_KEY, row_stub
from virchow_rt.benchmark.targets import evaluate_targets, format_target


def _row(
    backend: str, precision: str, batch: int, tps: float, min_cos: float = 0.99999, passed: bool = True, **kw
):
    row = {
        "backend": backend,
        "precision": precision,
        "device": kw.pop("device", "cpu"),
        "status": "ok",
        "reason": None,
        "batch_size": batch,
        "tiles_per_s": tps,
        "tiles_per_s_min": tps * 0.9,
        "tiles_per_s_max": tps * 1.1,
        "compute_tiles_per_s": kw.pop("compute", None),
        "compute_reason": "CPU run",
        "latency_ms": {"p50": 1000 * batch / tps, "p99": 1100 * batch / tps},
        "tflops": tps * 12e9 / 1e12,
        "peak_fraction": kw.pop("peak_fraction", 0.3),
        "peak": "cpu-fp32",
        "parity": {
            "min_cosine": min_cos,
            "mean_cosine": 0.999995,
            "p01_cosine": min_cos,
            "max_abs": 1e-3,
            "rel_l2": 1e-3,
            "knn10_overlap": 1.0,
            "passed": passed,
            "tolerance": 0.999,
        },
    }
    row.update(kw)
    return row


def _report(results):
    return {
        "schema_version": 1,
        "environment": {
            "machine": "2-core CPU (Test CPU), no GPU",
            "cpu": {"model": "Test CPU", "usable_cpus": 2, "memory_gb": 8.0, "flags": ["avx2"]},
            "gpu": None,
            "driver": None,
            "cuda": None,
            "os": "Linux",
            "python": "3.11",
            "versions": {"numpy": "2.0"},
            "date": "2025-01-01T00:00:00+00:00",
            "git_commit": "abc",
            "load_average": [0.1, 0.1, 0.1],
        },
        "variant": "virchow2g-mini",
        "weights": "random",
        "random_weights": True,
        "weights_source": "random (seed 0)",
        "command": "virchow-rt bench virchow2g-mini --random-weights --out x",
        "settings": {
            "batch_sizes": [1, 8],
            "tiles": 32,
            "repeats": 3,
            "warmup": 1,
            "tile_source": "tissue",
            "path": "pipeline",
            "compute_only": "GPU only",
            "memory": "VmHWM",
        },
        "flops_per_tile": 12e9,
        "matmul_peaks": {
            "cpu-fp32": {"tflops": 0.1, "size": 2048, "by_library": {"numpy": {"tflops": 0.1, "size": 2048}}}
        },
        "reference": {"key": "torch-eager/fp32", "tiles": "32 tissue tiles"},
        "results": results,
        "targets": evaluate_targets(results, "cpu", "virchow2g-mini"),
        "duration_s": 12.0,
    }


ROWS = [
    _row("torch-eager", "fp32", 1, 3.0, min_cos=1.0),
    _row("torch-eager", "fp32", 8, 3.5, min_cos=1.0),
    _row("onnxruntime-cpu", "fp32", 8, 6.0),
    _row("onnxruntime-cpu", "fp16", 8, 9.0, min_cos=0.99, passed=False),  # fastest but wrong: must not count
    row_stub(
        ROWS_BY_KEY["tensorrt/fp16"], "not available", "not available on this machine: needs a CUDA GPU"
    ),
]


def test_cpu_target_uses_fastest_row_with_parity_passed() -> None:
    targets = {t["name"]: t for t in evaluate_targets(ROWS, "cpu", "virchow2g-mini")}
    cpu = targets["best CPU path vs PyTorch eager fp32, end to end"]
    assert cpu["value"] == pytest.approx(6.0 / 3.5)
    assert cpu["met"] is True and "onnxruntime-cpu/fp32 at batch 8" in cpu["detail"]
    gpu = [t for t in targets.values() if t["device"] == "cuda"]
    assert gpu and all(t["met"] is None and "not applicable" in t["detail"] for t in gpu)
    assert format_target(cpu).startswith("[MET] best CPU path")
    assert "(goal >= 1.3x)" in format_target(cpu)


def test_gpu_targets_measure_speedup_peak_e2e_and_parity() -> None:
    rows = [
        _row("torch-eager", "fp32", 32, 100.0, min_cos=1.0, device="cuda"),
        _row("torch-eager", "fp16-autocast", 32, 200.0, min_cos=0.9995, device="cuda"),
        _row(
            "tensorrt",
            "fp16",
            32,
            500.0,
            min_cos=0.9993,
            device="cuda",
            compute=520.0,
            compute_peak_fraction=0.7,
        ),
        _row("torch-cuda", "fp16", 64, 420.0, min_cos=0.9996, device="cuda", compute=480.0),
        _row(
            "torch-cuda-compile",
            "fp16",
            64,
            450.0,
            min_cos=0.9991,
            device="cuda",
            compute=470.0,
            compute_peak_fraction=0.55,
        ),  # fmt: skip
        _row(
            "torch-cuda", "fp16", 128, 900.0, min_cos=0.99, passed=False, device="cuda"
        ),  # wrong: not counted
    ]
    got = {t["name"]: t for t in evaluate_targets(rows, "cuda", "virchow2")}
    assert got["best path vs PyTorch fp16 autocast eager"]["value"] == pytest.approx(2.5)
    assert got["fraction of the measured matmul peak"]["value"] == pytest.approx(0.7)
    assert got["end to end vs compute-only"]["value"] == pytest.approx(500 / 520)
    assert got["fp16 parity, min cosine"]["value"] == pytest.approx(0.99)  # the failed row is the worst
    # the torch-cuda targets judge the fastest torch-cuda row with parity passed (the compiled one here)
    assert got["torch-cuda pipeline vs TRIDENT-style fp16 autocast, end to end"]["value"] == pytest.approx(
        2.25
    )
    assert got["torch-cuda end to end vs its compute-only"]["value"] == pytest.approx(450 / 470)
    cuda_peak = got["torch-cuda fraction of the measured matmul peak"]
    assert cuda_peak["value"] == pytest.approx(0.55) and cuda_peak["met"] is False
    assert got["torch-cuda tiles/s end to end"]["value"] == pytest.approx(450.0)
    assert (
        got["torch-cuda tiles/s end to end"]["met"] is False
        and "set for virchow2g-mini" in (got["torch-cuda tiles/s end to end"]["detail"])
    )
    assert format_target(got["torch-cuda tiles/s end to end"]).startswith("[NOT MET]")
    assert "450 tiles/s (goal >= 10,000 tiles/s)" in format_target(got["torch-cuda tiles/s end to end"])
    assert got["best CPU path vs PyTorch eager fp32, end to end"]["met"] is None


def test_validate_report_accepts_a_sound_report_and_names_problems() -> None:
    report = _report(ROWS)
    assert validate_report(report) == []
    bad = json.loads(json.dumps(report))
    bad["results"][2]["tiles_per_s"] = float("nan")
    bad["results"][3]["parity"]["min_cosine"] = None
    bad["results"][4]["reason"] = ""
    del bad["environment"]["cuda"]
    problems = validate_report(bad)
    assert any("onnxruntime-cpu/fp32 batch 8" in p and "tiles_per_s" in p for p in problems)
    assert any("parity.min_cosine" in p for p in problems)
    assert any("without a reason" in p for p in problems)
    assert any("environment lacks 'cuda'" in p for p in problems)


def test_markdown_names_random_weights_machine_command_and_missing_rows() -> None:
    md = render_markdown(_report(ROWS), plots=["/x/throughput.png"])
    assert "RANDOM WEIGHTS" in md.splitlines()[0]
    assert "2-core CPU (Test CPU), no GPU" in md
    assert "`virchow-rt bench virchow2g-mini --random-weights --out x`" in md
    assert "`tensorrt/fp16`: not available on this machine: needs a CUDA GPU" in md
    assert "| `onnxruntime-cpu` | fp16 | 8 | 0.9900000 |" in md and "FAIL" in md
    assert "![throughput](throughput.png)" in md
    assert "[MET] best CPU path" in md


def test_write_report_writes_both_files_and_no_leftovers(tmp_path) -> None:
    report = _report(ROWS)
    json_path, md_path = write_report(tmp_path, report)
    loaded = json.loads(json_path.read_text())
    assert loaded["results"][2]["tiles_per_s"] == 6.0
    assert md_path.read_text().startswith("# virchow-rt benchmark")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    assert all(math.isfinite(r["tiles_per_s"]) for r in loaded["results"] if r["status"] == "ok")


def test_rows_that_shared_the_cpu_are_flagged_in_the_table_and_the_target() -> None:
    rows = [
        _row("torch-eager", "fp32", 8, 3.0, min_cos=1.0, cpu_utilization=0.55),
        _row("onnxruntime-cpu", "fp32", 8, 6.0, cpu_utilization=0.99),
    ]
    report = _report(rows)
    md = render_markdown(report)
    assert "| 55% (shared) |" in md and "| 99% |" in md
    cpu = next(t for t in report["targets"] if t["device"] == "cpu")
    assert "torch-eager/fp32 at batch 8: 3 tiles/s (shared CPU: 55% of the cores)" in cpu["detail"]
