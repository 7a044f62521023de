"""What machine and software a benchmark ran on: CPU, GPU, driver, CUDA, package versions.

Versions come from package metadata (nothing heavy is imported just to read a version); the GPU
comes from ``torch.cuda`` when torch is importable, else from cuda-python, and the driver from
``nvidia-smi`` when it is on the PATH.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from virchow_rt._deps import is_importable

#: distributions whose versions every report records (None when not installed)
PACKAGES = (
    "virchow-rt",
    "numpy",
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "cuda-python",
    "cuda-bindings",
    # what reads DLPack GPU arrays, and the GPU resize kernel's compiler: a first GPU run's failure is
    # attributed by these (cupy is published per CUDA major)
    "cuda-core",
    "cupy-cuda13x",
    "cupy-cuda12x",
    "cupy",
    "nvidia-cuda-nvrtc",
    "nvidia-cuda-nvrtc-cu12",
    "matplotlib",
)

#: CPU features that decide which fast paths exist (fp16/bf16 dot products, wide vectors)
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (Linux), else empty."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_info() -> dict[str, Any]:
    """CPU model string (from /proc/cpuinfo), usable cores, memory, the SIMD features that matter."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id"),
        "family": info.get("cpu family"),
        "model_id": info.get("model"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": _mem_total_gb(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "hypervisor": "hypervisor" in flags,
    }


def _nvidia_smi() -> list[dict[str, str]]:
    if not shutil.which("nvidia-smi"):
        return []
    fields = "name,driver_version,memory.total,clocks.max.sm"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = fields.split(",")
    return [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in out.splitlines()
        if line
    ]


def gpu_info() -> dict[str, Any]:
    """Visible CUDA GPUs with name, memory, compute capability; the driver and CUDA versions."""
    gpus: list[dict[str, Any]] = []
    cuda_runtime = None
    if is_importable("torch"):
        import torch

        if torch.cuda.is_available():
            cuda_runtime = torch.version.cuda
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(
                    {
                        "name": p.name,
                        "memory_gb": p.total_memory / 1024**3,
                        "compute_capability": f"{p.major}.{p.minor}",
                        "multiprocessors": p.multi_processor_count,
                    }
                )
    elif is_importable("cuda.bindings.runtime"):
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0:
            for i in range(count):
                err, p = cudart.cudaGetDeviceProperties(i)
                if int(err) == 0:
                    name = (
                        p.name.decode(errors="replace").rstrip("\x00")
                        if isinstance(p.name, bytes)
                        else str(p.name)
                    )
                    gpus.append(
                        {
                            "name": name,
                            "memory_gb": p.totalGlobalMem / 1024**3,
                            "compute_capability": f"{p.major}.{p.minor}",
                            "multiprocessors": p.multiProcessorCount,
                        }
                    )
            err, version = cudart.cudaRuntimeGetVersion()
            if int(err) == 0:
                cuda_runtime = f"{version // 1000}.{(version % 1000) // 10}"
    smi = _nvidia_smi() if gpus else []
    for gpu, row in zip(gpus, smi, strict=False):
        gpu["max_sm_clock"] = row.get("clocks.max.sm")
    return {
        "gpus": gpus,
        "driver": smi[0].get("driver_version") if smi else None,
        "cuda": cuda_runtime,
    }


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not shutil.which("git"):
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _threads() -> dict[str, Any]:
    threads: dict[str, Any] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if (
        "torch" in sys.modules
    ):  # only when already loaded: reading a thread count is no reason to import torch
        threads["torch_intra_op"] = sys.modules["torch"].get_num_threads()
    return threads


def collect_environment() -> dict[str, Any]:
    """Everything a reader needs to know about where the numbers came from."""
    gpu = gpu_info()
    cpu = cpu_info()
    providers = None
    if is_importable("onnxruntime"):
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    return {
        "machine": machine_label(cpu, gpu),
        "cpu": cpu,
        "gpu": gpu["gpus"][0]["name"] if gpu["gpus"] else None,
        "gpus": gpu["gpus"],
        "driver": gpu["driver"],
        "cuda": gpu["cuda"],
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "onnxruntime_providers": providers,
        "threads": _threads(),
        # other processes competing for the cores lower every figure: the reader should know
        "load_average": load_average(),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_label(cpu: dict[str, Any], gpu: dict[str, Any]) -> str:
    """One line naming the machine, e.g. ``2-core CPU (AMD EPYC), no GPU``."""
    cores = cpu.get("usable_cpus") or cpu.get("logical_cpus")
    cpu_text = f"{cores}-core CPU ({cpu.get('model')})"
    if not gpu["gpus"]:
        return f"{cpu_text}, no GPU"
    names = [g["name"] for g in gpu["gpus"]]
    gpu_text = names[0] if len(set(names)) == 1 else " + ".join(names)
    count = f"{len(names)}x " if len(names) > 1 else ""
    return f"{count}{gpu_text} (driver {gpu['driver'] or '?'}, CUDA {gpu['cuda'] or '?'}), {cpu_text}"
