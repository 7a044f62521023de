#!/usr/bin/env python
"""Thin entry point: `virchow-rt embed` (ONNX Runtime fp32) vs timm eager fp32 + timm's transform, end to end.

The issue's target: on the 2-core CPU, ``virchow-rt embed`` of 512 tiles with the mini fp32 export
(process start included) runs >= 1.3x the tiles/s of timm's eager fp32 model with timm's
preprocessing. Both sides are fresh processes timed from launch to exit, on the same 512 bundled
tissue tiles (a uint8 .npy), alternating order over the repeats:

* ``virchow-rt embed MODEL tiles.npy --out emb.npy`` with its defaults (ONNX Runtime CPU picks batch 8),
  writing embeddings + sidecar, as a user would;
* a timm process: ``import torch, timm``, build the same random-weight timm model the export came from
  (``virchow_rt.export.build_model``, seed 0), then per batch ``PIL.Image -> timm transform -> stack ->
  forward_features`` under ``torch.inference_mode()``, pooling class ‖ patch mean, ``np.save``. Its
  batch (``--timm-batch``) defaults to 8, timm's fastest on the 2-core CPU (in-process, tiles/s:
  batch 4: 12.9, 8: 13.3, 16: 12.2, 32: 11.1, 64: 11.3), so the baseline gets its best setting.

Both outputs are compared (cosine) to show the two processes compute the same embeddings.

    python bench/embed_vs_timm.py [--export DIR] [--tiles 512] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANT = "virchow2g-mini"


def timm_worker(tiles_npy: str, out_npy: str, batch: int) -> None:
    """The baseline process: timm eager fp32 with timm's own eval transform (runs in its own process)."""
    start = time.perf_counter()
    import timm.data
    import torch
    from PIL import Image

    from virchow_rt.model.vit import build_model

    imported = time.perf_counter()
    model, variant, _ = build_model(VARIANT, random_weights=True, seed=0)  # the export's weights
    pre = variant.preprocess
    transform = timm.data.create_transform(
        input_size=(3, pre.size, pre.size),
        interpolation=pre.interpolation,
        crop_pct=pre.crop_pct,
        mean=pre.mean,
        std=pre.std,
    )
    built = time.perf_counter()
    tiles = np.load(tiles_npy)  # (N, H, W, 3) uint8
    outputs, transform_s = [], 0.0
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            t0 = time.perf_counter()
            x = torch.stack(
                [transform(Image.fromarray(tile)) for tile in tiles[i : i + batch]]
            )  # (B, 3, S, S)
            transform_s += time.perf_counter() - t0
            tokens = model.forward_features(x)  # (B, T, D)
            pooled = torch.cat(
                [tokens[:, 0], tokens[:, variant.num_prefix_tokens :].mean(1)], dim=1
            )  # (B, 2D)
            outputs.append(pooled.numpy())
    np.save(out_npy, np.concatenate(outputs))
    done = time.perf_counter()
    timings = {
        "import_s": imported - start,
        "build_s": built - imported,
        "transform_s": transform_s,
        "loop_s": done - built,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(timings))


def _virchow_rt_command() -> list[str]:
    script = Path(sys.executable).with_name("virchow-rt")  # the installed console script, no shell shim
    return [str(script)] if script.exists() else [sys.executable, "-m", "virchow_rt.cli.main"]


