"""Host memory of ``process_slides`` on very large slides: peak RSS must not grow with the tile count.

Writes two synthetic slides (:func:`virchow_rt.slides.synthetic.write_large_slide`: real IHC tissue,
JPEG tiles, tissue everywhere) of about ``--small`` and ``--tiles`` tissue tiles at 0.5 µm/px, then runs
``process_slides`` on each in a fresh process, sampling its resident memory, and prints the peaks.

The model is a stand-in with the Virchow2G-mini's output (768 floats per tile, class ‖ patch mean):
this measures the pipeline's host memory (reading, batching, streaming features into the ``.h5``), not a
model's, which is the same for every batch whatever the slide's size. Say so with any figure quoted.

    python bench/slides_memory.py [--tiles 100000] [--small 10000] [--out out/bench/slides-memory]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from virchow_rt.benchmark.environment import collect_environment
from virchow_rt.files import write_json
from virchow_rt.slides.synthetic import write_large_slide

RUN = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    from virchow_rt.backends.base import Backend
    from virchow_rt.contract import ModelInfo
    from virchow_rt.slides import SlideSettings, process_slides

    def rss_mb():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024

    streaming = []  # RSS at every batch: the model is called only while tiles stream (after the mask)

    class MiniShaped(Backend):  # the mini's output size, no model compute (see the script's docstring)
        name = "mini-shaped-stand-in"
        info = ModelInfo("virchow2g-mini", 768, 384, 224, "fp32", True, "random")
        def run(self, tiles):
            streaming.append(rss_mb())
            return np.repeat(tiles.mean(axis=(1, 2, 3), dtype=np.float32)[:, None], 768, axis=1)

    peak, done = [rss_mb()], threading.Event()
    def sample():
        while not done.is_set():
            peak.append(rss_mb()); time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    summary = process_slides([sys.argv[1]], MiniShaped(), sys.argv[2], SlideSettings(batch_size=64),
                             log=lambda s: None)
    done.set()
    slide = summary["slides"][0]
    seconds = time.perf_counter() - start
    print(json.dumps({"tiles": slide["tiles"], "status": slide["status"], "seconds": seconds,
                      "peak_rss_mb": max(peak), "start_rss_mb": peak[0], "first_batch_rss_mb": streaming[0],
                      "peak_streaming_rss_mb": max(streaming), "last_batch_rss_mb": streaming[-1]}))
    """
)


def measure(slide: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a complete .h5 of an earlier run would be skipped, not measured
    proc = subprocess.run([sys.executable, "-c", RUN, str(slide), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run on {slide.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=100_000)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=Path("out/bench/slides-memory"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for count in (args.small, args.tiles):
        side = math.ceil(math.sqrt(count)) * 224  # 224 px tiles at 0.5 µm/px: level 0 is the tile grid
        path = args.out / f"large-{side}px.tif"
        if not path.exists():
            print(f"writing a {side}x{side} px slide (~{count} tiles) ...", flush=True)
            write_large_slide(path, side, side, mpp=0.5)
        result = {"slide_px": side, **measure(path, args.out / f"features-{side}")}
        results.append(result)
        r = result
        print(f"{r['tiles']:>8} tiles: peak RSS {r['peak_rss_mb']:.0f} MB (start {r['start_rss_mb']:.0f}); "
              f"while tiles stream: first batch {r['first_batch_rss_mb']:.0f} MB, peak "
              f"{r['peak_streaming_rss_mb']:.0f}, last {r['last_batch_rss_mb']:.0f}; {r['seconds']:.0f} s",
              flush=True)  # fmt: skip
    small, large = results
    # the tissue mask (a thumbnail of at most 4096 px a side) is read before any tile: its memory grows with
    # the slide's area up to that cap, then stays; what must stay flat is the streaming of tiles after it
    growth = (large["last_batch_rss_mb"] - large["first_batch_rss_mb"]) / max(large["tiles"], 1) * 1024
    report = {
        "what": "peak host RSS of process_slides on two synthetic slides (a stand-in of the mini's shape)",
        "results": results,
        "streaming_rss_growth_kb_per_1000_tiles": growth * 1000,
        "features_if_held_in_memory_mb": large["tiles"] * 768 * 4 / 2**20,
        "environment": collect_environment(),
    }
    write_json(args.out / "slides_memory.json", report)
    held = report["features_if_held_in_memory_mb"]
    report_path = args.out / "slides_memory.json"
    print(f"while {large['tiles']} tiles stream, RSS grows {growth * 1000:.1f} KB per 1000 tiles; holding "
          f"the features in memory would take {held:.0f} MB; report: {report_path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
