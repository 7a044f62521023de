"""A tiny client of ``virchow-rt serve`` (or of Triton serving a ``virchow-rt triton`` repository).

``embed(url, tiles)`` sends uint8 tiles with KServe v2's binary-data extension over plain HTTP (the
standard library only) and returns the embeddings; ``tritonclient.http`` works against the same server.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from virchow_rt.errors import InputError, VirchowError

#: KServe v2 binary-data extension: the length of the JSON part that starts the body
INFERENCE_HEADER = "Inference-Header-Content-Length"


class ServerError(VirchowError):
    """The server refused the request or could not be reached."""


def embed(url: str, tiles: np.ndarray, model: str | None = None, timeout: float = 300.0) -> np.ndarray:
    """uint8 tiles (N, H, W, 3) -> float32 embeddings (N, E) from the server at ``url`` (``http://host:port``).

    ``model`` defaults to the one the server serves."""
    tiles = np.ascontiguousarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
        raise InputError(f"tiles of {tiles.dtype} {tiles.shape}: give uint8 (N, H, W, 3) RGB tiles")
    url = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
    model = model or _served_model(url, timeout)
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
        headers={INFERENCE_HEADER: str(len(head)), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    reply, headers = _call(request, timeout)
    size = int(headers.get(INFERENCE_HEADER) or len(reply))
    answer = json.loads(reply[:size])
    (out,) = answer["outputs"]
    if "data" in out:
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    return np.frombuffer(reply[size:], "<f4").reshape(out["shape"]).astype(np.float32)


def _served_model(url: str, timeout: float) -> str:
    """The model the server serves, from its repository index (Triton's ``POST /v2/repository/index``)."""
    reply, _ = _call(urllib.request.Request(f"{url}/v2/repository/index", data=b"{}", method="POST"), timeout)
    names = [entry["name"] for entry in json.loads(reply)]
    if len(names) != 1:
        raise ServerError(f"{url} serves {len(names)} models ({', '.join(names)}); give model=")
    return str(names[0])


def _call(request: urllib.request.Request, timeout: float) -> tuple[bytes, Any]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.read(), reply.headers  # looked up case-insensitively
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            reason = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            reason = body[:200].decode(errors="replace")
        raise ServerError(f"{request.full_url}: HTTP {err.code}: {reason}") from None
    except urllib.error.URLError as err:
        raise ServerError(
            f"cannot reach {request.full_url} ({err.reason}); is `virchow-rt serve` running?"
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:  # mid-request
        raise ServerError(f"{request.full_url}: the connection failed mid-request ({err!r}); retry") from None
