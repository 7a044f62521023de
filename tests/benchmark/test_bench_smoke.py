"""`virchow-rt bench` end to end on a tiny config: export (fp32, fp16, int8), every CPU row for real
(PyTorch fp32 and bf16 autocast, ONNX Runtime fp32 / fp16 / int8; torch.compile in the slow tier),
reports, targets and plots.

Runs in the default tier (a few seconds of model work); it checks the files' schema and values, never
the speed.
"""

from __future__ import annotations

import json
import math

import pytest

from virchow_rt.benchmark.report import validate_report
from virchow_rt.benchmark.rows import REFERENCE_KEY, ROWS_BY_KEY, Machine, unavailable_reason
from virchow_rt.cli.main import main
from virchow_rt.registry import get_variant

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

VARIANT = "virchow2g-mini-tiny"
ROWS = (
    "torch-eager/fp32",
    "torch-eager/bf16-autocast",
    "onnxruntime-cpu/fp32",
    "onnxruntime-cpu/fp16",
    "onnxruntime-cpu/int8",
)


def key(row: dict) -> str:
    return f"{row['backend']}/{row['precision']}"


def runnable_here(keys: tuple[str, ...]) -> tuple[set[str], dict[str, str]]:
    """The rows this machine can run, and why the others cannot (the bf16 rows need avx512_bf16 / AMX)."""
    machine = Machine.probe()
    reasons = {k: unavailable_reason(ROWS_BY_KEY[k], machine) for k in keys}
    return {k for k, why in reasons.items() if why is None}, {k: why for k, why in reasons.items() if why}


def bench(tmp_path, rows: tuple[str, ...], *extra: str) -> dict:
    out = tmp_path / "bench"
    argv = ["bench", VARIANT, "--random-weights", "--backends", ",".join(rows), "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


def check_parity(row: dict) -> None:
    """Each row agrees with the reference as well as the variant's gate for its precision demands."""
    tolerance = get_variant(VARIANT).tolerance
    precision = ROWS_BY_KEY[key(row)].parity_precision
    parity = row["parity"]
    assert parity["reference"] == REFERENCE_KEY and parity["passed"], parity
    assert parity["min_cosine"] >= tolerance.min_cosine(precision) == parity["tolerance"], parity
    assert parity["knn10_overlap"] >= (tolerance.min_knn10(precision) or 0.9), parity


def measured(report: dict) -> list[dict]:
    return [r for r in report["results"] if r["status"] == "ok"]


def test_bench_tiny_writes_sound_reports(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    report = bench(tmp_path, (*ROWS, "tensorrt"), "--batch-sizes", "1,4", "--tiles", "8", "--repeats", "2")
    assert validate_report(report) == []
    assert report["variant"] == VARIANT
    assert report["weights"] == "random" and report["random_weights"] is True
    assert report["environment"]["cpu"]["model"]
    assert report["flops_per_tile"] > 0

    runnable, reasons = runnable_here(ROWS)
    ok = {(key(r), r["batch_size"]): r for r in measured(report)}
    assert set(ok) == {(row, b) for row in runnable for b in (1, 4)}  # every runnable row at every batch size
    for k, why in reasons.items():
        rows = [r for r in report["results"] if key(r) == k]
        assert rows and all(r["status"] == "not available" and why in r["reason"] for r in rows)
    for row in ok.values():
        assert math.isfinite(row["tiles_per_s"]) and row["tiles_per_s"] > 0
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["tflops"] > 0 and row["peak_fraction"] > 0
        assert row["parity"]["tiles"] == 8
        check_parity(row)
    assert ok[("onnxruntime-cpu/int8", 4)]["artifact"]["path"] == f"{VARIANT}.int8.onnx"
    # the reference against itself at another batch size: the same numbers up to summation order
    assert ok[("torch-eager/fp32", 4)]["parity"]["max_abs"] < 1e-4
    if "torch-eager/bf16-autocast" in runnable:  # it really ran in bf16: close to fp32, not equal
        assert 0 < ok[("torch-eager/bf16-autocast", 4)]["parity"]["max_abs"]
    export = report["export"]
    assert {a["precision"] for a in export["artifacts"]} == {"fp32", "fp16", "int8"}
    assert all(a["size_bytes"] > 0 for a in export["artifacts"])
    assert not any(p.name.startswith(".export-") for p in out.iterdir())  # the scratch export is gone

    md = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in md and report["environment"]["machine"] in md and report["command"] in md
    for png in ("throughput.png", "parity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    targets = {t["name"].split(",")[0].split(" (")[0]: t for t in report["targets"]}
    if report["environment"]["gpu"] is None:
        trt = [r for r in report["results"] if r["backend"] == "tensorrt"]
        assert trt and trt[0]["status"] == "not available"
        assert trt[0]["reason"].startswith("not available on this machine:")
        assert all(r["compute_tiles_per_s"] is None and r["compute_reason"] for r in ok.values())
        # the CPU targets, from the rows above: the fastest row with parity passed over the reference
        passed = [r for r in ok.values() if r["parity"]["passed"]]
        base = max(r["tiles_per_s"] for r in passed if key(r) == REFERENCE_KEY)
        best = max(r["tiles_per_s"] for r in passed if key(r) != REFERENCE_KEY)
        int8 = max(r["tiles_per_s"] for r in passed if r["precision"] == "int8")
        torch_best = max(r["tiles_per_s"] for r in passed if r["backend"].startswith("torch-"))
        for name, value in (
            ("best CPU path vs PyTorch eager fp32", best / base),
            ("int8 vs the best PyTorch path", int8 / torch_best),
        ):
            target = targets[name]
            assert target["value"] == pytest.approx(value) and target["met"] == (value >= target["threshold"])
            line = next(line for line in printed.splitlines() if name in line)
            assert (
                line.strip().startswith("[MET]" if target["met"] else "[NOT MET]") and f"{value:.3g}x" in line
            )
    else:
        assert all(t["met"] is None for t in report["targets"] if t["device"] == "cpu")


@pytest.mark.slow
def test_bench_tiny_compiled_row(tmp_path) -> None:
    """torch.compile + bf16 autocast, for real (minutes of compilation on a small CPU: the slow tier)."""
    row_key = "torch-compile/bf16-autocast"
    report = bench(tmp_path, (REFERENCE_KEY, row_key), "--batch-sizes", "4", "--tiles", "4", "--repeats", "1")
    assert validate_report(report) == []
    runnable, reasons = runnable_here((row_key,))
    (row,) = [r for r in report["results"] if key(r) == row_key]
    if row_key not in runnable:
        assert row["status"] == "not available" and reasons[row_key] in row["reason"]
        return
    assert row["status"] == "ok", row
    assert row["tiles_per_s"] > 0 and row["first_call_s"] > 0
    check_parity(row)
    assert 0 < row["parity"]["max_abs"]  # bf16, not the fp32 reference again
