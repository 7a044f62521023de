"""``virchow-rt serve``: tile embeddings over HTTP on Ray Serve, with dynamic batching.

Each replica (one per GPU by default) opens the model once as an :class:`~virchow_rt.embed.Embedder`;
``serve.batch`` merges concurrent requests into one model batch (up to ``--max-batch`` requests or
``--max-wait-ms``). The protocol is KServe v2, as Triton speaks it, so ``tritonclient.http`` works:

- ``GET /v2/health/ready``, ``GET /v2/models/<name>`` (metadata, with the variant, pooling, precision and
  random-weights flag as parameters), ``GET /v2/models/<name>/stats`` (batch sizes served);
- ``POST /v2/models/<name>/infer``: input ``tiles``, ``UINT8`` ``[N, H, W, 3]`` (resized as the model
  wants when not S×S), as JSON ``data`` or with the binary-data extension; output ``embedding`` ``FP32``.
- ``POST /embed``: a ``.npy`` batch or a PNG/JPEG tile as the body, for ``curl``; JSON back, or ``.npy``
  with ``Accept: application/x-npy``.

A bad request gets a 4xx with ``{"error": "<one line>"}`` and the replica keeps serving.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (fastapi.Request)
import asyncio
import io
import json
from collections import Counter
from typing import Any

import numpy as np

from virchow_rt.contract import Manifest
from virchow_rt.errors import InputError, MissingDependency, warn_random_weights
from virchow_rt.serve.client import INFERENCE_HEADER

#: a body over this many bytes per byte of the allowed S×S tiles is refused (413): room for tiles of twice
#: the side as raw bytes, or S×S tiles as JSON text (up to 4 characters a value)
_BODY_BYTES_PER_TILE_BYTE = 16


def _serve_modules() -> tuple[Any, Any]:
    try:
        import fastapi
        from ray import serve
    except ImportError:
        raise MissingDependency("virchow-rt serve needs Ray Serve: pip install 'virchow-rt[serve]'") from None
    return serve, fastapi


class BadRequest(InputError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_infer(
    body: bytes, header_length: int | None, tile_size: int, max_tiles: int
) -> tuple[np.ndarray, bool]:
    """A KServe v2 infer request -> (uint8 tiles, whether the answer should be binary)."""
    try:
        head = json.loads(body[:header_length] if header_length is not None else body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request is not KServe v2 JSON ({err})") from None
    inputs = head.get("inputs") if isinstance(head, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest('give exactly one input, "tiles": UINT8 [N, H, W, 3]')
    spec = inputs[0]
    shape, dtype = spec.get("shape"), spec.get("datatype")
    if dtype != "UINT8":
        raise BadRequest(f"input datatype {dtype}: tiles are UINT8 [N, H, W, 3] (RGB bytes)")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and shape[3] == 3
        and all(isinstance(v, int) for v in shape)
    ):
        raise BadRequest(f"input shape {shape}: tiles are [N, H, W, 3]")
    count = shape[0]
    if count < 1 or count > max_tiles:
        raise BadRequest(f"{count} tiles in one request: send 1 to {max_tiles} (the server's --max-batch)")
    if min(shape[1:3]) < 1:
        raise BadRequest(f"input shape {shape}: tiles have no pixels")
    size = int(np.prod(shape))
    binary = _params(spec).get("binary_data_size")
    if binary is not None:
        if header_length is None:
            raise BadRequest(f"binary_data_size without the {INFERENCE_HEADER} header")
        raw = body[header_length:]
        if len(raw) != binary or binary != size:
            raise BadRequest(f"binary input of {len(raw)} bytes for shape {shape} ({size} bytes expected)")
        tiles = np.frombuffer(raw, np.uint8).reshape(shape)
    else:
        data = spec.get("data")
        try:
            tiles = np.asarray(data, dtype=np.int64).reshape(shape)
        except (TypeError, ValueError):
            raise BadRequest(f"input data does not hold {size} integers for shape {shape}") from None
        if tiles.size and (tiles.min() < 0 or tiles.max() > 255):
            raise BadRequest("input data out of the UINT8 range 0..255")
        tiles = tiles.astype(np.uint8)
    outputs = head.get("outputs") if isinstance(head.get("outputs"), list) else []
    binary_out = bool(_params(head).get("binary_data_output")) or any(
        _params(o).get("binary_data") for o in outputs if isinstance(o, dict)
    )
    return np.ascontiguousarray(tiles), binary_out


def _params(part: dict[str, Any]) -> dict[str, Any]:
    """A request part's ``parameters`` (an empty dict when missing or not an object)."""
    params = part.get("parameters")
    return params if isinstance(params, dict) else {}


