"""The whole benchmark run with fake backends: rows, stubs, failures, parity, reports and plots (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_fakes import FakeBackend

from virchow_rt.benchmark import run_benchmark, runner
from virchow_rt.benchmark.report import read_rows, validate_report
from virchow_rt.benchmark.rows import Machine
from virchow_rt.contract import Manifest
from virchow_rt.errors import RandomWeightsWarning

CPU_ONLY = Machine(
    has_cuda=False,
    cpu_flags=("avx2", "avx512_bf16"),
    ort_providers=("CPUExecutionProvider",),
    importable=("torch", "timm", "onnxruntime"),
)
NOISE = {"torch-eager/fp32": 0.0, "torch-eager/bf16-autocast": 3e-3, "onnxruntime-cpu/fp32": 1e-7}


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """run_benchmark with this machine = CPU_ONLY, no export, no torch model, fake backends."""
    opened: list[FakeBackend] = []
    names: dict[str, str] = {}  # row key -> the name the backend reports (a test may make ORT "fall back")

    def open_fake(spec, device, **_):
        name = names.get(spec.key, spec.backend)
        if spec.key == "onnxruntime-cpu/fp16":
            backend = FakeBackend(name, noise=1e-3, max_batch=4)
        elif spec.key == "onnxruntime-cpu/fp32":
            backend = FakeBackend(name, noise=NOISE[spec.key], fail="fail" in str(tmp_path))
        else:
            backend = FakeBackend(name, noise=NOISE[spec.key])
        opened.append(backend)
        return backend

    def fake_export(self, specs, out, weights, random_weights):
        self.source.folder, self.source.exported_here, self.source.export_s = tmp_path / "export", False, 0.1
        self.source.manifest = Manifest.from_dict(
            {
                "weights": {"random": True, "sha256": "random"},
                "artifacts": [
                    {"path": "x.fp32.onnx", "precision": "fp32", "format": "onnx", "size_bytes": 10}
                ],
            }
        )

    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls: CPU_ONLY))
    monkeypatch.setattr(runner, "open_row_backend", open_fake)
    monkeypatch.setattr(runner.BenchmarkRun, "export", fake_export)
    monkeypatch.setattr(runner.BenchmarkRun, "build_reference", lambda self, w, r: None)
    monkeypatch.setitem(runner.roofline.DEFAULT_SIZE, "cpu", 128)
    fake_run = type("FakeRun", (), {"opened": opened, "names": names})
    return fake_run


def test_run_with_fake_backends_writes_a_sound_report(fake_run, tmp_path) -> None:
    out = tmp_path / "out"
    lines: list[str] = []
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS: benchmarking virchow2g-mini-tiny"):
        report = run_benchmark(
            "virchow2g-mini-tiny",
            out,
            random_weights=True,
            batch_sizes=[2, 8],
            tiles=6,
            repeats=2,
            progress=False,
            echo=lines.append,
        )
    assert validate_report(report) == []
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "report.md").read_text().splitlines()[0].endswith("(RANDOM WEIGHTS)")
    for png in ("throughput.png", "parity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ok = {
        (r["backend"] + "/" + r["precision"], r["batch_size"]): r
        for r in report["results"]
        if r["status"] == "ok"
    }
    expected = {
        "torch-eager/fp32",
        "torch-eager/bf16-autocast",
        "onnxruntime-cpu/fp32",
        "onnxruntime-cpu/fp16",
    }
    assert {k for k, _ in ok} == expected
    # tiles per pass rounded up to whole batches: 6 -> 6 at batch 2, 8 at batch 8
    assert ok[("torch-eager/fp32", 2)]["tiles"] == 6 and ok[("torch-eager/fp32", 8)]["tiles"] == 8
    # the reference is compared with itself: exact; the noisy rows are not, and parity says so
    assert ok[("torch-eager/fp32", 8)]["parity"]["min_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert 0.99 < ok[("torch-eager/bf16-autocast", 2)]["parity"]["min_cosine"] < 1.0
    for row in ok.values():
        assert row["tiles_per_s"] > 0 and row["latency_ms"]["p99"] >= row["latency_ms"]["p50"] > 0
        assert row["compute_tiles_per_s"] is None and "CPU run" in row["compute_reason"]
        assert row["peak"] in ("cpu-fp32", "cpu-bf16") and row["peak_fraction"] > 0
        assert row["parity"]["knn10_overlap"] <= 1.0

    by_status = {}
    for r in report["results"]:
        by_status.setdefault(r["status"], []).append(r)
    too_big = [r for r in by_status["not available"] if r["backend"] == "onnxruntime-cpu"]
    assert too_big and too_big[0]["batch_size"] == 8 and "max batch 4" in too_big[0]["reason"]
    gpu_rows = [r for r in by_status["not available"] if r["device"] == "cuda"]
    assert gpu_rows and all(r["reason"].startswith("not available on this machine:") for r in gpu_rows)
    assert all(r["tiles_per_s"] is None and r["parity"] is None for r in by_status["not available"])
    assert all(b.closed for b in fake_run.opened)
    assert any("fastest" in line or "tiles/s" in line for line in lines)  # the run's own lines still echo
    assert report["command"].startswith(
        "virchow-rt bench virchow2g-mini-tiny --random-weights --batch-sizes 2,8"
    )


def test_a_failing_backend_is_recorded_and_the_run_goes_on(fake_run, tmp_path: Path) -> None:
    out = tmp_path / "fail"  # the fixture makes onnxruntime-cpu/fp32 raise when the path holds "fail"
    report = run_benchmark(
        "virchow2g-mini-tiny",
        out,
        random_weights=True,
        backends=["onnxruntime-cpu/fp32", "torch-eager/bf16-autocast"],
        batch_sizes=[4],
        tiles=4,
        repeats=1,
        progress=False,
        echo=lambda _: None,
    )
    assert validate_report(report) == []
    failed = [r for r in report["results"] if r["status"] == "failed"]
    assert len(failed) == 1 and "fake backend failure" in failed[0]["reason"]
    assert {r["backend"] + "/" + r["precision"] for r in report["results"] if r["status"] == "ok"} == {
        "torch-eager/fp32",
        "torch-eager/bf16-autocast",
    }


def test_a_backend_on_another_provider_than_asked_is_not_reported_under_the_wrong_name(
    fake_run, tmp_path
) -> None:
    fake_run.names["onnxruntime-cpu/fp32"] = "onnxruntime-slowpath"
    report = run_benchmark(
        "virchow2g-mini-tiny",
        tmp_path / "fallback",
        random_weights=True,
        backends=["onnxruntime-cpu/fp32"],
        batch_sizes=[2],
        tiles=2,
        repeats=1,
        progress=False,
        echo=lambda _: None,
    )
    row = next(r for r in report["results"] if r["backend"] == "onnxruntime-cpu")
    assert row["status"] == "failed" and row["tiles_per_s"] is None
    assert "put the session on onnxruntime-slowpath, not onnxruntime-cpu" in row["reason"]


@pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")
def test_each_row_is_on_disk_as_it_is_measured_so_a_stopped_run_keeps_them(
    fake_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "rows.jsonl").write_text('{"backend": "old", "precision": "fp32", "status": "ok"}\n')  # a past run
    measured: list[dict] = []
    measure = runner.BenchmarkRun._measure_one

    def stopped_at_the_third(self, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or the GPU check's SIGINT) before the report is written
        measured.append(measure(self, *args))
        assert len(read_rows(out)) < len(measured)  # not on disk before the run has it...
        return measured[-1]

    monkeypatch.setattr(runner.BenchmarkRun, "_measure_one", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark("virchow2g-mini-tiny", out, random_weights=True, backends=["torch-eager/bf16-autocast"],
                      batch_sizes=[2, 4], tiles=4, repeats=1, progress=False, echo=print)  # fmt: skip
    rows = read_rows(out)  # ...but on disk as soon as it has it
    assert not (out / "report.json").exists() and len(rows) == 2
    assert [(r["backend"], r["precision"], r["batch_size"], r["tiles_per_s"]) for r in rows] == [
        (r["backend"], r["precision"], r["batch_size"], float(r["tiles_per_s"])) for r in measured
    ]


@pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")
def test_rows_jsonl_that_cannot_be_written_warns_once_and_the_run_goes_on(
    fake_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virchow_rt.benchmark import report as report_module

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"variant": "a past run"}\n')  # replaced at the end of this run
    append = report_module.append_json_line
    calls: list[int] = []

    def disk_full_after_the_first(path, data):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        append(path, data)

    monkeypatch.setattr(report_module, "append_json_line", disk_full_after_the_first)
    lines: list[str] = []
    report = run_benchmark("virchow2g-mini-tiny", out, random_weights=True, backends=["onnxruntime-cpu/fp32"],
                           batch_sizes=[2, 4, 6], tiles=6, repeats=1, progress=False,
                           echo=lines.append)  # fmt: skip
    warned = [line for line in lines if "rows.jsonl" in line]
    assert len(warned) == 1 and "No space left on device" in warned[0] and "\n" not in warned[0]
    assert len(calls) == 2  # no row appended after the first failure: the file keeps the rows before it
    ours = [r for r in report["results"] if r["backend"] == "onnxruntime-cpu"]
    assert [r["batch_size"] for r in ours] == [2, 4, 6]  # every row measured all the same
    (kept,) = read_rows(out)  # the row measured first (the reference's)
    key = (kept["backend"], kept["batch_size"])
    same = [r for r in report["results"] if (r["backend"], r["batch_size"]) == key]
    assert [r["tiles_per_s"] for r in same] == [kept["tiles_per_s"]]
    assert json.loads((out / "report.json").read_text()) == report  # this run's report, not the past one
