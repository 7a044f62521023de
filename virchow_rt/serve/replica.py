"""One ``virchow-rt serve`` replica: the model opened once, requests merged into model batches, and the
bytes of request data it holds bounded (:class:`Pending`).

What the replica says about its model (``metadata``, ``config``) follows KServe v2 and Triton's JSON model
configuration, so ``tritonclient`` reads it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np

from virchow_rt.serve.requests import BadRequest


class Pending:
    """Bytes of request data one replica holds (bodies as they arrive, decoded tiles), bounded.

    Used only on the replica's event loop (the async routes), so it needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, nbytes: int, request_total: int, why: str = "") -> None:
        """Hold ``nbytes`` more for a request that then holds ``request_total``: 413 if that request alone
        is over the limit (it never fits), 503 with ``Retry-After`` if the others leave no room now.
        ``why``: what the bytes are for, said in the 413."""
        if request_total > self.limit:
            raise BadRequest(
                f"a request of {request_total} bytes{f' ({why})' if why else ''} is more than this server "
                f"holds at once ({self.limit} bytes, --max-pending-mb); send fewer or smaller tiles",
                413,
            )
        if self.held + nbytes > self.limit:
            raise BadRequest(
                f"the server is busy ({self.held} bytes of requests pending, --max-pending-mb allows "
                f"{self.limit}); retry in a moment",
                503,
                {"Retry-After": "1"},
            )
        self.held += nbytes


class Ticket:
    """One request's share of :class:`Pending`, given back all at once when the request ends."""

    def __init__(self, pending: Pending) -> None:
        self.pending, self.taken = pending, 0

    def take(self, nbytes: int, why: str = "") -> None:
        self.pending.take(nbytes, self.taken + nbytes, why)
        self.taken += nbytes

    def give_back(self, nbytes: int) -> None:
        """Give back ``nbytes`` of what this request holds (memory it no longer uses) before it ends."""
        nbytes = min(nbytes, self.taken)
        self.pending.held -= nbytes
        self.taken -= nbytes

    def release(self) -> None:
        self.pending.held -= self.taken
        self.taken = 0


class TileEmbedderServer:
    """One replica: the model opened once; requests merged into batches by ``serve.batch``."""

    def __init__(
        self, model: str, backend: str, name: str, max_batch: int, max_wait_s: float,
        max_pending_bytes: int = 1 << 30, allow_engine_host_code: bool = False,
    ) -> None:  # fmt: skip
        from virchow_rt.embed import Embedder

        self.embedder = Embedder(model, backend=backend, allow_engine_host_code=allow_engine_host_code)
        self.info = self.embedder.info
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.pending = Pending(max_pending_bytes)
        self.batches: Counter[int] = Counter()  # tiles per model call -> how many calls
        self.in_flight = 0  # infer and embed requests being read, parsed or embedded now

    def facts(self) -> dict[str, Any]:
        """What the model is, for metadata, config and every answer's label."""
        info = self.info
        return {
            "variant": info.variant,
            "pooling": info.pooling,
            "precision": info.precision,
            "random_weights": bool(info.random_weights),
            "tile_size": info.tile_size,
            "max_batch": self.max_batch,
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": f"virchow-rt/{self.embedder.backend.name}",
            # any tile size: the server resizes to tile_size (Triton's own model takes S×S only)
            "inputs": [{"name": "tiles", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": [-1, self.embedder.embedding_dim()]}
            ],
            "parameters": self.facts(),
        }

    def config(self) -> dict[str, Any]:
        """Triton's model configuration in its JSON form (``tritonclient``'s ``get_model_config``)."""
        return {
            "name": self.name,
            "platform": "virchow-rt",
            "backend": self.embedder.backend.name,
            "max_batch_size": self.max_batch,
            "input": [
                {"name": "tiles", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [-1, -1, 3]}
            ],
            "output": [
                {"name": "embedding", "data_type": "TYPE_FP32", "dims": [self.embedder.embedding_dim()]}
            ],
            "dynamic_batching": {"max_queue_delay_microseconds": int(self.max_wait_s * 1e6)},
            "parameters": {key: {"string_value": _text(value)} for key, value in self.facts().items()},
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


def _text(value: Any) -> str:
    """A parameter as a Triton string_value: booleans as ``true``/``false`` (as ``virchow-rt triton``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
