"""Ray's cost per slide: slides/hour and tiles/s of a local ``slides`` run vs ``--ray`` with 1 and 2 workers.

Writes ``--slides`` synthetic slides (real IHC tissue, JPEG tiles, 0.25 µm/px) and exports a variant
(default: the tiny mini, RANDOM WEIGHTS, so that the model is cheap and what is measured is the
per-slide machinery: opening, masking, reading, writing, and for Ray the scheduling and the workers'
start), both cached under ``--out``. Each configuration embeds all slides into a fresh folder:

- local: ``process_slides`` in this process;
- ray N: ``process_slides_ray`` on a new local Ray instance with N workers; ``job`` counts from the call
  (Ray's start, the workers opening the model, every slide, shutting down), ``slides`` once Ray is up
  (the workers opening the model, then every slide: the job's own ``wall_s``).

    python bench/slides_ray.py [--slides 8] [--size 4096x3072] [--variant virchow2g-mini-tiny]

Writes ``--out/slides_ray.json``; the environment is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from slides_throughput import _model, _slide

from virchow_rt.benchmark.environment import collect_environment
from virchow_rt.files import write_json
from virchow_rt.slides import SlideSettings, process_slides, process_slides_ray


def _row(name: str, summary: dict[str, Any], job_s: float) -> dict[str, Any]:
    totals = summary["totals"]
    assert totals["failed"] == 0 and totals["done"] == totals["slides"], totals
    slides_s = totals["wall_s"]
    row = {
        "config": name,
        "slides": totals["slides"],
        "tiles": totals["tiles_embedded"],
        "job_s": job_s,
        "slides_s": slides_s,
        "slides_per_hour": totals["slides"] * 3600 / job_s,
        "tiles_per_s": totals["tiles_embedded"] / job_s,
        "slides_per_hour_excluding_start": totals["slides"] * 3600 / slides_s,
    }
    print(
        f"{name:8s} {row['slides']} slides, {row['tiles']} tiles: job {job_s:6.1f} s "
        f"({row['slides_per_hour']:7.0f} slides/h, {row['tiles_per_s']:6.1f} tiles/s); "
        f"slides alone {slides_s:6.1f} s ({row['slides_per_hour_excluding_start']:7.0f} slides/h)",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="virchow2g-mini-tiny")
    p.add_argument("--out", type=Path, default=Path("out/bench/slides-ray"))
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--size", default="4096x3072", help="level-0 WIDTHxHEIGHT of each slide (0.25 µm/px)")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to run")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    model = _model(args.variant, args.out / "model")
    first = _slide(args.out / "slides" / "s00.svs", width, height, "jpeg")
    slides = [first]
    for i in range(1, args.slides):  # the same tissue: equal work per slide, each its own file
        slides.append(args.out / "slides" / f"s{i:02d}.svs")
        if not slides[-1].exists():
            shutil.copyfile(first, slides[-1])
    settings = SlideSettings()  # what `virchow-rt slides` does by default
    quiet = lambda line: None  # noqa: E731

    rows = []
    target = args.out / "run-local"
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.perf_counter()
    summary = process_slides(slides, model, target, settings, log=quiet, warn=quiet)
    rows.append(_row("local", summary, time.perf_counter() - t0))
    for n in (int(v) for v in args.workers.split(",")):
        target = args.out / f"run-ray{n}"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        summary = process_slides_ray(slides, model, target, settings, workers=n, log=quiet, warn=quiet)
        rows.append(_row(f"ray {n}", summary, time.perf_counter() - t0))
    local = rows[0]
    for row in rows[1:]:
        row["overhead_s_per_slide_vs_local"] = (row["job_s"] - local["job_s"]) / local["slides"]
    result = {
        "what": f"{args.variant} (RANDOM WEIGHTS) on {args.slides} synthetic {width}x{height} slides; "
        "local process_slides vs process_slides_ray on a local Ray instance",
        "model": str(model),
        "rows": rows,
        "environment": collect_environment(),
    }
    write_json(args.out / "slides_ray.json", result)
    print(f"wrote {args.out / 'slides_ray.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
