#!/usr/bin/env python
"""Thin entry point: what the Embedder's pipeline costs on top of raw ``backend.run`` calls.

Both paths embed the same real-tissue tiles (already S×S, so no resizing on either side) at the
variant's default batch with the same backend:

* raw: ``backend.run(batch)`` for each pre-split batch, one after another;
* embedder: ``Embedder(backend).embed(tiles)`` (batching, the reader thread, ``backend.pipeline``,
  pooling and concatenation).

Passes alternate (raw, embedder, raw, ...) after one warm-up each, so drift hits both alike; the
overhead is ``(embedder median - raw median) / raw median``. On a CPU the backend is ONNX Runtime on
a random-weights export (``--variant``, default the mini); with TensorRT importable and an engine in
the export folder (``--export DIR`` built with ``--tensorrt``), "auto" picks the TensorRT engine,
whose ``pipeline`` overlaps copies with compute, and the overhead can be negative.

    python bench/pipeline_overhead.py [--variant virchow2g-mini] [--export DIR] [--backend auto]
                                      [--batches 2] [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.backends import open_backend
from virchow_rt.benchmark.environment import collect_environment
from virchow_rt.benchmark.timing import Stats, split_batches
from virchow_rt.compare import compare
from virchow_rt.embed import Embedder
from virchow_rt.files import write_json
from virchow_rt.registry import get_variant
from virchow_rt.tissue import tissue_tiles


def export_folder(variant: str, given: str | None) -> Path:
    """The export to run: ``--export`` as given, else a fresh random-weights fp32 export in a temp folder."""
    if given:
        return Path(given)
    from virchow_rt.export.pipeline import export_model

    folder = Path(tempfile.mkdtemp(prefix=f"overhead-{variant}-"))
    print(f"exporting {variant} (random weights, fp32) to {folder} ...", file=sys.stderr)
    export_model(variant, folder, random_weights=True, precisions=("fp32",), parity_tiles=8)
    return folder


def measure(backend: Any, tiles: np.ndarray, batch: int, repeats: int) -> dict[str, Any]:
    """Alternate raw and Embedder passes; return both timings, the overhead and the agreement of outputs."""
    batches = split_batches(tiles, batch)
    embedder = Embedder(backend, batch_size=batch)

    def raw() -> np.ndarray:
        return np.concatenate([backend.run(b) for b in batches])

    def piped() -> np.ndarray:
        return embedder.embed(tiles)

    raw(), piped()  # warm-up: sessions, allocations, first-call costs
    samples: dict[str, list[float]] = {"raw": [], "embedder": []}
    outs: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, fn in (("raw", raw), ("embedder", piped)):
            start = time.perf_counter()
            outs[name] = fn()
            samples[name].append(time.perf_counter() - start)
    stats = {name: Stats(tuple(s)) for name, s in samples.items()}
    overhead = (stats["embedder"].median - stats["raw"].median) / stats["raw"].median
    agreement = compare(outs["embedder"], outs["raw"], tolerance=0.99999)
    return {
        "raw_backend_run_s": stats["raw"].to_dict(),
        "embedder_s": stats["embedder"].to_dict(),
        "overhead_pct": round(100 * overhead, 2),
        "tiles_per_s": {name: round(len(tiles) / s.median, 2) for name, s in stats.items()},
        "outputs_agree": agreement.to_dict(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="virchow2g-mini", help="variant to export when --export is not given")
    p.add_argument("--export", default=None, metavar="DIR", help="an existing export folder to run")
    p.add_argument("--backend", default="auto", help="open_backend's backend name (auto: TensorRT if usable)")
    p.add_argument("--batches", type=int, default=2, help="batches of the default size per pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each path")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the JSON here")
    args = p.parse_args(argv)

    folder = export_folder(args.variant, args.export)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RANDOM WEIGHTS: said once below, in the JSON
        backend = open_backend(folder, args.backend)
    with backend:
        variant = get_variant(backend.info.variant)
        # the batch the Embedder picks by default: the backend's fastest (8 on CPU), else the variant's
        batch = backend.preferred_batch or min(variant.batch.opt, backend.max_batch or variant.batch.opt)
        tiles = tissue_tiles(batch * args.batches, backend.info.tile_size, seed=0)
        result = {
            "what": "Embedder.embed vs raw backend.run loop, same tiles, same backend, default batch",
            "variant": backend.info.variant,
            "random_weights": backend.info.random_weights,
            "backend": backend.name,
            "model": str(folder),
            "batch": batch,
            "tiles": len(tiles),
            "repeats": args.repeats,
            **measure(backend, tiles, batch, args.repeats),
            "environment": collect_environment(),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_json(args.out, result)
    raw_s, piped_s = result["raw_backend_run_s"]["median"], result["embedder_s"]["median"]
    print(
        f"{result['backend']} {result['variant']} batch {batch}, {len(tiles)} tiles: raw backend.run "
        f"{raw_s:.3f} s, Embedder {piped_s:.3f} s -> overhead {result['overhead_pct']:+.2f} %",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    main()
