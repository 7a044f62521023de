"""Peak memory of a block of work."""

from __future__ import annotations

import numpy as np

from virchow_rt.benchmark.memory import PeakMemory


def test_peak_rss_sees_a_transient_allocation() -> None:
    with PeakMemory() as before:
        pass
    with PeakMemory() as mem:
        block = np.ones(300 * 1024 * 1024 // 8)  # 300 MB, touched
        del block
    d = mem.to_dict()
    assert d["host_peak_mb"] is not None and d["gpu_peak_mb"] is None
    # the peak includes the 300 MB even though it was freed before the block ended
    assert d["host_peak_mb"] >= before.to_dict()["host_peak_mb"] + 250