def parse_upload(body: bytes) -> np.ndarray:
    """The ``/embed`` body: a ``.npy`` uint8 batch (N, H, W, 3) or one image file -> uint8 tiles."""
    if body.startswith(b"\x93NUMPY"):
        try:
            tiles = np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as err:
            raise BadRequest(f"the .npy body cannot be read ({err})") from None
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
            raise BadRequest(f".npy of {tiles.dtype} {tiles.shape}: send uint8 (N, H, W, 3) RGB tiles")
        return np.ascontiguousarray(tiles)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body)) as image:
            return np.asarray(image.convert("RGB"))[None]
    except Image.DecompressionBombError as err:
        raise BadRequest(f"the image is too large to be a tile ({err})", 413) from None
    except (UnidentifiedImageError, OSError) as err:
        raise BadRequest(f"the body is neither a .npy batch nor an image file ({err})") from None


class TileEmbedderServer:
    """One replica: the model opened once; requests merged into batches by ``serve.batch``."""

    def __init__(self, model: str, backend: str, name: str, max_batch: int, max_wait_s: float):
        from virchow_rt.embed import Embedder

        self.embedder = Embedder(model, backend=backend)
        self.info = self.embedder.info
        self.name = name
        self.max_batch = max_batch
        self.batches: Counter[int] = Counter()  # tiles per model call -> how many calls

    def metadata(self) -> dict[str, Any]:
        info = self.info
        s = info.tile_size
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": f"virchow-rt/{self.embedder.backend.name}",
            "inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [-1, s, s, 3]}],
            "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": [-1, self.embedder.embedding_dim()]}
            ],
            "parameters": {
                "variant": info.variant,
                "pooling": info.pooling,
                "precision": info.precision,
                "random_weights": bool(info.random_weights),
                "max_batch": self.max_batch,
            },
        }

    async def embed(self, tiles: np.ndarray) -> np.ndarray:
        answer = await self._embed_batch(tiles)
        if isinstance(answer, Exception):  # this request's own failure, not its batch-mates'
            raise answer
        return answer  # type: ignore[no-any-return]

    async def _embed_batch(self, requests: list[np.ndarray]) -> list[np.ndarray | Exception]:
        """Requests of one tile size go through the model together; the answer is split back.

        A group that fails answers each of its requests with the exception (``serve.batch`` would fail
        every request of the batch with one raised here)."""
        answers: list[np.ndarray | Exception | None] = [None] * len(requests)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, tiles in enumerate(requests):
            by_size.setdefault(tiles.shape[1:], []).append(i)
        for members in by_size.values():
            merged = np.concatenate([requests[i] for i in members])
            self.batches[len(merged)] += 1
            try:
                out = await asyncio.to_thread(self.embedder.embed, merged)
            except Exception as err:  # noqa: BLE001 - handed to each request of the group
                for i in members:
                    answers[i] = err
                continue
            bounds = np.cumsum([0] + [len(requests[i]) for i in members])
            for k, i in enumerate(members):
                answers[i] = out[bounds[k] : bounds[k + 1]]
        return answers  # type: ignore[return-value]


