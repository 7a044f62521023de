"""``virchow-rt serve``'s application: tile embeddings over HTTP on Ray Serve, with dynamic batching.

Each replica (one per GPU by default) opens the model once as an :class:`~virchow_rt.embed.Embedder`;
``serve.batch`` merges concurrent requests into one model batch (up to ``max_batch`` tiles or
``max_wait_ms``). The protocol is KServe v2, as Triton speaks it, so ``tritonclient.http`` works:

- ``GET /v2`` (server metadata), ``GET /v2/health/ready`` and ``/live``, ``POST /v2/repository/index``;
- ``GET /v2/models/<name>`` (metadata, with the variant, pooling, precision, random-weights flag, tile size
  and max batch as parameters), ``GET /v2/models/<name>/config`` (Triton's model configuration, as JSON),
  ``GET /v2/models/<name>/ready``, ``GET /v2/models/<name>/stats`` (batch sizes served, bytes pending,
  requests in flight); each also as ``/v2/models/<name>/versions/1/...`` (the one version);
- ``POST /v2/models/<name>/infer``: input ``tiles``, ``UINT8`` ``[N, H, W, 3]`` of any tile size (resized as
  the model wants), as JSON ``data`` or with the binary-data extension; output ``embedding`` ``FP32``, and
  the response's ``parameters`` say ``random_weights``;
- ``POST /embed``: a ``.npy`` batch or one PNG/JPEG/TIFF tile as the body (``curl --data-binary``); JSON
  back (with ``random_weights``), or ``.npy`` with ``Accept: application/x-npy`` (header
  ``Virchow-Random-Weights``).

Every refusal is a 4xx (503 with ``Retry-After`` when the replica holds ``max_pending_mb`` of request data;
408 when a body has not arrived within ``body_timeout_s``) with ``{"error": "<one line>"}``, unknown routes
included, and the replica keeps serving; a fault of the server itself is a 500 with ``{"error"}`` too. A
replica takes many requests at once (:func:`max_ongoing`), far more than one model batch, so that clients
that stall their bodies cannot hold every slot (health checks included) until their deadline. With a token
(``--token-file``), every route but the two health checks needs ``Authorization: Bearer <token>``; the
replicas hold only its sha256. FastAPI's ``/docs`` and ``/openapi.json`` are off unless ``docs=True``.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (fastapi.Request)
import asyncio
import io
import json
import math
from typing import Any

import numpy as np

from virchow_rt._version import __version__
from virchow_rt.contract import Manifest
from virchow_rt.errors import InputError, MissingDependency
from virchow_rt.serve.client import INFERENCE_HEADER
from virchow_rt.serve.guards import OPEN_ROUTES, BearerToken, CatchAll, token_digest
from virchow_rt.serve.replica import Ticket, TileEmbedderServer
from virchow_rt.serve.requests import (
    JSON_BODY_LIMIT,
    JSON_COST,
    MAX_JSON_HEADER,
    BadRequest,
    decode_cost,
    length_header,
    parse_infer,
    parse_upload,
)

#: re-exported: the guards live in serve/guards.py
__all__ = ["OPEN_ROUTES", "BearerToken", "CatchAll", "build_app", "check_limits", "token_digest"]

#: a body over this many bytes per byte of the allowed S×S tiles is refused (413): room for tiles of twice
#: the side as raw bytes, or S×S tiles as JSON text (up to 4 characters a value)
_BODY_BYTES_PER_TILE_BYTE = 16
#: the ``.npy`` answer's label (JSON answers carry ``random_weights`` in their body)
RANDOM_WEIGHTS_HEADER = "Virchow-Random-Weights"
#: the end-to-end limit Ray's proxy puts on a request (408): a backstop only, since a client may lift it with
#: Ray's ``x-request-timeout-seconds`` header; the body's own deadline (``body_timeout_s``) is the replica's
REQUEST_TIMEOUT_S = 600.0


def _serve_modules() -> tuple[Any, Any]:
    try:
        import fastapi
        from ray import serve
    except ImportError:
        raise MissingDependency("virchow-rt serve needs Ray Serve: pip install 'virchow-rt[serve]'") from None
    return serve, fastapi


def max_ongoing(max_batch: int) -> int:
    """Requests one replica takes at once (Ray Serve's ``max_ongoing_requests``): well above a model batch,
    since a request costs the replica little until its bytes arrive (and those are bounded by
    ``max_pending_mb``), and a request that stalls its body holds a slot until ``body_timeout_s``."""
    return max(256, 8 * max_batch)


def check_limits(
    max_batch: int, max_wait_ms: float, max_pending_mb: float, replicas: int | None, body_timeout_s: float
) -> None:
    """Raise a one-line :class:`InputError` for a limit the server cannot run with (before Ray starts)."""
    more = "give a finite number above 0"
    for flag, value, fine, fix in (
        ("--max-batch", max_batch, max_batch >= 1, "give 1 or more"),
        ("--replicas", replicas, replicas is None or replicas >= 1, "give 1 or more (default: one per GPU)"),
        (
            "--max-wait-ms",
            max_wait_ms,
            math.isfinite(max_wait_ms) and max_wait_ms >= 0,
            "give a finite number, 0 or more",
        ),
        ("--max-pending-mb", max_pending_mb, math.isfinite(max_pending_mb) and max_pending_mb > 0, more),
        ("--body-timeout-s", body_timeout_s, math.isfinite(body_timeout_s) and body_timeout_s > 0, more),
    ):
        if not fine:
            raise InputError(f"{flag} {value}: {fix}")


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
    body_timeout_s: float = 60.0,
) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``).

    ``token_sha256``: :func:`token_digest` of the bearer token every route but health needs (None: no
    token). ``max_pending_mb``: request data one replica holds before it answers 503. ``body_timeout_s``:
    how long a client may take to send its whole body (408 after it)."""
    check_limits(max_batch, max_wait_ms, max_pending_mb, replicas, body_timeout_s)
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
            {"error": f"{where}: {hint}; routes: GET /v2, /v2/models/{name}[/versions/1][/config|/ready|"
             f"/stats], POST /v2/models/{name}[/versions/1]/infer, POST /embed"},
            status_code=exc.status_code, headers=getattr(exc, "headers", None),
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": f"{request.method} {request.url.path}: invalid request"}, status_code=400
        )

    if token_sha256 is not None:
        app.add_middleware(BearerToken, digest=token_sha256)
    app.add_middleware(CatchAll)  # the outermost: whatever else fails is a JSON 500, not Ray's traceback

    async def read_body(request: Any, limit: int, ticket: Ticket, why: str) -> bytearray:
        """The body, refused (413) over ``limit``, counted in ``ticket`` as it arrives (not as declared: a
        declared length costs nothing until its bytes come), and refused (408) when it has not all come
        within ``body_timeout_s``. The bytearray itself is returned: a copy would double it uncounted."""
        too_large = BadRequest(f"a request body over {limit} bytes is too large{why}", 413)
        declared = length_header(request.headers.get("content-length"), "Content-Length")
        if declared is not None and declared > limit:
            raise too_large
        body = bytearray()

        async def arrive() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise too_large
                ticket.take(len(chunk))

        try:
            await asyncio.wait_for(arrive(), body_timeout_s)  # not asyncio.timeout: Python 3.10 has none
        except asyncio.TimeoutError:
            raise BadRequest(
                f"the body did not arrive within {body_timeout_s:g} s ({len(body)} bytes came); send it "
                "whole, without pauses",
                408,
            ) from None
        return body

    def body_limit(per_tile: int) -> int:
        return max_batch * per_tile * _BODY_BYTES_PER_TILE_BYTE + (1 << 20)

    binary_hint = (
        " for JSON data; send the tiles with the binary-data extension (tritonclient: binary_data=True; "
        "virchow_rt.serve.client.embed does)"
    )

    class Ingress(TileEmbedderServer):
        def refused(self, model: str, version: str) -> JSONResponse | None:
            """404 unless this is the served model and its one version, "1"."""
            if model != self.name:
                return _not_found(f"no model {model[:80]!r} here; this server serves {self.name!r}")
            if version != "1":
                return _not_found(f"no version {version[:20]!r} of {self.name!r}; its one version is '1'")
            return None

        async def answer(self, read: Any) -> Any:
            """``await read(ticket)`` -> tiles, embedded; a refusal becomes its {"error"} response. What the
            request holds (body, tiles) is counted in ``ticket`` and given back when it ends."""
            ticket = Ticket(self.pending)
            self.in_flight += 1
            try:
                tiles = await read(ticket)
                ticket.take(tiles.nbytes)
                return await self.embed(tiles)
            except BadRequest as err:
                return refuse(err)
            except InputError as err:  # the embedder's own refusal of these tiles
                return refuse(BadRequest(str(err)))
            except ClientDisconnect:
                return refuse(BadRequest("the client left before sending the whole body"))
            finally:
                ticket.release()
                self.in_flight -= 1

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
        @app.get("/v2/models/{model}/versions/{version}")
        def model_metadata(self, model: str, version: str = "1") -> Any:
            return self.refused(model, version) or self.metadata()

        @app.get("/v2/models/{model}/config")
        @app.get("/v2/models/{model}/versions/{version}/config")
        def model_config(self, model: str, version: str = "1") -> Any:
            return self.refused(model, version) or self.config()

        @app.get("/v2/models/{model}/ready")
        @app.get("/v2/models/{model}/versions/{version}/ready")
        def model_ready(self, model: str, version: str = "1") -> Any:
            return self.refused(model, version) or {"ready": True}

        @app.get("/v2/models/{model}/stats")
        @app.get("/v2/models/{model}/versions/{version}/stats")
        async def stats(self, model: str, version: str = "1") -> Any:  # on the loop, as what updates it
            sizes = [{"batch_size": size, "count": count} for size, count in sorted(self.batches.items())]
            return self.refused(model, version) or {
                "name": self.name, "batch_stats": sizes, "pending_bytes": self.pending.held,
                "requests_in_flight": self.in_flight,
            }  # fmt: skip

        @app.post("/v2/models/{model}/infer")
        @app.post("/v2/models/{model}/versions/{version}/infer")
        async def infer(self, model: str, request: fastapi.Request, version: str = "1") -> Any:
            if (refused := self.refused(model, version)) is not None:
                return refused
            binary = False

            async def read(ticket: Ticket) -> np.ndarray:
                nonlocal binary
                header = length_header(request.headers.get(INFERENCE_HEADER), INFERENCE_HEADER)
                limit = body_limit(self.info.tile_size**2 * 3)
                if header is None:  # all JSON: parsed whole, at up to JSON_COST times its size
                    body = await read_body(request, min(JSON_BODY_LIMIT, limit), ticket, binary_hint)
                    cost = JSON_COST * len(body)
                else:  # parse_infer refuses a JSON part over MAX_JSON_HEADER: counted up to that
                    body = await read_body(request, limit, ticket, f" for --max-batch {max_batch}")
                    cost = JSON_COST * min(header, MAX_JSON_HEADER, len(body))
                ticket.take(cost, f"parsing its {cost // JSON_COST} bytes of JSON takes about {JSON_COST}x")
                tiles, binary = await asyncio.to_thread(parse_infer, body, header, self.max_batch)
                ticket.give_back(cost)  # the parsed JSON is gone; the tiles are counted next
                return tiles

            embeddings = await self.answer(read)
            if isinstance(embeddings, Response):
                return embeddings
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
            async def read(ticket: Ticket) -> np.ndarray:
                limit = body_limit(self.info.tile_size**2 * 3)
                body = await read_body(request, limit, ticket, f" for --max-batch {max_batch}")
                kind = request.headers.get("content-type", "")
                cost = await asyncio.to_thread(decode_cost, body, kind)  # an image's, from its header
                ticket.take(cost, "decoding its image takes that")
                tiles = await asyncio.to_thread(parse_upload, body, kind, self.max_batch)
                ticket.give_back(cost)
                return tiles

            embeddings = await self.answer(read)
            if isinstance(embeddings, Response):
                return embeddings
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
    ongoing = max_ongoing(max_batch)
    deployment = serve.deployment(
        num_replicas=replicas or 1,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
        max_ongoing_requests=ongoing,
        # beyond it Ray Serve answers 503 itself (plain text), with the Retry-After clients wait for
        max_queued_requests=4 * ongoing,
        backpressure_config={"retry_after_s": 1},
    )(serve.ingress(app)(Ingress))
    pending_bytes = int(max_pending_mb * (1 << 20))
    return deployment.bind(
        model, backend, name, max_batch, max_wait_ms / 1000, pending_bytes, allow_engine_host_code
    )


def _not_found(reason: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": reason}, status_code=404)


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
