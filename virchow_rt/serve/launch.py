"""``virchow-rt serve``'s body: check what was asked (the port first), start Ray here, serve, stop cleanly.

Ray is started here, as a new local instance (``ray.init(address="local")``), never joined: a cluster
started on this machine by ``ray start --head`` (or by someone else) would otherwise be joined silently, its
Serve instance's port and apps used. To serve on a Ray cluster, say so with ``RAY_ADDRESS``.

The port is checked before Ray starts (a busy port is one line, not Ray's traceback). The default port,
:data:`DEFAULT_PORT`, is not Triton's: Triton listens on 8000 (HTTP), 8001 (gRPC) and 8002 (metrics), and
Ray Serve's own default is 8000 too, so a host that also runs Triton, or another Ray Serve app, keeps its
ports. Ray's console noise that reads as a fault is kept off the console; see :func:`run_server`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import sys
import warnings
from pathlib import Path

from virchow_rt.errors import BackendError, InputError, VirchowError
from virchow_rt.paths import check_name

#: 8100: clear of Triton (8000-8002), Ray Serve's default (8000), Ray's dashboard (8265) and client (10001)
DEFAULT_PORT = 8100
APP_NAME = "virchow-rt"
_MIN_TOKEN = 16


def check_port(host: str, port: int) -> None:
    """Raise a one-line :class:`InputError` unless this process could listen on ``host:port`` now."""
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: give a port from 1 to 65535 (default {DEFAULT_PORT})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as err:
        raise InputError(
            f"--host {host}: not an address ({err}); give 127.0.0.1 (this machine only), an address of this "
            "machine, or 0.0.0.0 (every interface)"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise InputError(
                    f"port {port} on {host} is in use by another program (another virchow-rt serve? Triton "
                    f"takes 8000-8002); give a free one with --port (default {DEFAULT_PORT})"
                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise InputError(
                    f"--host {host} is not an address of this machine; give 127.0.0.1, one of its addresses, "
                    "or 0.0.0.0"
                ) from None
            if err.errno == errno.EACCES:
                raise InputError(
                    f"port {port} needs administrator rights (ports below 1024); give --port {DEFAULT_PORT}"
                ) from None
            raise InputError(f"cannot listen on {host}:{port} ({err.strerror})") from None


def read_token(path: str | os.PathLike[str]) -> str:
    """The bearer token in ``path`` (one line, surrounding whitespace dropped), checked."""
    path = Path(path)
    try:
        token = path.read_text().strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"--token-file {path}: cannot read it ({err}); give a file holding one token"
        ) from None
    make = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE"
    # ASCII only: HTTP headers arrive as latin-1 bytes, so a token of other characters could never match
    if len(token) < _MIN_TOKEN or any(not (c.isascii() and c.isprintable()) or c.isspace() for c in token):
        raise InputError(
            f"--token-file {path}: give one line of at least {_MIN_TOKEN} printable ASCII characters without "
            f"spaces, e.g. {make}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"--token-file {path} can be read by other users; chmod 600 it", stacklevel=2)
    return token


class _DropLine(logging.Filter):
    """Drops Ray Serve's "New http_options/controller_options will not be applied": ``serve.run`` logs it
    on every start because ``serve.start`` already applied them (the port given is the port served)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in str(record.msg)


def _why_replicas_failed(model: str, backend: str, host_code: bool, err: Exception) -> Exception:
    """The one-line reason the replicas could not start: the model opened here, as a replica opens it."""
    import ray

    from virchow_rt.backends import open_backend

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the RANDOM WEIGHTS line was shown already, or will be
            open_backend(model, backend, allow_engine_host_code=host_code).close()
    except VirchowError as cause:
        return cause
    context = ray.get_runtime_context()  # this Ray's session, not /tmp/ray/session_latest (maybe another's)
    logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs" / "serve"
    return BackendError(f"the model's replicas failed to start ({err}); Ray's logs: {logs}/")


def start_ray() -> None:
    """A new local Ray instance for this server (never one already running here), unless ``RAY_ADDRESS``
    names a cluster to join."""
    import ray

    joined = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=None if joined else "local",
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def run_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    name: str | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    replicas: int | None = None,
    backend: str = "auto",
    max_pending_mb: float = 1024.0,
    token_file: str | None = None,
    docs: bool = False,
    allow_engine_host_code: bool = False,
    body_timeout_s: float = 60.0,
) -> int:
    """``virchow-rt serve``: start Ray here, serve until Ctrl-C or SIGTERM, then drain and stop."""
    import signal
    import threading

    from virchow_rt.serve.http import (
        REQUEST_TIMEOUT_S,
        _manifest,
        _model_name,
        _serve_modules,
        build_app,
        check_limits,
        token_digest,
    )

    check_limits(max_batch, max_wait_ms, max_pending_mb, replicas, body_timeout_s)
    if not Path(model).exists():
        raise InputError(f"{model} does not exist; give an export folder, an .onnx or an .engine")
    digest = token_digest(read_token(token_file)) if token_file else None
    check_port(host, port)
    manifest = _manifest(str(model))
    name = check_name(name or _model_name(str(model), manifest), "--name")
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        # a new local Ray: token authentication on, as Ray's own default, but said before Ray reads its
        # settings (at import), so that Ray does not warn about it on every start
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    serve, _ = _serve_modules()
    import ray

    start_ray()
    logging.getLogger("ray.serve").addFilter(_DropLine())
    stop = threading.Event()
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
        app = build_app(
            str(model), name=name, backend=backend, max_batch=max_batch, max_wait_ms=max_wait_ms,
            replicas=replicas or max(1, gpus), max_pending_mb=max_pending_mb, token_sha256=digest, docs=docs,
            allow_engine_host_code=allow_engine_host_code, body_timeout_s=body_timeout_s,
        )  # fmt: skip
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # Ray says only that the deployment failed: find out why, here
            raise _why_replicas_failed(str(model), backend, allow_engine_host_code, err) from None
        if manifest is not None and manifest.weights is not None and manifest.weights.random:
            from virchow_rt.errors import warn_random_weights  # the replicas' own warnings are not shown here

            warn_random_weights(
                f"{manifest.variant} has random weights; every answer is labelled random_weights"
            )
        guarded = "; every request but health needs its token" if digest else ""
        url = f"http://{host}:{port}/v2/models/{name}"
        print(f"serving {name} at {url} (and POST /embed){guarded}; Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        print("stopping: finishing the requests in flight", flush=True)
        # the replicas drain their requests; then Ray stops (serve.shutdown() would also ask the controller
        # to stop itself while Ray kills it, which prints a coloured raylet error on every stop)
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    return 0
