"""``virchow-rt serve`` under load: tiles/s and p50/p99 latency at 1, 4 and 16 concurrent clients sending
1 or 8 tiles per request, against the in-process ``Embedder`` on the same tiles.

Exports a variant (default: the mini, RANDOM WEIGHTS, fp32 ONNX; cached under ``--out``), starts the
server in this process (a local Ray instance, one replica, ``--max-batch`` 64, ``--max-wait-ms`` 5) and
runs each configuration for ``--requests`` requests per client, after one warm-up request per client.
Clients are threads calling :func:`virchow_rt.serve.client.embed` (binary KServe v2 over HTTP). The baseline
is ``Embedder.embed`` here on requests of the same size, one after another (latency), and on all tiles
at once (throughput).

    python bench/serve_throughput.py [--variant virchow2g-mini] [--requests 4]

Writes ``--out/serve_throughput.json``; the environment is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
from slides_throughput import _model

from virchow_rt.benchmark.environment import collect_environment
from virchow_rt.embed import Embedder
from virchow_rt.files import write_json
from virchow_rt.serve import client
from virchow_rt.tissue import tissue_tiles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(url: str, clients: int, per_request: int, requests: int, tiles: np.ndarray) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        batch = np.roll(tiles, k, axis=0)[:per_request]
        client.embed(url, batch)  # warm-up
        for _ in range(requests):
            t0 = time.perf_counter()
            client.embed(url, batch)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = clients * (requests + 1) * per_request  # the warm-ups ran in the same window
    ms = np.array(latencies) * 1000
    return {
        "tiles_per_s": done / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="virchow2g-mini")
    p.add_argument("--out", type=Path, default=Path("out/bench/serve"))
    p.add_argument("--requests", type=int, default=4, help="timed requests per client")
    args = p.parse_args(argv)
    import ray
    from ray import serve

    from virchow_rt.serve.http import build_app

    args.out.mkdir(parents=True, exist_ok=True)
    model = _model(args.variant, args.out / "model")
    tiles = tissue_tiles(32, 224, seed=0)

    baseline = {}
    with Embedder(model) as embedder:
        embedder.embed(tiles[:8])  # warm-up
        for n in (1, 8):
            times = []
            for _ in range(args.requests * 2):
                t0 = time.perf_counter()
                embedder.embed(tiles[:n])
                times.append(time.perf_counter() - t0)
            ms = np.array(times) * 1000
            baseline[f"{n}_tiles"] = {
                "p50_ms": float(np.percentile(ms, 50)),
                "tiles_per_s": n / np.median(times),
            }
        t0 = time.perf_counter()
        embedder.embed(tiles)
        baseline["all_at_once_tiles_per_s"] = len(tiles) / (time.perf_counter() - t0)
    print(f"in-process Embedder: {baseline}", flush=True)

    port = _free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(model), max_batch=64, max_wait_ms=5), name="bench", route_prefix="/")
        url = f"127.0.0.1:{port}"
        for per_request in (1, 8):
            for clients in (1, 4, 16):
                row = {"clients": clients, "tiles_per_request": per_request}
                row.update(_load(url, clients, per_request, args.requests, tiles))
                rows.append(row)
                print(
                    f"{clients:2d} clients x {per_request} tiles/request: {row['tiles_per_s']:7.1f} tiles/s, "
                    f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "what": f"virchow-rt serve, {args.variant} (RANDOM WEIGHTS) fp32 ONNX, one replica, max batch 64, "
        "max wait 5 ms; clients are threads on the same machine",
        "model": str(model),
        "embedder": baseline,
        "rows": rows,
        "environment": collect_environment(),
    }
    write_json(args.out / "serve_throughput.json", result)
    print(f"wrote {args.out / 'serve_throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
