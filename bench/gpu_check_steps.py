#!/usr/bin/env python
"""The GPU check's steps that import the heavy packages or touch the GPU, each run in a process of its own.

``bench/gpu_check.py`` starts ``python bench/gpu_check_steps.py STEP ... --result FILE`` with a time limit
(SIGINT, then SIGKILL), so a hang or a crash inside CUDA costs that step alone; the step writes what it
found as JSON into FILE. virchow-rt is imported from ``PYTHONPATH`` (the tree's root), never from the
current folder: these processes start outside the tree, so a check that passes proves the import.

    probe               import virchow-rt and the packages the check uses (each timed); the environment
    bandwidth MIB       pinned and pageable host<->device copy rates
    resize TILES        the NVRTC resize kernel against the CPU reference, and its speed
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: modules whose import the probe times and records (a missing one is recorded, not fatal)
MODULES = (
    "numpy",
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "cuda.bindings.runtime",
    "cuda.core",
    "cupy",
    "h5py",
    "tifffile",
    "skimage",
    "openslide",
    "tiffslide",
    "pytest",
    "pytest_timeout",
)
#: whole-slide readers virchow-rt can use (virchow_rt.slides.reader.READERS)
SLIDE_READERS = ("openslide", "tiffslide")


def _timed_import(name: str) -> dict[str, Any]:
    start, error = time.perf_counter(), None
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - openslide raises OSError without its library; all are recorded
        error = f"{type(err).__name__}: {err}"
    return {"ok": error is None, "seconds": round(time.perf_counter() - start, 2), "error": error}


def probe() -> dict[str, Any]:
    """virchow-rt's import (it must work), the other packages' (recorded), GPU visibility, the environment."""
    start = time.perf_counter()
    import virchow_rt  # an ImportError here fails the step: nothing else could run

    imports = {
        "virchow_rt": {"ok": True, "seconds": round(time.perf_counter() - start, 2), "error": None,
                       "from": str(Path(virchow_rt.__file__).resolve().parent)},
    }  # fmt: skip
    imports.update({name: _timed_import(name) for name in MODULES})
    from virchow_rt.benchmark.environment import collect_environment

    return {
        "imports": imports,
        "gpu_visible": gpu_visible(),
        "slide_readers": [r for r in SLIDE_READERS if imports[r]["ok"]],
        "environment": collect_environment(),
    }


def gpu_visible() -> bool:
    """A CUDA GPU is visible to cuda-python and to torch (the check uses both)."""
    from virchow_rt._deps import is_importable
    from virchow_rt.backends.cuda import api as cuda

    if not is_importable("torch") or cuda.device_count() == 0:
        return False
    import torch

    return bool(torch.cuda.is_available())


def bandwidth(mib: int, repeats: int = 5) -> dict[str, Any]:
    """Host<->device copy rates: pinned (async on a stream, CUDA events) and pageable (synchronous)."""
    import numpy as np

    from virchow_rt.backends.cuda import api as cuda
    from virchow_rt.benchmark.timing import Stats, time_calls

    nbytes = mib << 20
    rt = cuda.cudart()
    pageable = np.ones(nbytes, np.uint8)
    with cuda.PinnedBuffer(nbytes) as host, cuda.DeviceBuffer(nbytes) as dev, cuda.Stream() as stream:
        timer = cuda.EventTimer(stream)

        def timed(kind: str) -> Stats:
            dst, src = (dev.ptr, host.ptr) if kind == "h2d" else (host.ptr, dev.ptr)
            samples = [
                timer.measure(lambda: cuda.copy_async(dst, src, nbytes, kind, stream))
                for _ in range(repeats + 1)
            ]
            return Stats(tuple(samples[1:]))

        h2d, d2h = timed("h2d"), timed("d2h")
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        copy = lambda: cuda.check(rt.cudaMemcpy(dev.ptr, pageable.ctypes.data, nbytes, kind), "cudaMemcpy")  # noqa: E731
        paged = time_calls(copy, repeats=repeats, warmup=1)
    rates = {"pinned_h2d_gb_s": h2d, "pinned_d2h_gb_s": d2h, "pageable_h2d_gb_s": paged}
    return {"bytes": nbytes, **{name: nbytes / stats.median / 1e9 for name, stats in rates.items()}}


def resize_check(n: int, size_in: int = 448, size: int = 224, repeats: int = 5) -> dict[str, Any]:
    """The NVRTC resize kernel vs the CPU reference on ``n`` tissue tiles of ``size_in`` px: pixels, time."""
    import numpy as np

    from virchow_rt.backends.cuda import api as cuda
    from virchow_rt.benchmark.timing import Stats, time_calls
    from virchow_rt.kernels.cuda_resize import CudaResizer
    from virchow_rt.kernels.resize import resize_tiles
    from virchow_rt.tissue import tissue_tiles

    tiles = tissue_tiles(n, size_in, seed=11)  # (n, 448, 448, 3): 40x tiles
    want = resize_tiles(tiles, size)
    cpu = time_calls(lambda: resize_tiles(tiles, size), repeats=repeats, warmup=0)
    with CudaResizer(size) as resizer, cuda.Stream() as stream:
        got = resizer(tiles)
        host = time_calls(lambda: resizer(tiles), repeats=repeats, warmup=1)
        with cuda.DeviceBuffer(tiles.nbytes) as src, cuda.DeviceBuffer(want.nbytes) as dst:
            cuda.copy_async(src.ptr, tiles.ctypes.data, tiles.nbytes, "h2d", stream)
            stream.synchronize()
            timer = cuda.EventTimer(stream)
            run = lambda: resizer.resize_device(src.ptr, n, size_in, size_in, dst.ptr, stream)  # noqa: E731
            device = Stats(tuple(timer.measure(run) for _ in range(repeats + 1))[1:])
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {
        "tiles": n, "from_px": size_in, "to_px": size, "max_abs_diff": int(diff.max()),
        "equal_pixels": float((diff == 0).mean()),
        "cpu_tiles_per_s": n / cpu.median, "gpu_host_to_host_tiles_per_s": n / host.median,
        "gpu_device_only_tiles_per_s": n / device.median,
    }  # fmt: skip


def write_result(path: Path, result: Any) -> None:
    """``result`` as JSON into ``path``, whole or not at all (written beside it, then renamed)."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(part, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("probe", "bandwidth", "resize"))
    p.add_argument("size", type=int, nargs="?", default=8, help="MiB per copy (bandwidth), tiles (resize)")
    p.add_argument("--result", type=Path, required=True, help="where the step's JSON result is written")
    args = p.parse_args(argv)
    if args.step == "probe":
        result = probe()
    elif args.step == "bandwidth":
        result = bandwidth(args.size)
    else:
        result = resize_check(args.size)
    write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
