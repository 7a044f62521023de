"""What this machine can run (``virchow-rt info``): CPU (and its bf16 units), GPU, ONNX Runtime providers,
OpenVINO, TensorRT, CUDA.

Nothing here imports torch: its presence and version come from the installed package metadata.
Every probe is guarded, so a broken optional install shows up as a value, never as a crash.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from virchow_rt._deps import is_importable
from virchow_rt.errors import VirchowError

NOT_INSTALLED = "not installed"


def package_version(distribution: str) -> str:
    """Installed version of a pip distribution, read from its metadata (the package is not imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        blocks.append(entry)
    return blocks


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may use: hyper-threads of one core count once.

    Compute-bound GEMMs gain nothing from a core's second hyper-thread, so intra-op thread pools are
    sized by this number.
    """
    logical = usable_cpus()
    blocks = _cpuinfo()
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = None
    cores = {
        (b.get("physical id", "0"), b["core id"])
        for b in blocks
        if "core id" in b and (allowed is None or int(b.get("processor", -1)) in allowed)
    }
    return max(1, min(len(cores), logical)) if cores else max(1, logical)


def cpu_model() -> str:
    names = [b["model name"] for b in _cpuinfo() if "model name" in b]
    return names[0] if names else (platform.processor() or platform.machine())


#: /proc/cpuinfo flags that decide the CPU's fast matmul paths (bf16 and int8 dot products, vector width)
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of :data:`MATMUL_FLAGS` the CPU has ([] where /proc/cpuinfo is unreadable)."""
    blocks = _cpuinfo()
    flags = set(blocks[0].get("flags", "").split()) if blocks else set()
    return [f for f in MATMUL_FLAGS if f in flags]


def cpu_bf16(flags: list[str] | None = None) -> str:
    """The CPU's bf16 matmul units: "AMX-BF16", "AVX-512 BF16", or "none" (bf16 then runs emulated)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX-BF16"
    return "AVX-512 BF16" if "avx512_bf16" in flags else "none"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpus() -> list[str]:
    """GPUs visible to this process: ``nvidia-smi`` when on PATH, else cuda-python; [] when none."""
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version,compute_cap"
        try:
            result = subprocess.run(
                ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=15
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0:
            return [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if is_importable("cuda.bindings.runtime"):
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        found = []
        for device in range(count if int(err) == 0 else 0):
            err, props = cudart.cudaGetDeviceProperties(device)
            if int(err) == 0:
                name = props.name.decode(errors="replace").rstrip("\x00")
                found.append(
                    f"{name}, {props.totalGlobalMem // 2**20} MiB, compute {props.major}.{props.minor}"
                )
        return found
    return []


def onnxruntime_providers() -> list[str]:
    """ONNX Runtime execution providers compiled into the installed package ([] when it is missing)."""
    if not is_importable("onnxruntime"):
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def tensorrt_version() -> str:
    """``"10.13.0 (tensorrt)"``, or "not installed". ``tensorrt-stubs`` alone makes ``tensorrt`` an empty
    namespace package that imports fine but has no ``__version__``: that counts as not installed."""
    for module in ("tensorrt", "tensorrt_lean"):
        if not is_importable(module):
            continue
        version = getattr(importlib.import_module(module), "__version__", None)
        if version:
            return f"{version} ({module})"
    return NOT_INSTALLED


def runnable_backends() -> list[str]:
    """Backend names :func:`virchow_rt.backends.open_backend` can use here."""
    providers = onnxruntime_providers()
    names = [
        name
        for provider, name in (
            ("CPUExecutionProvider", "onnxruntime-cpu"),
            ("CUDAExecutionProvider", "onnxruntime-cuda"),
            ("TensorrtExecutionProvider", "onnxruntime-tensorrt"),
        )
        if provider in providers
    ]
    if package_version("openvino") != NOT_INSTALLED:  # bf16 only where the CPU has the units for it
        names += ["openvino", "openvino-fp32"] + (["openvino-bf16"] if cpu_bf16() != "none" else [])
    if tensorrt_version() != NOT_INSTALLED and package_version("cuda-python") != NOT_INSTALLED:
        names.append("tensorrt")
    return names


def gpu_resize(gpu_list: list[str]) -> str:
    """Whether tiles can be resized on the GPU here (the NVRTC kernel), or what is missing."""
    missing = [] if gpu_list else ["a visible GPU"]
    try:
        from virchow_rt.backends.cuda.api import load_nvrtc

        load_nvrtc()  # the library itself, not only cuda-python's bindings
    except VirchowError:
        missing.append("NVRTC (pip install 'virchow-rt[cuda]')")
    return "available" if not missing else f"unavailable (needs {' and '.join(missing)}; CPU resize instead)"


def capabilities() -> dict[str, Any]:
    """Machine and library facts for ``virchow-rt info`` (JSON-serializable)."""
    from virchow_rt._version import __version__

    gpu_list = gpus()
    return {
        "virchow_rt": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_physical_cores": physical_cores(),
        "cpu_logical_cpus": usable_cpus(),
        "cpu_flags": cpu_flags(),
        "cpu_bf16": cpu_bf16(),
        "memory_gib": _memory_gib(),
        "gpus": gpu_list or "none visible",
        "onnxruntime": next(
            (v for v in map(package_version, ("onnxruntime", "onnxruntime-gpu")) if v != NOT_INSTALLED),
            NOT_INSTALLED,
        ),
        "onnxruntime_providers": onnxruntime_providers(),
        "openvino": package_version("openvino"),
        "tensorrt": tensorrt_version(),
        "cuda_python": package_version("cuda-python"),
        "cuda_core": package_version("cuda-core"),  # reads DLPack GPU arrays
        "gpu_resize": gpu_resize(gpu_list),
        "torch": package_version("torch"),
        "timm": package_version("timm"),
        "onnx": package_version("onnx"),
        "numpy": package_version("numpy"),
        "pillow": package_version("pillow"),
        # whole slides: the readers (OpenSlide's library comes in the openslide-bin wheel) and the .h5 writer
        "openslide": package_version("openslide-python"),
        "openslide_library": package_version("openslide-bin"),
        "tiffslide": package_version("tiffslide"),
        "h5py": package_version("h5py"),
        "backends": runnable_backends(),
    }
