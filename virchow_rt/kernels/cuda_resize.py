"""GPU tile preprocessing, bit-exact with PIL: shorter side -> S (antialiased bicubic), center crop.

timm's eval transform for Virchow (crop_pct 1.0) is ``Resize(S, bicubic)`` -> ``CenterCrop(S)`` on PIL
images. PIL's resampler is separable and antialiased: for a downscale by ``f`` the bicubic kernel
(a = -0.5) is stretched to a support of ``2·f`` source pixels; the weights of each output pixel are
normalised, turned into 22-bit fixed point, and applied horizontally first (rounded to uint8), then
vertically. This module computes those weight tables in numpy (:func:`resize_plan`), reproduces the
resample with them on the CPU (:func:`resample_numpy`, tested against PIL), and runs the same integer
arithmetic in two CUDA kernels compiled at run time with NVRTC (:class:`CudaResizer`), with the
tables uploaded once per tile size. Only the output pixels inside the center crop are computed.
Normalisation ((x/255 - mean)/std) happens inside the exported graph, so the output stays uint8.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.backends.cuda import api as cuda
from virchow_rt.backends.cuda.api import load_nvrtc
from virchow_rt.errors import BackendError, InputError

PRECISION_BITS = 22  # PIL: 32 bits - 8 for the pixel - 2 for the overshoot of negative lobes
SUPPORT = 2.0  # bicubic support in output pixels
A = -0.5  # PIL's bicubic parameter (Keys' kernel)
_BLOCK = 256


def bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), float64."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    near = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's ``precompute_coeffs`` for one axis: first source pixel (O,), taps (O,), weights (O, K) float64.

    Follows PIL's arithmetic step by step (C truncation of ``center ± support + 0.5``, weights
    normalised to sum 1, unused taps zero) so that the fixed-point weights match PIL's exactly.
    """
    if in_size < 1 or out_size < 1:
        raise InputError(f"cannot resize an axis of {in_size} pixels to {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    starts = np.empty(out_size, np.int32)
    counts = np.empty(out_size, np.int32)
    weights = np.zeros((out_size, ksize), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, like C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = bicubic((np.arange(xmax) + xmin - center + 0.5) / filterscale)
        total = w.sum()
        weights[xx, :xmax] = w / total if total != 0.0 else w
        starts[xx], counts[xx] = xmin, xmax
    return starts, counts, weights


def fixed_point(weights: np.ndarray) -> np.ndarray:
    """PIL's ``normalize_coeffs_8bpc``: round half away from zero to ``PRECISION_BITS`` fixed point, int32."""
    scaled = weights * (1 << PRECISION_BITS)
    return np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` on the shorter side: (new_h, new_w), the long side truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``CenterCrop(size)``: (top, left), rounded half to even as Python's round() does."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


@dataclass(frozen=True)
class AxisPlan:
    """Weights of the ``size`` output pixels of one axis inside the crop."""

    starts: np.ndarray  # (size,) int32 first source index (relative to ``first`` for the vertical axis)
    counts: np.ndarray  # (size,) int32 taps used
    weights: np.ndarray  # (size, K) int32, PRECISION_BITS fixed point, zero past ``counts``
    first: int  # first source index any output pixel reads
    span: int  # source pixels read, from ``first``


@dataclass(frozen=True)
class ResizePlan:
    """Everything the resample of one tile size needs: geometry and the two weight tables."""

    height: int
    width: int
    size: int
    resized: tuple[int, int]  # (new_h, new_w) before the crop
    offsets: tuple[int, int]  # (top, left) of the crop
    rows: AxisPlan  # vertical pass, source = the horizontal pass's rows first..first+span
    cols: AxisPlan  # horizontal pass, source = the tile's columns

    @property
    def taps(self) -> tuple[int, int]:
        return int(self.rows.weights.shape[1]), int(self.cols.weights.shape[1])


def _axis(in_size: int, out_size: int, offset: int, size: int, relative: bool) -> AxisPlan:
    starts, counts, weights = pil_coefficients(in_size, out_size)
    starts, counts, weights = (
        starts[offset : offset + size],
        counts[offset : offset + size],
        weights[offset : offset + size],
    )
    first = int(starts.min())
    span = int((starts + counts).max()) - first
    return AxisPlan(
        (starts - first if relative else starts).astype(np.int32), counts, fixed_point(weights), first, span
    )


@functools.lru_cache(maxsize=64)
def resize_plan(height: int, width: int, size: int = 224) -> ResizePlan:
    """The plan for ``height`` x ``width`` tiles: shorter side -> ``size``, center crop to ``size``²."""
    if min(height, width) < 1 or size < 1:
        raise InputError(f"cannot resize tiles of {height}x{width} px to {size} px")
    new_h, new_w = resized_size(height, width, size)
    top, left = crop_offsets(new_h, new_w, size)
    return ResizePlan(
        height=height,
        width=width,
        size=size,
        resized=(new_h, new_w),
        offsets=(top, left),
        rows=_axis(height, new_h, top, size, relative=True),
        cols=_axis(width, new_w, left, size, relative=False),
    )


def _apply(src: np.ndarray, axis: int, plan: AxisPlan) -> np.ndarray:
    """One separable pass along ``axis`` of uint8 ``src`` with PIL's integer arithmetic -> uint8."""
    taps = plan.weights.shape[1]
    idx = np.minimum(
        plan.starts[:, None] + np.arange(taps)[None, :], src.shape[axis] - 1
    )  # (O, K); w=0 past counts
    gathered = np.take(src, idx, axis=axis).astype(np.int64)  # axis -> (O, K)
    w = plan.weights.astype(np.int64)
    shape = [1] * gathered.ndim
    shape[axis], shape[axis + 1] = w.shape
    acc = (gathered * w.reshape(shape)).sum(axis=axis + 1) + (1 << (PRECISION_BITS - 1))
    out: np.ndarray = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return out


def resample_numpy(tiles: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """The CUDA kernels' arithmetic in numpy: uint8 (N, H, W, 3) -> uint8 (N, size, size, 3)."""
    rows = tiles[:, plan.rows.first : plan.rows.first + plan.rows.span]  # (N, R, W, 3) rows the crop reads
    horizontal = _apply(rows, 2, plan.cols)  # (N, R, size, 3)
    return _apply(horizontal, 1, plan.rows)  # (N, size, size, 3)


KERNELS = r"""
__device__ __forceinline__ unsigned char clip8(int v) {
    v >>= PRECISION_BITS;  // arithmetic shift: floor, like PIL's lookup table
    return (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One thread per (tile, source row of the crop window, output column): 3 channels.
extern "C" __global__ void resize_horizontal(
    const unsigned char* __restrict__ src, unsigned char* __restrict__ tmp,
    const int* __restrict__ starts, const int* __restrict__ counts, const int* __restrict__ weights,
    int n, int height, int width, int first_row, int rows, int size, int taps)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * rows * size) return;
    int x = (int)(idx % size);
    long long t = idx / size;
    int r = (int)(t % rows);
    long long i = t / rows;
    const unsigned char* line = src + ((i * height + first_row + r) * width) * 3;
    const int* w = weights + (long long)x * taps;
    int start = starts[x], count = counts[x];
    int s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
    for (int k = 0; k < count; ++k) {
        const unsigned char* p = line + (long long)(start + k) * 3;
        int wk = w[k];
        s0 += p[0] * wk;
        s1 += p[1] * wk;
        s2 += p[2] * wk;
    }
    unsigned char* o = tmp + ((i * rows + r) * size + x) * 3;
    o[0] = clip8(s0);
    o[1] = clip8(s1);
    o[2] = clip8(s2);
}

// One thread per (tile, output row, output column): 3 channels, reading the horizontal pass's rows.
extern "C" __global__ void resize_vertical(
    const unsigned char* __restrict__ tmp, unsigned char* __restrict__ dst,
    const int* __restrict__ starts, const int* __restrict__ counts, const int* __restrict__ weights,
    int n, int rows, int size, int taps)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * size * size) return;
    int x = (int)(idx % size);
    long long t = idx / size;
    int y = (int)(t % size);
    long long i = t / size;
    const int* w = weights + (long long)y * taps;
    int start = starts[y], count = counts[y];
    int s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
    for (int k = 0; k < count; ++k) {
        const unsigned char* p = tmp + ((i * rows + start + k) * size + x) * 3;
        int wk = w[k];
        s0 += p[0] * wk;
        s1 += p[1] * wk;
        s2 += p[2] * wk;
    }
    unsigned char* o = dst + ((i * size + y) * size + x) * 3;
    o[0] = clip8(s0);
    o[1] = clip8(s1);
    o[2] = clip8(s2);
}
"""


@functools.cache
def compile_kernels(arch: str) -> bytes:
    """Compile :data:`KERNELS` with NVRTC for ``arch`` (e.g. "sm_89") -> CUBIN bytes, once per process.

    Needs no GPU."""
    nvrtc = load_nvrtc()
    source = f"#define PRECISION_BITS {PRECISION_BITS}\n{KERNELS}".encode()
    prog = cuda.check(nvrtc.nvrtcCreateProgram(source, b"virchow_resize.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"--std=c++14"]
        result = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if int(result[0]) != 0:
            size = cuda.check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            cuda.check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise BackendError(
                f"NVRTC could not compile the resize kernel for {arch}: "
                f"{log.decode(errors='replace').strip()} (a GPU newer than this NVRTC? "
                "pip install -U cuda-python nvidia-cuda-nvrtc)"
            )
        size = cuda.check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        cuda.check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return bytes(cubin)
    finally:
        cuda.check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")


def _launch_args(*args: tuple[int, Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """cuLaunchKernel's ``void**``: pointers to each argument's bytes (the caller keeps the values alive)."""
    values = [np.array([value], dtype=dtype) for value, dtype in args]
    return np.array([v.ctypes.data for v in values], dtype=np.uint64), values


class _Tables:
    """One tile size's weight tables on the GPU, in a single buffer."""

    def __init__(self, plan: ResizePlan, stream: cuda.Stream) -> None:
        parts = [
            plan.cols.starts,
            plan.cols.counts,
            plan.cols.weights,
            plan.rows.starts,
            plan.rows.counts,
            plan.rows.weights,
        ]
        flat = np.ascontiguousarray(np.concatenate([p.ravel() for p in parts]).astype(np.int32))
        self.buffer = cuda.DeviceBuffer(flat.nbytes)
        cuda.copy_async(self.buffer.ptr, flat.ctypes.data, flat.nbytes, "h2d", stream)
        stream.synchronize()  # ``flat`` is pageable and local: finish before it goes
        offsets = np.cumsum([0] + [p.size for p in parts]) * 4
        self.pointers = [self.buffer.ptr + int(o) for o in offsets[:-1]]
        self.plan = plan


class CudaResizer:
    """Resize + center-crop uint8 RGB tiles on the GPU, equal to ``virchow_rt.kernels.resize.resize_tiles``.

    Compiles its two kernels with NVRTC for the GPU's compute capability on construction (once per
    process). Its scratch buffer is shared by every :meth:`resize_device` call: queue work from one
    stream at a time (one resizer per stream). Calling the resizer (host in, host out) is thread-safe:
    calls take turns and reuse their device buffers. Free it with :meth:`close` (or ``with``).
    """

    def __init__(self, size: int = 224, device: int = 0) -> None:
        self.size, self.device = size, device
        drv = optional_import("cuda.bindings.driver", "to launch the GPU resize kernel")
        cuda.set_device(device)  # makes the primary context current for the driver-API calls below
        major, minor = cuda.device_info(device).compute_capability.split(".")
        self._drv = drv
        self._module = cuda.check(
            drv.cuModuleLoadData(compile_kernels(f"sm_{major}{minor}")), "cuModuleLoadData"
        )
        try:
            self._horizontal = cuda.check(
                drv.cuModuleGetFunction(self._module, b"resize_horizontal"), "cuModuleGetFunction"
            )
            self._vertical = cuda.check(
                drv.cuModuleGetFunction(self._module, b"resize_vertical"), "cuModuleGetFunction"
            )
            self._stream = cuda.Stream()
        except BaseException:  # the loaded module would otherwise stay in GPU memory for the process
            drv.cuModuleUnload(self._module)
            self._module = None
            raise
        self._tables: dict[tuple[int, int], _Tables] = {}
        # device buffers by use, grown as needed: "tmp" (the horizontal pass's scratch) and, for host
        # calls, "src" and "dst"
        self._buffers: dict[str, cuda.DeviceBuffer] = {}
        self._lock = threading.Lock()

    def _launch(self, func: Any, threads: int, stream: cuda.Stream, *args: tuple[int, Any]) -> None:
        params, _keep = _launch_args(*args)
        grid = (threads + _BLOCK - 1) // _BLOCK
        handle = self._drv.CUstream(stream.ptr)
        cuda.check(
            self._drv.cuLaunchKernel(func, grid, 1, 1, _BLOCK, 1, 1, 0, handle, params.ctypes.data, 0),
            "cuLaunchKernel(resize)",
        )

    def resize_device(self, src: int, n: int, height: int, width: int, dst: int, stream: cuda.Stream) -> None:
        """Queue the resize of ``n`` tiles (N, H, W, 3) at device address ``src`` to (N, S, S, 3) at ``dst``.

        ``stream`` orders it after the caller's writes of ``src``; nothing here blocks the host except
        the first use of a tile size (its weight tables are uploaded) or a larger scratch buffer.
        """
        if n == 0:
            return
        key = (height, width)
        if key not in self._tables:
            self._tables[key] = _Tables(resize_plan(height, width, self.size), self._stream)
        tables = self._tables[key]
        plan, s = tables.plan, self.size
        need = n * plan.rows.span * s * 3
        tmp = self._buffer("tmp", need, stream)
        taps_v, taps_h = plan.taps
        ptr, i32 = np.uint64, np.int32
        h_starts, h_counts, h_weights, v_starts, v_counts, v_weights = tables.pointers
        self._launch(
            self._horizontal, n * plan.rows.span * s, stream,
            (src, ptr), (tmp.ptr, ptr), (h_starts, ptr), (h_counts, ptr), (h_weights, ptr),
            (n, i32), (height, i32), (width, i32), (plan.rows.first, i32), (plan.rows.span, i32), (s, i32),
            (taps_h, i32),
        )  # fmt: skip
        self._launch(
            self._vertical, n * s * s, stream,
            (tmp.ptr, ptr), (dst, ptr), (v_starts, ptr), (v_counts, ptr), (v_weights, ptr),
            (n, i32), (plan.rows.span, i32), (s, i32), (taps_v, i32),
        )  # fmt: skip

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """Host convenience: uint8 (N, H, W, 3) -> new uint8 (N, S, S, 3), synchronously."""
        tiles = np.ascontiguousarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise InputError(f"tiles must be uint8 (N, H, W, 3) RGB, got {tiles.dtype} {tiles.shape}")
        n, h, w, _ = tiles.shape
        out = np.empty((n, self.size, self.size, 3), np.uint8)
        if n == 0:
            return out
        with self._lock:
            if self._module is None:
                raise BackendError("this CudaResizer was closed; make a new one")
            cuda.set_device(self.device)  # this thread's current GPU (e.g. an Embedder's reader thread)
            src = self._buffer("src", tiles.nbytes, self._stream)
            dst = self._buffer("dst", out.nbytes, self._stream)
            cuda.copy_async(src.ptr, tiles.ctypes.data, tiles.nbytes, "h2d", self._stream)
            self.resize_device(src.ptr, n, h, w, dst.ptr, self._stream)
            cuda.copy_async(out.ctypes.data, dst.ptr, out.nbytes, "d2h", self._stream)
            self._stream.synchronize()
        return out

    def _buffer(self, name: str, nbytes: int, stream: cuda.Stream) -> cuda.DeviceBuffer:
        """The device buffer ``name``, reallocated only when it is too small (after ``stream``'s queued
        work, which may still read the old one)."""
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                stream.synchronize()
                buf.close()
            buf = self._buffers[name] = cuda.DeviceBuffer(nbytes)
        return buf

    def close(self) -> None:
        """Free the tables, buffers, stream and module, after a call in progress ends. Safe twice."""
        if getattr(self, "_module", None) is None:
            return
        with self._lock:
            if self._module is None:
                return
            self._stream.synchronize()
            for tables in self._tables.values():
                tables.buffer.close()
            self._tables.clear()
            for buf in self._buffers.values():
                buf.close()
            self._buffers.clear()
            self._stream.close()
            cuda.check(self._drv.cuModuleUnload(self._module), "cuModuleUnload")
            self._module = None

    def __enter__(self) -> CudaResizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
