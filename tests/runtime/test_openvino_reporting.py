"""OpenVINO in what the project reports: `info` (version, the CPU's bf16 units) and the benchmark rows."""

from __future__ import annotations

import pytest

from virchow_rt.backends import capabilities as caps  # noqa: E402
from virchow_rt.benchmark.rows import ROWS_BY_KEY, Machine, plan, unavailable_reason

BF16_CPU = Machine(has_cuda=False, cpu_flags=("avx2", "avx512f", "avx512_bf16"), importable=("openvino",))


@pytest.mark.parametrize(
    ("flags", "units"),
    [(["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "AMX-BF16"), (["avx512_bf16"], "AVX-512 BF16"),
     (["avx2", "avx512f", "avx512_vnni"], "none"), ([], "none")],
)  # fmt: skip
def test_cpu_bf16_units_from_flags(flags, units):
    assert caps.cpu_bf16(flags) == units


def test_info_reports_openvino_and_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(caps, "cpu_flags", lambda: ["avx2", "avx512f", "amx_tile", "amx_bf16"])
    monkeypatch.setattr(caps, "onnxruntime_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(caps, "package_version", lambda dist: "2026.4.1" if dist == "openvino" else "1.0")
    found = caps.capabilities()
    assert found["openvino"] == "2026.4.1" and found["cpu_bf16"] == "AMX-BF16"
    assert found["cpu_flags"] == ["avx2", "avx512f", "amx_tile", "amx_bf16"]
    assert {"openvino", "openvino-bf16", "openvino-fp32"} <= set(found["backends"])
    monkeypatch.setattr(caps, "cpu_flags", lambda: ["avx2"])  # AVX2 only: no bf16 backend offered
    assert "openvino-bf16" not in caps.runnable_backends() and "openvino" in caps.runnable_backends()
    monkeypatch.setattr(caps, "package_version", lambda dist: caps.NOT_INSTALLED)
    assert not [b for b in caps.runnable_backends() if b.startswith("openvino")]


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = caps.cpu_flags()
    assert set(flags) <= set(caps.MATMUL_FLAGS)
    assert caps.capabilities()["cpu_bf16"] == caps.cpu_bf16(flags)


def test_bench_rows_for_openvino():
    f32, bf16 = ROWS_BY_KEY["openvino-cpu/fp32"], ROWS_BY_KEY["openvino-cpu/bf16"]
    assert (f32.kind, f32.artifact, bf16.artifact) == ("openvino", "fp32", "fp32")  # both run the fp32 ONNX
    assert unavailable_reason(bf16, BF16_CPU) is None and unavailable_reason(f32, BF16_CPU) is None
    avx2 = Machine(has_cuda=False, cpu_flags=("avx2",), importable=("openvino",))
    assert "no bf16 dot-product instructions" in unavailable_reason(bf16, avx2)
    missing = Machine(has_cuda=False, cpu_flags=("avx512_bf16",), importable=())
    assert "pip install 'virchow-rt[openvino]'" in unavailable_reason(f32, missing)
    both = {"openvino-cpu/fp32", "openvino-cpu/bf16"}
    cases = {"openvino": both, "openvino-cpu": both, "openvino-bf16": {"openvino-cpu/bf16"},
             "openvino-fp32": {"openvino-cpu/fp32"}, "openvino-cpu/bf16": {"openvino-cpu/bf16"}}  # fmt: skip
    for name, keys in cases.items():
        runnable, _ = plan([name], BF16_CPU)  # the names `embed --backend` takes, and the row keys
        assert {r.key for r in runnable} - {"torch-eager/fp32"} == keys, name
