#!/usr/bin/env python
"""Thin entry point: print this machine's measured dense matmul peak (the roofline's denominator).

``python bench/matmul_peak.py [--size N] [--repeats R] [--json]``: CPU fp32 (numpy, torch) and bf16
(torch); on a GPU also CUDA fp16 and fp32 (torch, CUDA events). The numbers come from
:func:`virchow_rt.benchmark.roofline.measure_matmul_peak`, the same code the benchmark uses.
"""

from __future__ import annotations

import argparse
import json

from virchow_rt.benchmark.roofline import measure_matmul_peak
from virchow_rt.benchmark.rows import Machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="matrix side (default: 2048 CPU, 8192 GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    keys = [("cpu", "fp32"), ("cpu", "bf16")]
    if Machine.probe().has_cuda:
        keys += [("cuda", "fp16"), ("cuda", "fp32")]
    peaks = [measure_matmul_peak(dev, dtype, size=args.size, repeats=args.repeats) for dev, dtype in keys]
    if args.json:
        print(json.dumps(peaks, indent=2))
        return
    for p in peaks:
        measured = f"{p['tflops']:.3f} TFLOP/s via {p['library']}" if p["tflops"] else None
        value = measured or f"not measured: {p['reason']}"
        print(f"{p['key']:>10}: {value} ({p['size']}² matmul, best of {p['repeats']})")


if __name__ == "__main__":
    main()
