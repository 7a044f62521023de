"""Peak memory of one benchmark row: host RSS, and GPU memory on a GPU.

Host: on Linux the kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs``
before the row and read after it, an exact peak at no cost. Elsewhere a sampling thread reads the
RSS (psutil), and failing that ``resource.getrusage`` gives the peak of the whole process so far
(labelled as such). GPU: the peak of device memory in use (``cudaMemGetInfo``, whole device),
sampled, because ONNX Runtime and TensorRT allocate outside any allocator we could ask.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil  # optional: only the fallback on systems without /proc

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - no way to read RSS here: the figure is reported as null
        return None


def _gpu_used_bytes() -> int | None:
    """Device memory in use on the current GPU (all processes), or None without CUDA."""
    try:
        from cuda.bindings import runtime as cudart

        err, free, total = cudart.cudaMemGetInfo()
        return int(total - free) if int(err) == 0 else None
    except Exception:  # noqa: BLE001 - no CUDA here: no GPU figure
        return None


class PeakMemory:
    """Context manager measuring the peak host RSS (and GPU memory when ``gpu``) inside the block.

    >>> with PeakMemory() as mem:  # doctest: +SKIP
    ...     run_the_row()
    >>> mem.to_dict()  # {"host_peak_mb": ..., "host_method": "VmHWM", "gpu_peak_mb": None, ...}
    """

    def __init__(self, gpu: bool = False, interval_s: float = 0.005) -> None:
        self.gpu = gpu
        self.interval_s = interval_s
        self.host_peak: int | None = None
        self.gpu_peak: int | None = None
        self.host_method = "none"
        self._sample = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take_sample()

    def _take_sample(self) -> None:
        if self._sample:
            rss = _rss_bytes()
            if rss is not None:
                self.host_peak = max(self.host_peak or 0, rss)
        if self.gpu:
            used = _gpu_used_bytes()
            if used is not None:
                self.gpu_peak = max(self.gpu_peak or 0, used)

    def __enter__(self) -> PeakMemory:
        if _reset_hwm():
            self.host_method = "VmHWM (kernel peak RSS, reset before the row)"
        elif _rss_bytes() is not None:
            self._sample = True
            self.host_method = f"RSS sampled every {self.interval_s * 1e3:g} ms"
        else:
            self.host_method = "ru_maxrss (peak of the whole process so far)"
        self._take_sample()
        if self._sample or self.gpu:
            self._thread = threading.Thread(target=self._poll, name="virchow-rt-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._take_sample()
        if self.host_method.startswith("VmHWM"):
            kb = _status_kb("VmHWM")
            self.host_peak = kb * 1024 if kb is not None else None
        elif self.host_method.startswith("ru_maxrss"):
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # Linux reports KiB, macOS bytes
            self.host_peak = int(peak if sys.platform == "darwin" else peak * 1024)

    def to_dict(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "host_peak_mb": None if self.host_peak is None else self.host_peak / mb,
            "host_method": self.host_method,
            "gpu_peak_mb": None if self.gpu_peak is None else self.gpu_peak / mb,
            "gpu_method": "cudaMemGetInfo sampled (whole device)" if self.gpu else None,
        }
