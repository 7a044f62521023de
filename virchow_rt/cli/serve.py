"""``virchow-rt serve``: embeddings over HTTP (KServe v2, as Triton speaks it) on Ray Serve."""

from __future__ import annotations

import argparse

from virchow_rt.cli.common import Help, add_backend, add_engine_host_code

EPILOG = """\
routes: GET /v2, /v2/health/ready, /v2/models/NAME, /v2/models/NAME/config, /v2/models/NAME/stats;
POST /v2/models/NAME/infer (KServe v2: tritonclient.http or virchow_rt.serve.client.embed; tiles of any
size, resized here); POST /embed: a .npy batch or one PNG/JPEG tile as the body
(curl --data-binary @tile.png URL/embed), JSON back, or .npy with 'Accept: application/x-npy'.
Security: the server has no TLS. Keep the default --host 127.0.0.1, or bind a private network's address
and put a TLS proxy in front; with --host 0.0.0.0 give --token-file. --host is the HTTP port's only: Ray's
own ports listen on every interface (see the README's security notes).
Ray: a new local Ray instance is started (never one already running here is joined); set RAY_ADDRESS to
serve on a Ray cluster.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from virchow_rt.serve.launch import DEFAULT_PORT

    p = sub.add_parser(
        "serve",
        formatter_class=Help,
        help="serve embeddings over HTTP (KServe v2 as Triton speaks it, and POST /embed) on Ray Serve",
        epilog=EPILOG,
    )
    p.add_argument("model", help="exported model: an export folder, an .onnx or a TensorRT .engine")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 (every interface) only on a private network, with --token-file",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="HTTP port, clear of Triton's 8000-8002 and Ray Serve's 8000",
    )
    p.add_argument("--name", default=None, help="the model's name in URLs (default: the variant)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="tiles in one request, and in one merged model call, at most",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others")
    p.add_argument("--replicas", type=int, default=None, help="model replicas (default: one per GPU, else 1)")
    p.add_argument(
        "--max-pending-mb",
        type=float,
        default=1024.0,
        help="request data (bodies, decoded tiles) one replica holds at once; beyond it: 503 + Retry-After",
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=60.0,
        help="seconds a client has to send a request's whole body; then 408 and its slot is freed",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="a file holding a bearer token: every route but /v2/health/* then needs "
        "'Authorization: Bearer <token>' (401 otherwise)",
    )
    p.add_argument(
        "--docs", action="store_true", help="serve FastAPI's /docs and /openapi.json (off by default)"
    )
    add_backend(p)
    add_engine_host_code(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from virchow_rt.serve.launch import run_server

    return run_server(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        replicas=args.replicas,
        backend=args.backend,
        max_pending_mb=args.max_pending_mb,
        token_file=args.token_file,
        docs=args.docs,
        allow_engine_host_code=args.allow_engine_host_code,
        body_timeout_s=args.body_timeout_s,
    )
