"""The environment block of a report."""

from __future__ import annotations

from pathlib import Path

from virchow_rt.benchmark.environment import collect_environment, machine_label


def test_environment_names_cpu_gpu_and_versions() -> None:
    env = collect_environment()
    for key in ("machine", "cpu", "gpu", "driver", "cuda", "versions", "python", "date"):
        assert key in env
    assert env["cpu"]["usable_cpus"] >= 1
    assert env["versions"]["numpy"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        model = (
            next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name"))
            .split(":", 1)[1]
            .strip()
        )
        assert env["cpu"]["model"] == model
        assert model in env["machine"]
    if env["gpu"] is None:
        assert env["machine"].endswith("no GPU")


def test_machine_label_with_gpus() -> None:
    cpu = {"usable_cpus": 16, "model": "Xeon"}
    gpu = {"gpus": [{"name": "NVIDIA H100"}], "driver": "570.1", "cuda": "12.8"}
    assert machine_label(cpu, gpu) == "NVIDIA H100 (driver 570.1, CUDA 12.8), 16-core CPU (Xeon)"
    assert machine_label(cpu, {"gpus": [], "driver": None, "cuda": None}) == "16-core CPU (Xeon), no GPU"
