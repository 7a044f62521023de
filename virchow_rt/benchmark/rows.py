"""The backend x precision rows a benchmark can have, as data, and why a row cannot run here.

Each :class:`RowSpec` names a backend and a precision, the device it runs on, and the capabilities it
needs. :func:`unavailable_reason` turns a missing capability into the sentence the report prints
("not available on this machine: ..."); nothing is ever measured for such a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from virchow_rt._deps import is_importable
from virchow_rt.errors import InputError

#: reference every parity figure is measured against
REFERENCE_KEY = "torch-eager/fp32"


@dataclass(frozen=True)
class RowSpec:
    """One backend at one precision.

    ``kind``: "torch" (the PyTorch reference model), "onnx" (an exported ``<variant>.<artifact>.onnx``
    through ``open_backend``), "openvino" (that file through OpenVINO at ``precision``), "tensorrt" (a
    ``<variant>.fp16.engine``) or "torch-cuda" (the reference model in fp16 run by virchow-rt's CUDA
    pipeline). ``device``: "cpu", "cuda", or "auto" (the GPU when there is one, else the CPU).
    ``artifact``: the export's precision it runs.
    """

    backend: str
    precision: str
    kind: str
    device: str
    requires: tuple[str, ...] = ()
    artifact: str | None = None
    compile: bool = False
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def parity_precision(self) -> str:
        """Which of the variant's tolerances applies: fp32 rows the fp32 one, int8 rows int8's, other
        reduced precisions fp16's."""
        return self.precision if self.precision in ("fp32", "int8") else "fp16"

    def resolve_device(self, has_cuda: bool) -> str:
        return ("cuda" if has_cuda else "cpu") if self.device == "auto" else self.device


