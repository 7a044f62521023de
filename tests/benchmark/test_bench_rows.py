"""Which rows run where, and the reasons for the ones that cannot."""

from __future__ import annotations

import pytest

from virchow_rt.benchmark.rows import (
    REFERENCE_KEY,
    ROWS,
    ROWS_BY_KEY,
    Machine,
    select_rows,
    unavailable_reason,
)
from virchow_rt.errors import InputError

CPU_ONLY = Machine(
    has_cuda=False,
    cpu_flags=("avx2", "avx512f", "avx512_bf16"),
    ort_providers=("CPUExecutionProvider",),
    importable=("torch", "timm", "onnxruntime"),
)
GPU = Machine(
    has_cuda=True,
    cpu_flags=("avx2",),
    ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    importable=("torch", "timm", "onnxruntime", "tensorrt", "cuda.bindings.runtime"),
)


def _reasons(machine: Machine) -> dict[str, str | None]:
    chosen, _ = select_rows(None, machine)
    return {r.key: unavailable_reason(r, machine) for r in chosen}


def test_cpu_machine_runs_the_cpu_rows_and_explains_the_rest() -> None:
    reasons = _reasons(CPU_ONLY)
    runnable = {k for k, v in reasons.items() if v is None}
    assert runnable == {
        "torch-eager/fp32",
        "torch-eager/bf16-autocast",
        "torch-compile/bf16-autocast",
        "onnxruntime-cpu/fp32",
        "onnxruntime-cpu/fp16",
        "onnxruntime-cpu/int8",
    }
    assert "GPU mode" in reasons["torch-eager/fp16-autocast"]
    assert "needs a CUDA GPU" in reasons["onnxruntime-cuda/fp16"]
    assert "needs a CUDA GPU" in reasons["tensorrt/fp16"]
    assert len(reasons) == len(ROWS)  # every row is accounted for


def test_gpu_machine_runs_gpu_rows_and_leaves_cpu_only_rows_out() -> None:
    chosen, skipped = select_rows(None, GPU)
    keys = {r.key for r in chosen}
    assert {
        "torch-eager/fp16-autocast",
        "torch-compile/fp16-autocast",
        "tensorrt/fp16",
        "torch-cuda/fp16",
    } <= keys
    assert (
        "onnxruntime-cpu/fp32" in skipped
        and "--backends onnxruntime-cpu/fp32" in skipped["onnxruntime-cpu/fp32"]
    )
    assert all(unavailable_reason(r, GPU) is None for r in chosen)
    assert chosen[0].key == REFERENCE_KEY and chosen[0].resolve_device(True) == "cuda"


def test_missing_provider_and_bf16_reasons() -> None:
    no_ep = Machine(
        has_cuda=True, ort_providers=("CPUExecutionProvider",), importable=("torch", "timm", "onnxruntime")
    )
    reasons = _reasons(no_ep)
    assert (
        "no CUDA provider" in reasons["onnxruntime-cuda/fp32"]
        and "CPUExecutionProvider" in reasons["onnxruntime-cuda/fp32"]
    )
    assert "not importable" in reasons["tensorrt/fp16"]
    assert "cuda-python is not importable" in reasons["torch-cuda/fp16"]
    old_cpu = Machine(has_cuda=False, cpu_flags=("avx2",), importable=("torch", "timm"))
    assert "bf16" in _reasons(old_cpu)["torch-eager/bf16-autocast"]


def test_requested_rows_always_include_the_reference() -> None:
    chosen, skipped = select_rows(["onnxruntime-cpu:fp16"], CPU_ONLY)
    assert [r.key for r in chosen] == [REFERENCE_KEY, "onnxruntime-cpu/fp16"]
    assert skipped == {}
    chosen, _ = select_rows(["onnxruntime-cpu", "torch-eager/fp32"], CPU_ONLY)
    assert [r.key for r in chosen] == [
        REFERENCE_KEY, "onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16", "onnxruntime-cpu/int8"
    ]  # fmt: skip
    assert ROWS_BY_KEY["onnxruntime-cpu/int8"].parity_precision == "int8"


def test_a_bare_backend_name_means_its_rows_for_this_machine() -> None:
    on_gpu, _ = select_rows(["torch-eager"], GPU)
    assert [r.key for r in on_gpu] == [
        "torch-eager/fp32",
        "torch-eager/fp16-autocast",
    ]  # not the CPU bf16 row
    on_cpu, _ = select_rows(["torch-eager"], CPU_ONLY)
    assert "torch-eager/bf16-autocast" in [r.key for r in on_cpu]
    cpu_rows_on_gpu, _ = select_rows(["onnxruntime-cpu", "torch-eager/bf16-autocast"], GPU)
    assert {"onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16", "torch-eager/bf16-autocast"} <= {
        r.key for r in cpu_rows_on_gpu
    }


def test_unknown_row_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="unknown benchmark row 'onnxruntime-gpu'.*onnxruntime-cuda"):
        select_rows(["onnxruntime-gpu"], CPU_ONLY)


def test_every_embed_backend_name_is_a_bench_row_name() -> None:
    from virchow_rt.backends import BACKENDS

    for name in BACKENDS:
        if name == "auto":
            continue
        chosen, _ = select_rows([name], GPU)
        assert [r for r in chosen if r.key != REFERENCE_KEY], name  # rows of that backend, not an error
    chosen, _ = select_rows(["onnxruntime"], CPU_ONLY)
    runnable = {
        r.backend for r in chosen if r.key != REFERENCE_KEY and unavailable_reason(r, CPU_ONLY) is None
    }
    assert runnable == {"onnxruntime-cpu"}  # the GPU providers' rows are listed as not available here
