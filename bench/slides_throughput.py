"""Whole-slide throughput on this machine: tiles/s end to end, and how much the reader and the model take.

Exports a variant (default: the mini, RANDOM WEIGHTS, fp32 ONNX) and writes a synthetic slide (real IHC
tissue on glass, JPEG tiles, 0.25 µm/px pyramid like a 40x scan), both cached under ``--out``. Then,
each after a warm-up and ``--repeats`` timed runs (median, spread):

- reader: the reading workers alone over the slide's tissue tiles (tiles/s)
- model: the backend alone on the same tiles already in memory (tiles/s)
- end to end: ``process_slides`` into a fresh folder (tiles/s over the slide's busy time), with its
  breakdown: mask, read (summed over the workers), time the model waited for tiles, model, write;
- reader scaling: tiles/s of the reader alone with 1, 2, 4, ... workers up to the machine's cores, as
  threads (the reader's pool, one slide handle each) and as processes (one slide handle each), so the
  default is chosen from a measurement: do the decoders release the GIL?

    python bench/slides_throughput.py [--variant virchow2g-mini] [--workers 2] [--batch 32] [--repeats 3]

Writes ``--out/slides_throughput.json``; the environment is recorded with the numbers. ``--parts FILE``
also appends each part of that report to FILE as one JSON line as soon as it is measured (merged in
order, the lines are the report so far): a run stopped at a time limit keeps what it reached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.benchmark.environment import collect_environment
from virchow_rt.benchmark.timing import Stats, time_calls
from virchow_rt.embed.embedder import default_batch_size
from virchow_rt.files import append_json_line, write_json
from virchow_rt.slides import (
    SlideSettings,
    TileReader,
    open_slide,
    process_slides,
    tile_grid,
    write_synthetic_slide,
)


def _model(variant: str, folder: Path) -> Path:
    from virchow_rt.contract import MANIFEST_NAME, Manifest
    from virchow_rt.export.pipeline import export_model

    target = folder / f"{variant}.fp32.onnx"
    if (folder / MANIFEST_NAME).exists() and target.exists() and Manifest.read(folder).artifact_for(target):
        return target
    print(f"exporting {variant} (RANDOM WEIGHTS, fp32) to {folder}/ ...", flush=True)
    manifest = export_model(variant, folder, random_weights=True, precisions=["fp32"])
    return folder / manifest.select("onnx", "fp32")[0].path


def _slide(path: Path, width: int, height: int, compression: str) -> Path:
    if not path.exists():
        print(f"writing a {width}x{height} synthetic slide to {path} ...", flush=True)
        pieces = (
            (width // 14, height // 12, width * 5 // 8, height * 5 // 8),
            (width * 3 // 4, height * 2 // 3, width // 5, height // 4),
        )
        write_synthetic_slide(
            path, width, height, pieces, mpp=0.25, levels=4, tile=256, compression=compression, layout="svs"
        )
    return path


def _sweep(slide_path: Path, plan: Any, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Reader tiles/s with 1, 2, 4, ... workers (up to the usable cores), as threads and as processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = sorted({1, cores, *(2**i for i in range(1, 8) if 2**i < cores)})
    results = []
    with open_slide(slide_path) as slide:
        for workers in counts:
            rates = {}
            for mode, processes in (("threads", False), ("processes", True)):
                reader = TileReader(slide, workers=workers, processes=processes)
                stats = time_calls(lambda r=reader: list(r.batches(plan, batch)), repeats=repeats, warmup=1)
                rates[f"{mode}_tiles_per_s"] = len(plan) / stats.median
            results.append({"workers": workers, **rates})
            print(f"reader, {workers} workers: threads {rates['threads_tiles_per_s']:8.1f} tiles/s, "
                  f"processes {rates['processes_tiles_per_s']:8.1f} tiles/s", flush=True)  # fmt: skip
    return results


def _rate(stats: Stats, tiles: int) -> dict[str, float]:
    return {"tiles_per_s": tiles / stats.median, "median_s": stats.median, "rel_spread": stats.rel_spread}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="virchow2g-mini")
    p.add_argument("--out", type=Path, default=Path("out/bench/slides"))
    p.add_argument(
        "--size", default="8192x6144", help="level-0 WIDTHxHEIGHT of the synthetic slide (0.25 µm/px)"
    )
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-sweep", action="store_true", help="skip the reader's threads-vs-processes sweep")
    p.add_argument(
        "--parts", type=Path, default=None, help="append each part of the report here as it is measured"
    )
    p.add_argument(
        "--compression",
        default=None,
        help="tile codec of the synthetic slide (default: jpeg as scanners write; zlib without imagecodecs)",
    )
    args = p.parse_args(argv)
    from virchow_rt._deps import is_importable

    compression = args.compression or ("jpeg" if is_importable("imagecodecs") else "zlib")

    from virchow_rt.backends import open_backend

    args.out.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    model = _model(args.variant, args.out / "model")
    slide_path = _slide(
        args.out / f"synthetic-{width}x{height}-{compression}.svs", width, height, compression
    )
    settings = SlideSettings(mpp=args.mpp, workers=args.workers, batch_size=args.batch, read_processes=True)
    report: dict[str, Any] = {}
    if args.parts:
        args.parts.write_text("")  # this run's parts only

    def keep(**part: Any) -> None:
        report.update(part)
        if args.parts:
            append_json_line(args.parts, part)

    keep(
        what="whole-slide throughput: reader alone, model alone, end to end (process_slides)",
        variant=args.variant,
        slide={"path": slide_path.name, "layout": "Aperio SVS", "size": [width, height], "mpp": 0.25,
               "compression": compression},
        target_mpp=args.mpp,
    )  # fmt: skip

    with open_slide(slide_path) as slide, open_backend(model, backend=args.backend) as backend:
        grid = tile_grid(slide, mpp=args.mpp)
        plan = grid.plan.resized(backend.info.tile_size)
        n = len(plan)
        batch = default_batch_size(backend, args.batch)  # what process_slides uses too
        reader = TileReader(slide, workers=args.workers, processes=True)  # as virchow-rt slides reads
        print(
            f"{slide_path.name}: {n} tissue tiles at {args.mpp} µm/px (read from level {grid.level}); "
            f"{reader.workers} reading {'processes' if reader.processes else 'threads'}, batch {batch}, "
            f"backend {backend.name}",
            flush=True,
        )
        kind = "processes" if reader.processes else "threads"
        keep(random_weights=bool(backend.info.random_weights), backend=backend.name, tiles=n,
             workers=reader.workers, worker_kind=kind, batch=batch)  # fmt: skip

        def read_all() -> list[np.ndarray]:
            return [
                b.tiles for b in TileReader(slide, workers=args.workers, processes=True).batches(plan, batch)
            ]

        read_stats = time_calls(read_all, repeats=args.repeats, warmup=1)
        keep(reader=_rate(read_stats, n))
        keep(reader_scaling=None if args.no_sweep else _sweep(slide_path, plan, batch, args.repeats))
        batches = read_all()
        model_stats = time_calls(lambda: list(backend.pipeline(batches)), repeats=args.repeats, warmup=1)
        keep(model=_rate(model_stats, n))

    runs = []
    for k in range(args.repeats + 1):  # the first is the warm-up
        folder = Path(tempfile.mkdtemp(prefix="slides-bench-", dir=args.out))
        try:
            summary = process_slides(
                [slide_path],
                model,
                folder,
                settings,
                backend=args.backend,
                log=lambda s: None,
                warn=lambda s: None,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        record = summary["slides"][0]
        if record["status"] != "done":
            raise SystemExit(f"the slide failed: {record['reason']}")
        if k:
            runs.append(record)
    busy = Stats(tuple(r["timings"]["total_s"] for r in runs))
    median_run = sorted(runs, key=lambda r: r["timings"]["total_s"])[len(runs) // 2]
    timings = median_run["timings"]
    breakdown = {
        key: timings[key] / timings["total_s"] for key in ("mask_s", "read_wait_s", "embed_s", "write_s")
    }

    keep(end_to_end={**_rate(busy, n), "timings_s": timings, "share_of_time": breakdown})
    report["environment"] = collect_environment()
    write_json(args.out / "slides_throughput.json", report)
    e2e = report["end_to_end"]
    print(
        f"reader alone : {report['reader']['tiles_per_s']:8.1f} tiles/s  (spread {read_stats.rel_spread:.0%})"
    )
    print(
        f"model alone  : {report['model']['tiles_per_s']:8.1f} tiles/s  (spread {model_stats.rel_spread:.0%})"
    )
    print(f"end to end   : {e2e['tiles_per_s']:8.1f} tiles/s  (spread {busy.rel_spread:.0%})")
    shares = ", ".join(f"{key[:-2]} {share:.0%}" for key, share in breakdown.items())
    print(f"  end-to-end time: {shares}; reading: {timings['read_s']:.2f} s over {reader.workers} workers")
    print(f"machine: {report['environment']['machine']}; RANDOM WEIGHTS: {report['random_weights']}")
    print(f"report: {args.out / 'slides_throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
