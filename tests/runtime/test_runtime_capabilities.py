"""capabilities(): machine facts without importing torch; TensorRT stubs do not count as TensorRT."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import types
from pathlib import Path

from virchow_rt.backends.capabilities import (
    NOT_INSTALLED,
    capabilities,
    gpu_resize,
    package_version,
    physical_cores,
    runnable_backends,
    tensorrt_version,
    usable_cpus,
)

ROOT = Path(__file__).resolve().parents[2]


def test_capabilities_are_json_and_sane():
    caps = capabilities()
    json.dumps(caps)
    assert 1 <= caps["cpu_physical_cores"] <= caps["cpu_logical_cpus"] == usable_cpus()
    assert physical_cores() == caps["cpu_physical_cores"]
    assert "CPUExecutionProvider" in caps["onnxruntime_providers"]
    assert caps["numpy"] != NOT_INSTALLED
    import importlib.metadata as md

    for key, dist in (("openslide", "openslide-python"), ("tiffslide", "tiffslide"), ("h5py", "h5py")):
        try:
            assert caps[key] == md.version(dist)  # the slide readers and writer are reported
        except md.PackageNotFoundError:
            assert caps[key] == NOT_INSTALLED


def test_gpu_resize_says_what_is_missing(monkeypatch):
    from virchow_rt.backends.cuda import api as cuda_api
    from virchow_rt.errors import MissingDependency

    monkeypatch.setattr(cuda_api, "load_nvrtc", lambda: object())  # the NVRTC library loads
    assert gpu_resize(["NVIDIA H100, 81559 MiB, compute 9.0"]) == "available"
    assert gpu_resize([]) == "unavailable (needs a visible GPU; CPU resize instead)"

    def missing():
        raise MissingDependency("the NVRTC library is needed ... and was not found")

    monkeypatch.setattr(cuda_api, "load_nvrtc", missing)
    assert "a visible GPU and NVRTC" in gpu_resize([])


def test_versions_come_from_metadata_not_imports():
    """In a fresh process (this one has imported torch long ago): versions and the whole report leave
    torch, onnxruntime and timm unimported."""
    probe = (
        "import json, sys\n"
        "from virchow_rt.backends.capabilities import capabilities, package_version\n"
        "version = package_version('torch')\n"
        "caps = capabilities()\n"
        "print(json.dumps([version, caps['torch'], [m for m in ('torch', 'timm') if m in sys.modules]]))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    version, reported, imported = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        installed = NOT_INSTALLED
    assert version == reported == installed
    assert imported == []
    assert package_version("definitely-not-a-package-xyz") == NOT_INSTALLED


def test_tensorrt_stubs_namespace_is_not_tensorrt(monkeypatch):
    stub = types.ModuleType("tensorrt")  # what tensorrt-stubs alone gives: no __version__
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", types.ModuleType("tensorrt_lean"))
    assert tensorrt_version() == NOT_INSTALLED
    stub.__version__ = "10.13.0"
    assert tensorrt_version() == "10.13.0 (tensorrt)"
    assert runnable_backends()[0] == "onnxruntime-cpu"