def build_app(
    model: str,
    *,
    name: str | None = None,
    backend: str = "auto",
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    replicas: int | None = None,
    gpus_per_replica: float | None = None,
) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``)."""
    serve, fastapi = _serve_modules()
    import ray
    from fastapi.responses import JSONResponse, Response

    name = name or _model_name(model, _manifest(model))
    app = fastapi.FastAPI(title="virchow-rt")

    def refuse(err: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    async def read_body(request: Any, per_tile: int) -> bytes:
        limit = max_batch * per_tile * _BODY_BYTES_PER_TILE_BYTE + (1 << 20)
        too_large = BadRequest(
            f"a request body over {limit} bytes is too large for --max-batch {max_batch}", 413
        )
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise (
                too_large
                if declared.isdigit()
                else BadRequest(f"Content-Length {declared!r} is not a number")
            )
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no Content-Length: count as it comes
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    class Ingress(TileEmbedderServer):
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

        @app.get("/v2/models/{model}/ready")
        def model_ready(self, model: str) -> Any:
            return {"ready": True} if model == self.name else _unknown(model, self.name)

        @app.get("/v2/models/{model}/stats")
        async def stats(self, model: str) -> Any:  # on the event loop, as the batches that update it
            if model != self.name:
                return _unknown(model, self.name)
            sizes = [{"batch_size": size, "count": count} for size, count in sorted(self.batches.items())]
            return {"name": self.name, "batch_stats": sizes}

        @app.post("/v2/models/{model}/infer")
        async def infer(self, model: str, request: fastapi.Request) -> Any:
            if model != self.name:
                return _unknown(model, self.name)
            s = self.info.tile_size
            try:
                body = await read_body(request, s * s * 3)
                header = request.headers.get(INFERENCE_HEADER)
                if header is not None and not header.isdigit():
                    raise BadRequest(f"{INFERENCE_HEADER} {header!r} is not a number")
                tiles, binary = parse_infer(body, int(header) if header else None, s, self.max_batch)
                embeddings = await self.embed(tiles)
            except BadRequest as err:
                return refuse(err)
            except InputError as err:  # the embedder's own refusal of these tiles
                return refuse(BadRequest(str(err)))
            out: dict[str, Any] = {"name": "embedding", "datatype": "FP32", "shape": list(embeddings.shape)}
            reply: dict[str, Any] = {"model_name": self.name, "model_version": "1", "outputs": [out]}
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
            try:
                tiles = parse_upload(await read_body(request, s * s * 3))
                if len(tiles) > self.max_batch:
                    raise BadRequest(f"{len(tiles)} tiles in one request: send 1 to {self.max_batch}")
                if len(tiles) == 0:
                    raise BadRequest("0 tiles in the .npy: send 1 or more")
                embeddings = await self.embed(tiles)
            except BadRequest as err:
                return refuse(err)
            except InputError as err:
                return refuse(BadRequest(str(err)))
            if "application/x-npy" in request.headers.get("accept", ""):
                buffer = io.BytesIO()
                np.save(buffer, embeddings)
                return Response(buffer.getvalue(), media_type="application/x-npy")
            return {"model": self.name, "shape": list(embeddings.shape), "embeddings": embeddings.tolist()}

    Ingress._embed_batch = serve.batch(
        max_batch_size=max_batch,
        batch_wait_timeout_s=max_wait_ms / 1000,
        batch_size_fn=lambda requests: sum(len(tiles) for tiles in requests),  # tiles, not requests
    )(  # type: ignore[method-assign]
        TileEmbedderServer._embed_batch
    )
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0.0
    deployment = serve.deployment(
        num_replicas=replicas or 1,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
        max_ongoing_requests=max(16, 2 * max_batch),
    )(serve.ingress(app)(Ingress))
    return deployment.bind(model, backend, name, max_batch, max_wait_ms / 1000)


def _unknown(model: str, served: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"no model {model!r} here; this server serves {served!r}"}, status_code=404)


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


def run_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    replicas: int | None = None,
    backend: str = "auto",
) -> int:
    """``virchow-rt serve``: start Ray here, serve until Ctrl-C or SIGTERM, then drain and stop."""
    import signal
    import threading
    from pathlib import Path

    serve, _ = _serve_modules()
    import ray

    if max_batch < 1 or max_wait_ms < 0:
        raise InputError(
            f"--max-batch {max_batch} --max-wait-ms {max_wait_ms}: give 1 or more, and 0 or more"
        )
    if not Path(model).exists():
        raise InputError(f"{model} does not exist; give an export folder, an .onnx or an .engine")
    manifest = _manifest(str(model))
    name = name or _model_name(str(model), manifest)
    ray.init(include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        serve.start(http_options={"host": host, "port": port})
        app = build_app(
            str(model), name=name, backend=backend, max_batch=max_batch, max_wait_ms=max_wait_ms,
            replicas=replicas or max(1, gpus),
        )  # fmt: skip
        serve.run(app, name="virchow-rt", route_prefix="/")
        # the replicas' own warnings are not shown on this console
        if manifest is not None and manifest.weights is not None and manifest.weights.random:
            warn_random_weights(
                f"{manifest.variant} has random weights; every answer is labelled random_weights"
            )
        print(f"serving {name} at http://{host}:{port}/v2/models/{name} (and POST /embed); Ctrl-C stops")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        print("stopping: finishing the requests in flight", flush=True)
    finally:
        serve.shutdown()  # replicas finish their ongoing requests first (graceful shutdown)
        ray.shutdown()
    return 0
