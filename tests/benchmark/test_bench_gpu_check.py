"""The GPU check's own logic on the CPU: step bookkeeping, test outcomes, copy hiding, the summary.

The whole script runs in CI as ``bench/gpu_check.sh --dry-run`` (tiny configs, GPU steps skipped).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virchow_rt.benchmark import gpu_check
from virchow_rt.benchmark.gpu_check import DRY, Checker, copy_hiding, junit_outcomes, render_markdown

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.export.test_torch_cuda_gpu" name="test_matches_the_fp32_reference" time="1.2"/>
<testcase classname="tests.tensorrt.test_cuda_gpu" name="test_graph_capture_replays_the_work" time="0.1">
  <failure message="AssertionError: graphs differ&#10;second line">trace</failure></testcase>
<testcase classname="tests.tensorrt.test_trt_engine_real" name="test_open_backend_runs_engines" time="0">
  <skipped type="pytest.skip" message="TensorRT is not installed">skip</skipped></testcase>
<testcase classname="tests.runtime.test_x" name="test_y" time="0"><error message="fixture broke"/></testcase>
</testsuite></testsuites>
"""


def test_junit_outcomes_keep_every_test_and_its_first_message_line(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(JUNIT)
    cases = junit_outcomes(tmp_path / "j.xml")
    assert [c["outcome"] for c in cases] == ["passed", "failed", "skipped", "error"]
    assert cases[0]["test"] == "tests/export/test_torch_cuda_gpu.py::test_matches_the_fp32_reference"
    assert cases[1]["message"] == "AssertionError: graphs differ" and cases[0]["message"] is None


def test_copy_hiding_is_bounded_by_what_end_to_end_adds_to_compute() -> None:
    tile, emb = 224 * 224 * 3, 2560 * 4
    row = {"batch_size": 64, "tiles_per_s": 1000.0, "compute_tiles_per_s": 1000.0}
    assert copy_hiding(row, tile, emb, 50.0, 50.0)["hidden_fraction_at_least"] == 1.0  # all hidden
    copy_ms = (64 * tile + 64 * emb) / 50e9 * 1e3
    slower = {**row, "tiles_per_s": 64 / (0.064 + copy_ms / 2e3)}  # half a batch's copies in view
    got = copy_hiding(slower, tile, emb, 50.0, 50.0)
    assert got["copy_ms_if_serial"] == pytest.approx(copy_ms)
    assert got["hidden_fraction_at_least"] == pytest.approx(0.5)
    serial = {**row, "tiles_per_s": 10.0}  # far slower than compute + copies: nothing provably hidden
    assert copy_hiding(serial, tile, emb, 50.0, 50.0)["hidden_fraction_at_least"] == 0.0


def test_checker_records_failures_skips_and_the_budget(tmp_path: Path) -> None:
    said: list[str] = []
    check = Checker(tmp_path, DRY, gpu=False, log=said.append)
    assert check.step("fine", lambda: {"x": 1}) == {"x": 1}

    def broken() -> None:
        raise ValueError("bad tile")

    assert check.step("broken", broken) is None
    check.step("gpu only", lambda: 1, needs_gpu=True)
    check.step("too long", lambda: 1, min_left=DRY.budget_s + 1)
    steps = check.steps
    assert steps["fine"]["status"] == "ok" and steps["broken"]["reason"] == "ValueError: bad tile"
    assert steps["gpu only"]["status"] == "skipped" and "no CUDA GPU" in steps["gpu only"]["reason"]
    assert steps["too long"]["status"] == "skipped" and "time budget" in steps["too long"]["reason"]
    assert any("broken: FAILED" in line for line in said)


def test_markdown_names_the_machine_failures_and_targets() -> None:
    bench = {
        "rows": [
            {"key": "torch-cuda/fp16", "status": "ok", "batch_size": 64, "tiles_per_s": 1500.0,
             "compute_tiles_per_s": 1600.0, "peak_fraction": 0.4, "compute_peak_fraction": 0.45,
             "min_cosine": 0.9995, "parity_passed": True, "reason": None},
            {"key": "tensorrt/fp16", "status": "not available", "batch_size": None, "reason": "no TensorRT"},
        ],
        "targets": [{"line": "[MET] torch-cuda end to end vs its compute-only: 93.8%"}],
    }  # fmt: skip
    tests = {"counts": {"passed": 1, "failed": 1}, "tests": [
        {"test": "tests/a.py::test_ok", "outcome": "passed", "message": None},
        {"test": "tests/b.py::test_bad", "outcome": "failed", "message": "AssertionError: off"}]}  # fmt: skip
    result = {
        "dry_run": False, "machine": "16-core CPU, 1x NVIDIA H200", "duration_s": 400.0,
        "environment": {"driver": "580.159.03", "cuda": "13.0"},
        "steps": {
            "tests": {"status": "ok", "seconds": 90, "reason": None, "result": tests},
            "bench virchow2": {"status": "ok", "seconds": 120, "reason": None, "result": bench},
            "slides": {"status": "failed", "seconds": 3, "reason": "RuntimeError: no reader", "result": None},
        },
    }  # fmt: skip
    md = render_markdown(result)
    assert "NVIDIA H200" in md and "580.159.03" in md and "RANDOM WEIGHTS" in md
    assert "| slides | failed | 3 | RuntimeError: no reader |" in md
    assert (
        "- FAILED `tests/b.py::test_bad`: AssertionError: off" in md
        and "- PASSED `tests/a.py::test_ok`" in md
    )
    assert "| torch-cuda/fp16 | 64 | 1,500 | 1,600 | 45.0% | 0.999500 |" in md
    assert "| tensorrt/fp16 |  | not available: no TensorRT |" in md and "[MET] torch-cuda" in md


def test_a_full_check_refuses_a_machine_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check, "gpu_visible", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU.*--dry-run"):
        gpu_check.run_gpu_check(tmp_path / "out")
