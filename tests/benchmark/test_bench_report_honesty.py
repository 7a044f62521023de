"""A bench report says only what was measured: a target against "the best PyTorch path" is not met by
beating eager fp32 alone, another machine's goals are counted, not listed one by one, the Reproduce line
reproduces (warm-up included), and a run on an existing export says so instead of "took — s"."""

from __future__ import annotations

from test_bench_targets_report import _report, _row

from virchow_rt.benchmark import _command
from virchow_rt.benchmark.report import render_markdown
from virchow_rt.benchmark.rows import ROWS_BY_KEY, row_stub
from virchow_rt.benchmark.runner import Settings
from virchow_rt.benchmark.targets import evaluate_targets, target_lines

INT8 = "int8 vs the best PyTorch path (eager fp32, bf16 autocast, compiled bf16), end to end"


def _int8_target(rows):
    return {t["name"]: t for t in evaluate_targets(rows, "cpu", "virchow2g-mini")}[INT8]


def test_int8_against_eager_fp32_alone_is_not_a_verdict() -> None:
    rows = [_row("torch-eager", "fp32", 8, 10.0), _row("onnxruntime-cpu", "int8", 8, 30.0)]
    target = _int8_target(rows)
    assert target["met"] is None and "not PyTorch's best CPU path" in target["detail"]
    with_bf16 = [*rows, _row("torch-eager", "bf16-autocast", 8, 20.0)]
    assert _int8_target(with_bf16)["met"] is True  # 30 / 20 >= 1.3


def test_a_cpu_without_bf16_units_compares_with_eager_fp32() -> None:
    spec = ROWS_BY_KEY["torch-eager/bf16-autocast"]
    rows = [
        _row("torch-eager", "fp32", 8, 10.0),
        _row("onnxruntime-cpu", "int8", 8, 30.0),
        row_stub(spec, "not available", "the CPU has no bf16 dot-product instructions"),
    ]
    assert _int8_target(rows)["met"] is True


def test_other_machines_targets_are_counted_not_listed() -> None:
    rows = [_row("torch-eager", "fp32", 8, 10.0), _row("onnxruntime-cpu", "fp32", 8, 20.0)]
    lines = target_lines(evaluate_targets(rows, "cpu", "virchow2g-mini"), "cpu")
    assert not any(line.startswith("[n/a]") for line in lines)
    assert lines[-1].endswith("CUDA targets apply to another kind of machine)")
    md = render_markdown({**_report(rows), "device": "cpu"}, plots=[])
    assert "[n/a]" not in md


def test_reproduce_line_keeps_the_warm_up() -> None:
    settings = Settings(batch_sizes=(8,), tiles=32, repeats=2, warmup=1, seed=0)
    command = _command("virchow2g-mini", "out/b", None, True, None, settings)
    assert "--warmup 1" in command and "--repeats 2" in command


def test_an_existing_export_is_not_timed_as_one() -> None:
    report = {**_report([_row("torch-eager", "fp32", 8, 10.0)]), "device": "cpu"}
    artifact = {"path": "m.fp32.onnx", "format": "onnx", "precision": "fp32", "size_bytes": 1e6}
    report["export"] = {"source": "export folder x", "export_s": None, "artifacts": [artifact]}
    md = render_markdown(report, plots=[])
    assert "took — s" not in md and "an existing export" in md
