"""``virchow-rt serve``'s application: tile embeddings over HTTP on Ray Serve, with dynamic batching.

Each replica (one per GPU by default) opens the model once as an :class:`~virchow_rt.embed.Embedder`;
``serve.batch`` merges concurrent requests into one model batch (up to ``max_batch`` tiles or
``max_wait_ms``). The protocol is KServe v2, as Triton speaks it, so ``tritonclient.http`` works:

- ``GET /v2`` (server metadata), ``GET /v2/health/ready`` and ``/live``, ``POST /v2/repository/index``;
- ``GET /v2/models/<name>`` (metadata, with the variant, pooling, precision, random-weights flag, tile size
  and max batch as parameters), ``GET /v2/models/<name>/config`` (Triton's model configuration, as JSON),
  ``GET /v2/models/<name>/ready``, ``GET /v2/models/<name>/stats`` (batch sizes served, bytes pending);
- ``POST /v2/models/<name>/infer``: input ``tiles``, ``UINT8`` ``[N, H, W, 3]`` of any tile size (resized as
  the model wants), as JSON ``data`` or with the binary-data extension; output ``embedding`` ``FP32``, and
  the response's ``parameters`` say ``random_weights``;
- ``POST /embed``: a ``.npy`` batch or one PNG/JPEG/TIFF tile as the body (``curl --data-binary``); JSON
  back (with ``random_weights``), or ``.npy`` with ``Accept: application/x-npy`` (header
  ``Virchow-Random-Weights``).

Every refusal is a 4xx (503 with ``Retry-After`` when the replica holds ``max_pending_mb`` of request data)
with ``{"error": "<one line>"}``, unknown routes included, and the replica keeps serving. With a token
(``--token-file``), every route but the two health checks needs ``Authorization: Bearer <token>``; the
replicas hold only its sha256. FastAPI's ``/docs`` and ``/openapi.json`` are off unless ``docs=True``.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (fastapi.Request)
import hashlib
import hmac
import io
import json
from typing import Any

import numpy as np

from virchow_rt._version import __version__
from virchow_rt.contract import Manifest
from virchow_rt.errors import InputError, MissingDependency
from virchow_rt.serve.client import INFERENCE_HEADER
from virchow_rt.serve.replica import Ticket, TileEmbedderServer
from virchow_rt.serve.requests import BadRequest, parse_infer, parse_upload

#: a body over this many bytes per byte of the allowed S×S tiles is refused (413): room for tiles of twice
#: the side as raw bytes, or S×S tiles as JSON text (up to 4 characters a value)
_BODY_BYTES_PER_TILE_BYTE = 16
#: routes answered without a token: what load balancers and orchestrators probe
OPEN_ROUTES = ("/v2/health/ready", "/v2/health/live")
#: the ``.npy`` answer's label (JSON answers carry ``random_weights`` in their body)
RANDOM_WEIGHTS_HEADER = "Virchow-Random-Weights"


def _serve_modules() -> tuple[Any, Any]:
    try:
        import fastapi
        from ray import serve
    except ImportError:
        raise MissingDependency("virchow-rt serve needs Ray Serve: pip install 'virchow-rt[serve]'") from None
    return serve, fastapi


def token_digest(token: str) -> str:
    """The sha256 of a bearer token: what replicas hold and compare (in constant time)."""
    return hashlib.sha256(token.encode()).hexdigest()


def build_app(
    model: str,
    *,
    name: str | None = None,
    backend: str = "auto",
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    replicas: int | None = None,
    gpus_per_replica: float | None = None,
    max_pending_mb: float = 1024.0,
    token_sha256: str | None = None,
    docs: bool = False,
    allow_engine_host_code: bool = False,
) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``).

    ``token_sha256``: :func:`token_digest` of the bearer token every route but health needs (None: no
    token). ``max_pending_mb``: request data one replica holds before it answers 503."""
    serve, fastapi = _serve_modules()
    import ray
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    name = name or _model_name(model, _manifest(model))
    off = {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = fastapi.FastAPI(title="virchow-rt", **({} if docs else off))

    def refuse(err: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)  # unknown routes and methods: {"error"}, not FastAPI's {"detail"}
    async def http_error(request: fastapi.Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        hint = {404: "no such route", 405: "method not allowed here"}.get(exc.status_code, exc.detail)
        return JSONResponse(
            {"error": f"{where}: {hint}; routes: GET /v2, /v2/models/{name}[/config|/ready|/stats], "
             f"POST /v2/models/{name}/infer, POST /embed"},
            status_code=exc.status_code, headers=getattr(exc, "headers", None),
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": f"{request.method} {request.url.path}: invalid request"}, status_code=400
        )

    if token_sha256 is not None:
        app.add_middleware(BearerToken, digest=token_sha256)

    async def read_body(request: Any, per_tile: int, ticket: Ticket) -> bytes:
        limit = max_batch * per_tile * _BODY_BYTES_PER_TILE_BYTE + (1 << 20)
        too_large = BadRequest(
            f"a request body over {limit} bytes is too large for --max-batch {max_batch}", 413
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(f"Content-Length {declared[:40]!r} is not a number")
            if int(declared) > limit:
                raise too_large
            ticket.take(int(declared))  # held from now: bodies in flight count
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no Content-Length: count as it comes
            body += chunk
            if len(body) > limit:
                raise too_large
            if len(body) > ticket.taken:
                ticket.take(len(body) - ticket.taken)
        return bytes(body)

    class Ingress(TileEmbedderServer):
        @app.get("/v2")
        def server_metadata(self) -> dict[str, Any]:
            return {"name": "virchow-rt", "version": __version__, "extensions": ["binary_tensor_data"]}

        @app.get("/v2/health/ready")
        def ready(self) -> dict[str, bool]:
            return {"ready": True}

        @app.get("/v2/health/live")
        def live(self) -> dict[str, bool]:
            return {"live": True}

        @app.post("/v2/repository/index")
        def index(self) -> list[dict[str, str]]:
            return [{"name": self.name, "version": "1", "state": "READY"}]

        @app.get("/v2/models/{model}")
        def model_metadata(self, model: str) -> Any:
            return self.metadata() if model == self.name else _unknown(model, self.name)

        @app.get("/v2/models/{model}/config")
        def model_config(self, model: str) -> Any:
            return self.config() if model == self.name else _unknown(model, self.name)

        @app.get("/v2/models/{model}/ready")
        def model_ready(self, model: str) -> Any:
            return {"ready": True} if model == self.name else _unknown(model, self.name)

        @app.get("/v2/models/{model}/stats")
        async def stats(self, model: str) -> Any:  # on the event loop, as the batches that update it
            if model != self.name:
                return _unknown(model, self.name)
            sizes = [{"batch_size": size, "count": count} for size, count in sorted(self.batches.items())]
            return {"name": self.name, "batch_stats": sizes, "pending_bytes": self.pending.held}

        @app.post("/v2/models/{model}/infer")
        async def infer(self, model: str, request: fastapi.Request) -> Any:
            if model != self.name:
                return _unknown(model, self.name)
            s = self.info.tile_size
            ticket = Ticket(self.pending)
            try:
                body = await read_body(request, s * s * 3, ticket)
                header = request.headers.get(INFERENCE_HEADER)
                if header is not None and not header.isdigit():
                    raise BadRequest(f"{INFERENCE_HEADER} {header[:40]!r} is not a number")
                tiles, binary = parse_infer(body, int(header) if header else None, self.max_batch)
                ticket.take(tiles.nbytes)
                embeddings = await self.embed(tiles)
            except BadRequest as err:
                return refuse(err)
            except InputError as err:  # the embedder's own refusal of these tiles
                return refuse(BadRequest(str(err)))
            except ClientDisconnect:
                return refuse(BadRequest("the client left before sending the whole body"))
            finally:
                ticket.release()
            out: dict[str, Any] = {"name": "embedding", "datatype": "FP32", "shape": list(embeddings.shape)}
            reply: dict[str, Any] = {
                "model_name": self.name, "model_version": "1", "outputs": [out],
                "parameters": {"random_weights": bool(self.info.random_weights)},
            }  # fmt: skip
            if not binary:
                out["data"] = embeddings.ravel().tolist()
                return reply
            raw = np.ascontiguousarray(embeddings, dtype="<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            head = json.dumps(reply).encode()
            return Response(
                head + raw, media_type="application/octet-stream", headers={INFERENCE_HEADER: str(len(head))}
            )

        @app.post("/embed")
        async def upload(self, request: fastapi.Request) -> Any:
            s = self.info.tile_size
            ticket = Ticket(self.pending)
            try:
                body = await read_body(request, s * s * 3, ticket)
                tiles = parse_upload(body, request.headers.get("content-type", ""), self.max_batch)
                ticket.take(tiles.nbytes)
                embeddings = await self.embed(tiles)
            except BadRequest as err:
                return refuse(err)
            except InputError as err:
                return refuse(BadRequest(str(err)))
            except ClientDisconnect:
                return refuse(BadRequest("the client left before sending the whole body"))
            finally:
                ticket.release()
            random = bool(self.info.random_weights)
            if "application/x-npy" in request.headers.get("accept", ""):
                buffer = io.BytesIO()
                np.save(buffer, embeddings)
                label = {RANDOM_WEIGHTS_HEADER: str(random).lower()}
                return Response(buffer.getvalue(), media_type="application/x-npy", headers=label)
            return {
                "model": self.name, "random_weights": random, "shape": list(embeddings.shape),
                "embeddings": embeddings.tolist(),
            }  # fmt: skip

    Ingress._embed_batch = serve.batch(
        max_batch_size=max_batch,
        batch_wait_timeout_s=max_wait_ms / 1000,
        batch_size_fn=lambda requests: sum(len(tiles) for tiles in requests),  # tiles, not requests
    )(  # type: ignore[method-assign]
        TileEmbedderServer._embed_batch
    )
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0.0
    ongoing = max(16, 2 * max_batch)
    deployment = serve.deployment(
        num_replicas=replicas or 1,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
        max_ongoing_requests=ongoing,
        max_queued_requests=4 * ongoing,  # beyond it Ray Serve answers 503 itself: no unbounded queue
    )(serve.ingress(app)(Ingress))
    pending_bytes = int(max_pending_mb * (1 << 20))
    return deployment.bind(
        model, backend, name, max_batch, max_wait_ms / 1000, pending_bytes, allow_engine_host_code
    )


class BearerToken:
    """ASGI middleware: every route but :data:`OPEN_ROUTES` needs ``Authorization: Bearer <token>``.

    Holds only the token's sha256 and compares digests in constant time (``hmac.compare_digest``)."""

    def __init__(self, app: Any, digest: str) -> None:
        self.app, self.digest = app, digest

    def allowed(self, scope: dict[str, Any]) -> bool:
        if scope["path"] in OPEN_ROUTES:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = given.partition(" ")
        presented = token_digest(credential.strip()) if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(presented.encode(), self.digest.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        refused = JSONResponse(
            {"error": "this server needs a token: send the header 'Authorization: Bearer <token>'"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refused(scope, receive, send)


def _unknown(model: str, served: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": f"no model {model[:80]!r} here; this server serves {served!r}"}, status_code=404
    )


def _manifest(model: str) -> Manifest | None:
    """The export's manifest, or None for a model file without one."""
    from virchow_rt.errors import ModelFileError

    try:
        return Manifest.read(model)
    except ModelFileError:
        return None


def _model_name(model: str, manifest: Manifest | None) -> str:
    """The variant, or for a bare model file without a manifest its file name."""
    if manifest is not None and manifest.variant:
        return manifest.variant
    from pathlib import Path

    return Path(model).name.split(".")[0]
