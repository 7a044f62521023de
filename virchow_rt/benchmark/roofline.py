"""Roofline figures: FLOPs per tile, achieved TFLOP/s, and the matmul peak measured in the same run.

The peak is not a datasheet number: it is the best dense square matmul this machine did a moment
before the rows ran, with the same threads, over every library at hand (CPU fp32: numpy, torch and
ONNX Runtime's MLAS, which is what the exported graphs run on; CPU bf16: torch; GPU fp16 / fp32: torch
with CUDA events). A row's ``peak_fraction`` divides its achieved TFLOP/s by the peak of its own
device and precision class. Judging against one library's GEMM alone would flatter every row that
uses a better one (measured here: MLAS fp32 ran 4096² at ~2x torch's and ~5x numpy's rate).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from virchow_rt._deps import is_importable, optional_import
from virchow_rt.benchmark.timing import CudaEventTimer, Stats, time_calls
from virchow_rt.errors import InputError

#: precision of a row -> the matmul dtype whose peak it is judged against, per device. A CPU has no
#: fp16 matmul units worth the name (ONNX Runtime's fp16 kernels on x86 widen to fp32), so CPU fp16
#: rows are judged against the fp32 peak; bf16 autocast against the bf16 peak.
PEAK_CLASS = {
    "cpu": {
        "fp32": "fp32",
        "fp16": "fp32",
        "fp16-autocast": "fp32",
        "bf16": "bf16",
        "bf16-autocast": "bf16",
        "int8": "int8",
    },
    "cuda": {
        "fp32": "fp32",
        "fp16": "fp16",
        "fp16-autocast": "fp16",
        "bf16-autocast": "bf16",
        "int8": "int8",
    },
}

DEFAULT_SIZE = {"cpu": 4096, "cuda": 8192}


def peak_key(device: str, precision: str) -> str:
    """``"cpu-fp32"``-style key of the peak that a row on ``device`` at ``precision`` is judged against."""
    try:
        return f"{device}-{PEAK_CLASS[device][precision]}"
    except KeyError as err:
        raise InputError(f"no matmul peak class for device {device!r} and precision {precision!r}") from err


def achieved_tflops(flops_per_tile: float, tiles_per_s: float | None) -> float | None:
    """Useful TFLOP/s at ``tiles_per_s`` (None stays None)."""
    return None if tiles_per_s is None else flops_per_tile * tiles_per_s / 1e12


def _numpy_matmul(n: int, dtype: str, repeats: int) -> Stats | None:
    if dtype != "fp32":
        return None  # numpy has no fast fp16/bf16 GEMM
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return time_calls(lambda: a @ b, repeats=repeats, warmup=1)


def _onnxruntime_matmul(n: int, dtype: str, repeats: int) -> Stats | None:
    """One MatMul node in ONNX Runtime's CPU provider: MLAS, the GEMM the exported graphs run on
    (``MatMulInteger`` uint8 x int8 -> int32 for int8: the GEMM of the int8 exports)."""
    if dtype not in ("fp32", "int8") or not (is_importable("onnx") and is_importable("onnxruntime")):
        return None
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    types = {"A": TensorProto.FLOAT, "B": TensorProto.FLOAT, "C": TensorProto.FLOAT}
    if dtype == "int8":
        types = {"A": TensorProto.UINT8, "B": TensorProto.INT8, "C": TensorProto.INT32}

    def value(name: str) -> Any:
        return helper.make_tensor_value_info(name, types[name], [n, n])

    op = "MatMul" if dtype == "fp32" else "MatMulInteger"
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["C"])], "matmul", [value("A"), value("B")], [value("C")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if dtype == "int8":
        feeds = {
            "A": rng.integers(0, 256, (n, n), dtype=np.uint8),
            "B": rng.integers(-128, 128, (n, n), dtype=np.int8),
        }
    else:
        feeds = {k: rng.standard_normal((n, n), dtype=np.float32) for k in ("A", "B")}
    return time_calls(lambda: session.run(None, feeds), repeats=repeats, warmup=1)


def _torch_matmul(n: int, device: str, dtype: str, repeats: int) -> Stats | None:
    torch = optional_import("torch", "to measure the matmul peak")
    if (device == "cuda" and not torch.cuda.is_available()) or dtype == "int8":
        return None
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    with torch.inference_mode():
        if device == "cuda":
            # events time the device alone; several matmuls per event pair amortize the launch
            timer = CudaEventTimer()
            per_call = 4

            def work() -> None:
                for _ in range(per_call):
                    torch.matmul(a, b)

            stats = timer.time_calls(work, repeats=repeats, warmup=2)
            return Stats(tuple(s / per_call for s in stats.samples))
        return time_calls(lambda: torch.matmul(a, b), repeats=repeats, warmup=1)


#: library -> (devices it measures, largest matrix side it gets: numpy's CPU GEMM is slow at 4096)
LIBRARIES: dict[str, tuple[tuple[str, ...], int]] = {
    "numpy": (("cpu",), 2048),
    "torch": (("cpu", "cuda"), 1 << 16),
    "onnxruntime": (("cpu",), 1 << 16),
}


def _measure(library: str, n: int, device: str, dtype: str, repeats: int) -> Stats | None:
    if library == "numpy":
        return _numpy_matmul(n, dtype, repeats)
    if library == "onnxruntime":
        return _onnxruntime_matmul(n, dtype, repeats)
    return _torch_matmul(n, device, dtype, repeats) if is_importable("torch") else None


def measure_matmul_peak(device: str, dtype: str, size: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Best dense square matmul on ``device`` in ``dtype`` ("fp32", "fp16", "bf16") over the libraries here.

    Each library multiplies two ``size``² matrices (capped per library, see :data:`LIBRARIES`) after a
    warm-up; its best of ``repeats`` counts, and the peak is the best library. Returns ``{"key", "device",
    "dtype", "size", "tflops", "library", "by_library": {name: {"tflops", "size"}}}``; ``tflops`` is None
    with a ``reason`` when no library could run it here.
    """
    n = size or DEFAULT_SIZE[device]
    by_library: dict[str, dict[str, Any]] = {}
    for library, (devices, cap) in LIBRARIES.items():
        side = min(n, cap)
        stats = _measure(library, side, device, dtype, repeats) if device in devices else None
        if stats is not None:
            by_library[library] = {"tflops": 2.0 * side**3 / stats.min / 1e12, "size": side}
    best = max(by_library, key=lambda k: by_library[k]["tflops"], default=None)
    return {
        "key": f"{device}-{dtype}",
        "device": device,
        "dtype": dtype,
        "size": n,
        "repeats": repeats,
        "tflops": by_library[best]["tflops"] if best else None,
        "library": best,
        "by_library": by_library,
        "reason": None if best else f"no library here multiplies {dtype} matrices on {device}",
    }


def measure_peaks(keys: set[str], repeats: int = 5) -> dict[str, dict[str, Any]]:
    """Measure each needed ``device-dtype`` peak once (e.g. ``{"cpu-fp32", "cpu-bf16"}``)."""
    out = {}
    for key in sorted(keys):
        device, dtype = key.split("-", 1)
        out[key] = measure_matmul_peak(device, dtype, repeats=repeats)
    return out