ROWS: tuple[RowSpec, ...] = (
    RowSpec(
        "torch-eager", "fp32", "torch", "auto", ("torch",), note="the reference (timm eval transform + eager)"
    ),
    RowSpec(
        "torch-eager",
        "fp16-autocast",
        "torch",
        "auto",
        ("torch", "gpu_autocast_fp16"),
        note="as the model card and TRIDENT run it (GPU: timm's transform on CPU threads, a batch ahead)",
    ),
    RowSpec(
        "torch-eager",
        "bf16-autocast",
        "torch",
        "cpu",
        ("torch", "cpu_bf16"),
        note="the CPU stand-in for fp16 autocast, labelled bf16",
    ),
    RowSpec("torch-compile", "fp16-autocast", "torch", "cuda", ("torch", "cuda"), compile=True),
    RowSpec(
        "torch-compile",
        "bf16-autocast",
        "torch",
        "cpu",
        ("torch", "cpu_bf16"),
        compile=True,
        note="the best PyTorch can do on this CPU: torch.compile + bf16 autocast",
    ),
    RowSpec(
        "torch-cuda",
        "fp16",
        "torch-cuda",
        "cuda",
        ("torch", "cuda", "cuda_python"),
        note="virchow-rt's CUDA pipeline running the fp16 module (SDPA, CUDA graphs)",
    ),
    RowSpec(
        "torch-cuda-compile", "fp16", "torch-cuda", "cuda", ("torch", "cuda", "cuda_python"), compile=True
    ),
    RowSpec("onnxruntime-cpu", "fp32", "onnx", "cpu", ("onnxruntime",), artifact="fp32"),
    RowSpec("onnxruntime-cpu", "fp16", "onnx", "cpu", ("onnxruntime",), artifact="fp16"),
    RowSpec(
        "onnxruntime-cpu",
        "int8",
        "onnx",
        "cpu",
        ("onnxruntime",),
        artifact="int8",
        note="dynamic int8 weight MatMuls (its own parity gate: cosine 0.995, 10-NN 0.90)",
    ),
    RowSpec(
        "openvino-cpu",
        "fp32",
        "openvino",
        "cpu",
        ("openvino",),
        artifact="fp32",
        note="the fp32 ONNX in OpenVINO, f32 inference precision, throughput hint + async requests",
    ),
    RowSpec(
        "openvino-cpu",
        "bf16",
        "openvino",
        "cpu",
        ("openvino", "cpu_bf16"),
        artifact="fp32",
        note="the fp32 ONNX compiled with bf16 inference precision (its open-time gate passed); "
        "the default of an export folder on such a CPU",
    ),
    RowSpec("onnxruntime-cuda", "fp32", "onnx", "cuda", ("cuda", "ort_cuda"), artifact="fp32"),
    RowSpec("onnxruntime-cuda", "fp16", "onnx", "cuda", ("cuda", "ort_cuda"), artifact="fp16"),
    RowSpec("onnxruntime-tensorrt", "fp32", "onnx", "cuda", ("cuda", "ort_tensorrt"), artifact="fp32"),
    RowSpec("onnxruntime-tensorrt", "fp16", "onnx", "cuda", ("cuda", "ort_tensorrt"), artifact="fp16"),
    RowSpec("tensorrt", "fp16", "tensorrt", "cuda", ("cuda", "tensorrt"), artifact="fp16"),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


@dataclass(frozen=True)
class Machine:
    """What this machine offers, probed once per run (the tests build one by hand)."""

    has_cuda: bool
    cpu_flags: tuple[str, ...] = ()
    ort_providers: tuple[str, ...] = ()
    importable: tuple[str, ...] = ()

    @classmethod
    def probe(cls) -> Machine:
        from virchow_rt.benchmark.environment import cpu_info

        probed = ("torch", "timm", "onnxruntime", "openvino", "tensorrt", "cuda.bindings.runtime")
        importable = tuple(m for m in probed if is_importable(m))
        providers: tuple[str, ...] = ()
        if "onnxruntime" in importable:
            import onnxruntime

            providers = tuple(onnxruntime.get_available_providers())
        return cls(
            has_cuda=_cuda_available(importable),
            cpu_flags=tuple(cpu_info()["flags"]),
            ort_providers=providers,
            importable=importable,
        )

    @property
    def device(self) -> str:
        return "cuda" if self.has_cuda else "cpu"


def _cuda_available(importable: Sequence[str]) -> bool:
    if "torch" in importable:
        import torch

        return bool(torch.cuda.is_available())
    if is_importable("cuda.bindings.runtime"):
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    return False


def _provider(name: str, label: str) -> Callable[[Machine, str], str | None]:
    def check(machine: Machine, device: str) -> str | None:
        if name in machine.ort_providers:
            return None
        have = ", ".join(machine.ort_providers) or "none"
        return f"ONNX Runtime here has no {label} ({name}; available providers: {have})"

    return check


#: capability -> check(machine, resolved device) returning None when met, else the reason
CHECKS: dict[str, Callable[[Machine, str], str | None]] = {
    "torch": lambda m, d: (
        None
        if {"torch", "timm"} <= set(m.importable)
        else "PyTorch and timm are needed for the reference rows: pip install 'virchow-rt[export]'"
    ),
    "onnxruntime": lambda m, d: None if "onnxruntime" in m.importable else "onnxruntime is not importable",
    "openvino": lambda m, d: (
        None
        if "openvino" in m.importable
        else "OpenVINO is not importable: pip install 'virchow-rt[openvino]'"
    ),
    "tensorrt": lambda m, d: (
        None
        if "tensorrt" in m.importable
        else "the TensorRT Python package is not importable "
        "(pip install 'virchow-rt[tensorrt]' on a GPU machine)"
    ),
    "cuda": lambda m, d: None if m.has_cuda else "needs a CUDA GPU; none is visible",
    "cuda_python": lambda m, d: (
        None
        if "cuda.bindings.runtime" in m.importable
        else "cuda-python is not importable (pip install 'virchow-rt[cuda]')"
    ),
    "ort_cuda": _provider("CUDAExecutionProvider", "CUDA provider"),
    "ort_tensorrt": _provider("TensorrtExecutionProvider", "TensorRT provider"),
    # x86 CPUs have no fp16 matmul units: torch's CPU fp16 autocast runs slow fallback kernels that
    # nobody deploys; the bf16-autocast row is the CPU's reduced-precision path instead.
    "gpu_autocast_fp16": lambda m, d: (
        None
        if d == "cuda"
        else "fp16 autocast is a GPU mode; on a CPU torch runs it on slow fallback kernels "
        "(no fp16 matmul units), so the bf16-autocast row stands in for it"
    ),
    "cpu_bf16": lambda m, d: (
        None
        if {"avx512_bf16", "amx_bf16"} & set(m.cpu_flags)
        else "the CPU has no bf16 dot-product instructions (avx512_bf16 / amx_bf16)"
    ),
}


def unavailable_reason(spec: RowSpec, machine: Machine) -> str | None:
    """None when ``spec`` can run on ``machine``, else why not (first unmet capability)."""
    device = spec.resolve_device(machine.has_cuda)
    for need in spec.requires:
        reason = CHECKS[need](machine, device)
        if reason:
            return reason
    return None


def select_rows(requested: Sequence[str] | None, machine: Machine) -> tuple[list[RowSpec], dict[str, str]]:
    """Rows to run and rows left out, with a reason each.

    ``requested``: ``backend`` (all its precisions) or ``backend/precision`` (``:`` works too); None
    means every row (a GPU machine leaves out the CPU-only rows); rows this machine cannot run are
    reported by :func:`unavailable_reason`, not here.
    The reference row always runs: every parity figure needs it.
    """
    if requested is None:
        # a GPU machine's CPU-only rows would only show a slow CPU: left out unless asked for
        chosen = [r for r in ROWS if not (machine.has_cuda and r.device == "cpu")]
        skipped = {
            r.key: f"not run: a CPU-only row on a GPU machine (ask for it with --backends {r.key})"
            for r in ROWS
            if r not in chosen
        }
    else:
        chosen, skipped = [], {}
        for item in requested:
            name = item.replace(":", "/")
            # the backend names `embed --backend` takes: "onnxruntime" is every ONNX Runtime row
            matches = [r for r in ROWS if r.key == name or r.backend == name]
            if name == "onnxruntime":
                matches = [r for r in ROWS if r.backend.startswith("onnxruntime-")]
            if name.startswith("openvino") and "/" not in name:  # openvino: both rows; openvino-bf16: one
                precision = name.removeprefix("openvino").lstrip("-")
                matches = [r for r in ROWS if r.kind == "openvino" and precision in ("", "cpu", r.precision)]
            if not matches:
                known = ", ".join(sorted({r.backend for r in ROWS} | set(ROWS_BY_KEY)))
                raise InputError(
                    f"unknown benchmark row {item!r}; use a backend or backend/precision from: {known}"
                )
            if name not in ROWS_BY_KEY:
                # a bare backend name means its rows for this machine's device, as the default does;
                # only a backend that has nothing else (onnxruntime-cpu on a GPU machine) keeps CPU rows
                here = [r for r in matches if not (machine.has_cuda and r.device == "cpu")]
                matches = here or matches
            chosen += [r for r in matches if r not in chosen]
    reference = ROWS_BY_KEY[REFERENCE_KEY]
    if reference not in chosen:
        chosen.insert(0, reference)
    # the reference first: its embeddings are what every other row is compared with
    chosen.sort(key=lambda r: r.key != REFERENCE_KEY)
    return chosen, skipped


def row_stub(spec: RowSpec, status: str, reason: str, device: str | None = None) -> dict[str, Any]:
    """A report row with no measurements: a row that is not available, not run, or failed."""
    return {
        "backend": spec.backend,
        "precision": spec.precision,
        "device": device or spec.device,
        "status": status,
        "reason": reason,
        "batch_size": None,
        "tiles_per_s": None,
        "compute_tiles_per_s": None,
        "latency_ms": None,
        "tflops": None,
        "peak_fraction": None,
        "parity": None,
    }


def plan(requested: Sequence[str] | None, machine: Machine) -> tuple[list[RowSpec], list[dict[str, Any]]]:
    """Rows to measure here, and report stubs (not available / not run, with the reason) for the rest."""
    chosen, skipped = select_rows(requested, machine)
    runnable, stubs = [], []
    for spec in chosen:
        reason = unavailable_reason(spec, machine)
        device = spec.resolve_device(machine.has_cuda)
        if reason is None:
            runnable.append(spec)
        else:
            stubs.append(row_stub(spec, "not available", f"not available on this machine: {reason}", device))
    for key, reason in skipped.items():
        spec = ROWS_BY_KEY[key]
        stubs.append(row_stub(spec, "not run", reason, spec.resolve_device(machine.has_cuda)))
    return runnable, stubs
