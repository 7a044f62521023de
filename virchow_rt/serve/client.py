"""A tiny client of ``virchow-rt serve`` (or of Triton serving a ``virchow-rt triton`` repository).

``embed(url, tiles)`` sends uint8 tiles with KServe v2's binary-data extension over plain HTTP (the
standard library only) and returns the embeddings; ``tritonclient.http`` works against the same server.
It reads the model's batch limit from the server (``virchow-rt serve``'s metadata, or Triton's model
configuration) and sends larger batches in chunks; ``token=`` sends ``Authorization: Bearer <token>``; a
503 (the server holds all the requests it may) is retried after the server's ``Retry-After`` (1 s when it
gives none). Each answer is checked: one embedding row per tile sent, or :class:`ServerError`.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from virchow_rt.errors import InputError, VirchowError

#: KServe v2 binary-data extension: the length of the JSON part that starts the body
INFERENCE_HEADER = "Inference-Header-Content-Length"


class ServerError(VirchowError):
    """The server refused the request or could not be reached."""


def embed(
    url: str,
    tiles: np.ndarray,
    model: str | None = None,
    timeout: float = 300.0,
    token: str | None = None,
) -> np.ndarray:
    """uint8 tiles (N, H, W, 3) -> float32 embeddings (N, E) from the server at ``url`` (``http://host:port``).

    ``model`` defaults to the one the server serves. More tiles than the model takes in one request are
    sent in chunks of its limit, in order. ``token``: the server's bearer token (``--token-file``)."""
    tiles = np.ascontiguousarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
        raise InputError(f"tiles of {tiles.dtype} {tiles.shape}: give uint8 (N, H, W, 3) RGB tiles")
    if len(tiles) == 0:
        raise InputError(f"no tiles to embed (shape {tiles.shape}): give at least one uint8 (H, W, 3) tile")
    url = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    model = model or _served_model(url, timeout, headers)
    limit = _batch_limit(url, model, tiles.shape, timeout, headers)
    parts = [_infer(url, model, tiles[i : i + limit], timeout, headers) for i in range(0, len(tiles), limit)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _infer(url: str, model: str, tiles: np.ndarray, timeout: float, headers: dict[str, str]) -> np.ndarray:
    """One KServe v2 binary request -> its embeddings."""
    raw = tiles.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {"name": "tiles", "shape": list(tiles.shape), "datatype": "UINT8",
                 "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=head + raw,
        headers={**headers, INFERENCE_HEADER: str(len(head)), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    reply, answer_headers = _call(request, timeout)
    where = request.full_url
    try:
        size = int(answer_headers.get(INFERENCE_HEADER) or len(reply))
        (out,) = json.loads(reply[:size])["outputs"]
        shape = out["shape"]
        if "data" in out:
            embeddings = np.asarray(out["data"], np.float32).reshape(shape)
        else:
            embeddings = np.frombuffer(reply[size:], "<f4").reshape(shape).astype(np.float32)
    except (ValueError, KeyError, TypeError) as err:  # not JSON, no one output, sizes that do not fit
        raise ServerError(f"{where}: the answer is not one KServe v2 embedding output ({err})") from None
    if embeddings.ndim != 2 or len(embeddings) != len(tiles):
        raise ServerError(
            f"{where}: {len(tiles)} tiles sent, embeddings of shape {tuple(embeddings.shape)} returned; "
            "the server should answer one row per tile"
        )
    return embeddings


def _get(url: str, timeout: float, headers: dict[str, str]) -> Any:
    reply, _ = _call(urllib.request.Request(url, headers=headers), timeout)
    return json.loads(reply)


def _batch_limit(
    url: str, model: str, shape: tuple[int, ...], timeout: float, headers: dict[str, str]
) -> int:
    """Tiles one request may carry: ``virchow-rt serve``'s ``max_batch`` parameter, else Triton's
    ``max_batch_size``. Tiles of another size than a fixed-size model's (Triton serves the graph as
    exported, without resizing) are refused here, with the fix."""
    meta = _get(f"{url}/v2/models/{model}", timeout, headers)
    dims = next((i.get("shape") for i in meta.get("inputs", []) if i.get("name") == "tiles"), None)
    if isinstance(dims, list) and len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:3]):
        if list(shape[1:3]) != dims[1:3]:
            raise InputError(
                f"{model} at {url} takes {dims[1]}x{dims[2]} tiles and these are {shape[1]}x{shape[2]} (a "
                "Triton model does not resize): resize them first as the model's transform does, "
                f"virchow_rt.kernels.resize_tiles(tiles, {dims[1]}, crop_pct, interpolation) with the values "
                "in its config's parameters, or serve it with `virchow-rt serve`, which resizes"
            )
    limit = (meta.get("parameters") or {}).get("max_batch")
    if not isinstance(limit, int):
        limit = _get(f"{url}/v2/models/{model}/config", timeout, headers).get("max_batch_size")
    return limit if isinstance(limit, int) and limit > 0 else max(1, shape[0])


def _served_model(url: str, timeout: float, headers: dict[str, str]) -> str:
    """The model the server serves, from its repository index (Triton's ``POST /v2/repository/index``)."""
    request = urllib.request.Request(f"{url}/v2/repository/index", data=b"{}", headers=headers, method="POST")
    reply, _ = _call(request, timeout)
    names = [entry["name"] for entry in json.loads(reply)]
    if len(names) != 1:
        raise ServerError(f"{url} serves {len(names)} models ({', '.join(names)}); give model=")
    return str(names[0])


def _call(request: urllib.request.Request, timeout: float, busy_retries: int = 5) -> tuple[bytes, Any]:
    """The reply's (body, headers); a 503 (the server is full) is retried after its ``Retry-After``."""
    for attempt in range(busy_retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.read(), reply.headers  # looked up case-insensitively
        except urllib.error.HTTPError as err:
            body = err.read()
            wait = err.headers.get("Retry-After", "")
            if err.code == 503 and attempt < busy_retries:  # Ray's own queue may say no Retry-After
                time.sleep(min(int(wait), 30) if re.fullmatch(r"[0-9]{1,6}", wait) else 1)
                continue
            try:
                reason = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                reason = body[:200].decode(errors="replace")
            hint = "; give token= (the server's --token-file)" if err.code == 401 else ""
            raise ServerError(f"{request.full_url}: HTTP {err.code}: {reason}{hint}") from None
        except urllib.error.URLError as err:
            raise ServerError(
                f"cannot reach {request.full_url} ({err.reason}); is `virchow-rt serve` running?"
            ) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as err:  # mid-request
            raise ServerError(
                f"{request.full_url}: the connection failed mid-request ({err!r}); retry"
            ) from None
    raise AssertionError("unreachable: the last attempt returns or raises")