def _portable(arg: str | Path) -> str:
    """A command's argument as one would type it anywhere: programs by name, paths here relative."""
    path = Path(arg)
    if path == Path(sys.executable):
        return "python"
    if path == Path(sys.executable).with_name("virchow-rt"):
        return "virchow-rt"
    try:
        return str(path.relative_to(Path.cwd())) if path.is_absolute() else str(arg)
    except ValueError:
        return str(arg)


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds from process launch to exit (process start included), and its stdout."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return wall, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None, help="existing export folder of virchow2g-mini")
    parser.add_argument("--out", type=Path, default=Path("out/bench-embed-vs-timm"))
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="virchow-rt embed --batch (default: its own)")
    parser.add_argument(
        "--timm-batch", type=int, default=8, help="timm's batch (default 8, its fastest here)"
    )
    parser.add_argument("--timm-worker", nargs=2, metavar=("TILES_NPY", "OUT_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timm_worker:
        timm_worker(*args.timm_worker, args.timm_batch)
        return

    from virchow_rt.benchmark.environment import collect_environment, load_average
    from virchow_rt.benchmark.timing import Stats
    from virchow_rt.compare import compare
    from virchow_rt.tissue import tissue_tiles

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    folder = args.export or out / "export"
    if not (folder / "manifest.json").exists():
        from virchow_rt.export.pipeline import export_model

        print(f"exporting {VARIANT} (random weights) to {folder} ...", flush=True)
        export_model(VARIANT, folder, random_weights=True, precisions=("fp32",), parity_tiles=8)
    model = folder / f"{VARIANT}.fp32.onnx"
    tiles = tissue_tiles(args.tiles, 224, seed=0)  # (N, 224, 224, 3) uint8
    np.save(out / "tiles.npy", tiles)
    np.save(out / "warmup.npy", tiles[: min(16, len(tiles))])
    env = {**os.environ, "VIRCHOW_RT_CACHE": str(out / "cache"), "PYTHONWARNINGS": "ignore"}
    ours = [
        *_virchow_rt_command(),
        "embed",
        str(model),
        *(["--batch", str(args.batch)] if args.batch else []),
    ]
    timm = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--timm-batch",
        str(args.timm_batch),
        "--timm-worker",
    ]
    commands = {
        "virchow-rt": lambda npy, emb: [*ours, str(npy), "--out", str(emb)],
        "timm": lambda npy, emb: [*timm, str(npy), str(emb)],
    }
    # warm-up: page cache, .pyc files, and the one-time ONNX Runtime CPU graph optimization (cached)
    cold = {
        name: _run(cmd(out / "warmup.npy", out / f"warmup-{name}.npy"), env)[0]
        for name, cmd in commands.items()
    }
    print(f"warm-up on 16 tiles (first run, builds caches): {cold}", flush=True)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    logs: dict[str, list[str]] = {name: [] for name in commands}
    load = [load_average()]
    for repeat in range(args.repeats):
        order = list(commands) if repeat % 2 == 0 else list(commands)[::-1]  # alternate who goes first
        for name in order:
            wall, stdout = _run(commands[name](out / "tiles.npy", out / f"emb-{name}.npy"), env)
            walls[name].append(wall)
            logs[name].append(stdout.strip().splitlines()[-1] if stdout.strip() else "")
            rate = len(tiles) / wall
            print(
                f"repeat {repeat + 1}/{args.repeats} {name:>10}: {wall:7.2f} s = {rate:6.2f} tiles/s",
                flush=True,
            )
        load.append(load_average())
    stats = {name: Stats(tuple(w)) for name, w in walls.items()}
    tps = {name: len(tiles) / s.median for name, s in stats.items()}
    best = {name: len(tiles) / s.min for name, s in stats.items()}
    ratio, best_ratio = tps["virchow-rt"] / tps["timm"], best["virchow-rt"] / best["timm"]
    agreement = compare(np.load(out / "emb-virchow-rt.npy"), np.load(out / "emb-timm.npy"), 0.99999)
    report = {
        "target": "virchow-rt embed >= 1.3x timm eager fp32 tiles/s, process start included",
        "variant": VARIANT,
        "random_weights": True,
        "warning": "RANDOM WEIGHTS: throughput is real, embeddings are not",
        "tiles": len(tiles),
        "batch": {"virchow-rt": args.batch or "default", "timm": args.timm_batch},
        "repeats": args.repeats,
        "model": str(model),
        "commands": {
            name: [_portable(arg) for arg in cmd(out / "tiles.npy", out / f"emb-{name}.npy")]
            for name, cmd in commands.items()
        },
        "wall_s": {name: s.to_dict() for name, s in stats.items()},
        "tiles_per_s_median": tps,
        "tiles_per_s_best": best,
        "ratio_median": ratio,
        "ratio_best": best_ratio,
        "passed": ratio >= 1.3,
        "same_embeddings": str(agreement),
        "warmup_wall_s": cold,
        "process_logs": logs,
        "load_average_during": load,
        "environment": collect_environment(),
    }
    (out / "embed_vs_timm.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, label in (("virchow-rt", "virchow-rt embed"), ("timm", "timm eager fp32")):
        print(f"{label:<17}: {tps[name]:6.2f} tiles/s (median of {args.repeats}, best {best[name]:.2f})")
    verdict = "PASS" if ratio >= 1.3 else "FAIL"
    print(f"ratio            : {ratio:.2f}x median, {best_ratio:.2f}x best (target >= 1.3x: {verdict})")
    print(f"same embeddings  : {agreement}")
    print(f"load average     : {load} (other processes on the machine lower both figures)")
    print(f"report           : {out / 'embed_vs_timm.json'}")


if __name__ == "__main__":
    main()
