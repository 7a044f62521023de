"""``virchow-rt serve``: embeddings over HTTP (KServe v2, as Triton speaks it) on Ray Serve."""

from __future__ import annotations

import argparse

from virchow_rt.cli.common import Help, add_backend


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        formatter_class=Help,
        help="serve embeddings over HTTP (KServe v2 as Triton speaks it, and POST /embed) on Ray Serve",
    )
    p.add_argument("model", help="exported model: an export folder, an .onnx or a TensorRT .engine")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--name", default=None, help="the model's name in URLs (default: the variant)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="tiles in one request, and in one merged model call, at most",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others")
    p.add_argument("--replicas", type=int, default=None, help="model replicas (default: one per GPU, else 1)")
    add_backend(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from virchow_rt.serve.http import run_server

    return run_server(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        replicas=args.replicas,
        backend=args.backend,
    )
