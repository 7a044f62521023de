"""`virchow-rt bench` end to end on a tiny config: export, ONNX Runtime + PyTorch rows, reports, plots.

Runs in the default tier (a few seconds of model work); it checks the files' schema and values, never
the speed.
"""

from __future__ import annotations

import json
import math

import pytest

from virchow_rt.benchmark.report import validate_report
from virchow_rt.cli.main import main

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

ROWS = ("torch-eager/fp32", "onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16")


def measured(report: dict) -> list[dict]:
    return [r for r in report["results"] if r["status"] == "ok"]


def test_bench_tiny_writes_sound_reports(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "virchow2g-mini-tiny", "--random-weights", "--backends", ",".join((*ROWS, "tensorrt"))]
    argv += ["--batch-sizes", "1,4", "--tiles", "8", "--repeats", "2", "--out", str(out)]
    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert validate_report(report) == []
    assert report["variant"] == "virchow2g-mini-tiny"
    assert report["weights"] == "random" and report["random_weights"] is True
    assert report["environment"]["cpu"]["model"]
    assert report["flops_per_tile"] > 0

    ok = {(f"{r['backend']}/{r['precision']}", r["batch_size"]): r for r in measured(report)}
    assert set(ok) == {(row, b) for row in ROWS for b in (1, 4)}  # every requested row at every batch size
    for (key, _), row in ok.items():
        assert math.isfinite(row["tiles_per_s"]) and row["tiles_per_s"] > 0
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["tflops"] > 0 and row["peak_fraction"] > 0
        parity = row["parity"]
        assert parity["tiles"] == 8 and parity["reference"] == "torch-eager/fp32"
        # the export gates fp32 at 0.99999 and fp16 at 0.999; the bench must see the same agreement
        assert parity["min_cosine"] >= (0.99999 if key.endswith("fp32") else 0.999), parity
        assert parity["passed"] and parity["knn10_overlap"] > 0.9
    # the reference against itself at another batch size: the same numbers up to summation order
    assert ok[("torch-eager/fp32", 4)]["parity"]["max_abs"] < 1e-4
    if report["environment"]["gpu"] is None:
        trt = [r for r in report["results"] if r["backend"] == "tensorrt"]
        assert trt and trt[0]["status"] == "not available"
        assert trt[0]["reason"].startswith("not available on this machine:")
        assert all(r["compute_tiles_per_s"] is None and r["compute_reason"] for r in ok.values())
    export = report["export"]
    assert {a["precision"] for a in export["artifacts"]} == {"fp32", "fp16"}
    assert all(a["size_bytes"] > 0 for a in export["artifacts"])
    assert not any(p.name.startswith(".export-") for p in out.iterdir())  # the scratch export is gone

    md = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in md and report["environment"]["machine"] in md and report["command"] in md
    for png in ("throughput.png", "parity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "best CPU path vs PyTorch eager fp32" in printed or "n/a" in printed
