"""virchow_rt.serve.client against small stand-in KServe v2 servers (standard library, no Ray): chunks of the
server's batch limit, Triton's fixed tile size, the bearer token, 503 retries (with or without Retry-After);
bad tiles, zero tiles, an unreachable server and answers that do not fit what was sent are one-line errors."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from virchow_rt.errors import InputError
from virchow_rt.serve import client


def stand_in(tiles: np.ndarray) -> np.ndarray:
    """The stand-in model: each tile's mean RGB and its first pixel's red -> (N, 4) float32."""
    return np.concatenate([tiles.mean(axis=(1, 2)), tiles[:, :1, 0, :1].reshape(-1, 1)], 1).astype(np.float32)


class StandIn:
    """A KServe v2 server: ``meta`` and ``config`` are what it says about model "m"; ``seen`` the tiles
    per infer request; ``token`` the bearer token it wants; ``busy`` how many 503s it answers first (with
    ``retry_after``, or no such header when None); ``short`` rows it leaves out of each answer; ``garbled``
    answers that are not JSON."""

    def __init__(self, meta, config=None, token=None, busy=0, retry_after="0", short=0, garbled=False):
        self.meta, self.config, self.token, self.busy, self.seen = meta, config or {}, token, busy, []
        self.retry_after, self.short, self.garbled = retry_after, short, garbled
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def answer(self, status, payload, headers=None):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def allowed(self):
                if owner.token and self.headers.get("Authorization") != f"Bearer {owner.token}":
                    self.answer(401, {"error": "this server needs a token"})
                    return False
                return True

            def do_GET(self):
                if not self.allowed():
                    return
                routes = {"/v2/models/m": owner.meta, "/v2/models/m/config": owner.config}
                self.answer(200, routes[self.path]) if self.path in routes else self.answer(
                    404, {"error": "no"}
                )

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not self.allowed():
                    return
                if self.path == "/v2/repository/index":
                    return self.answer(200, [{"name": "m", "version": "1", "state": "READY"}])
                if owner.busy:
                    owner.busy -= 1
                    wait = {} if owner.retry_after is None else {"Retry-After": owner.retry_after}
                    return self.answer(503, b"Request dropped due to backpressure", wait)  # as Ray's queue
                size = int(self.headers[client.INFERENCE_HEADER])
                (spec,) = json.loads(body[:size])["inputs"]
                tiles = np.frombuffer(body[size:], np.uint8).reshape(spec["shape"])
                owner.seen.append(len(tiles))
                if owner.garbled:
                    return self.answer(200, b"<html>proxy error</html>")
                rows = len(tiles) - owner.short
                raw = stand_in(tiles[:rows]).astype("<f4").tobytes()
                head = json.dumps(
                    {"outputs": [{"name": "embedding", "shape": [rows, 4], "datatype": "FP32",
                                  "parameters": {"binary_data_size": len(raw)}}]}
                ).encode()  # fmt: skip
                self.answer(200, head + raw, {client.INFERENCE_HEADER: str(len(head))})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _tiles(n, size=8):
    return np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_a_batch_over_the_servers_limit_is_sent_in_chunks_in_order():
    meta = {"inputs": [{"name": "tiles", "shape": [-1, -1, -1, 3]}], "parameters": {"max_batch": 4}}
    tiles = _tiles(10)
    with StandIn(meta) as server:
        np.testing.assert_array_equal(client.embed(server.url, tiles), stand_in(tiles))
    assert server.seen == [4, 4, 2]


def test_a_triton_model_gives_its_limit_in_its_config_and_takes_its_tile_size_only():
    meta = {"inputs": [{"name": "tiles", "shape": [-1, 8, 8, 3]}], "parameters": {}}
    tiles = _tiles(7)
    with StandIn(meta, config={"max_batch_size": 3}) as server:
        np.testing.assert_array_equal(client.embed(server.url, tiles, model="m"), stand_in(tiles))
        assert server.seen == [3, 3, 1]
        with pytest.raises(InputError, match=r"takes 8x8 tiles and these are 16x16 .*resize them first"):
            client.embed(server.url, _tiles(2, size=16), model="m")
    assert server.seen == [3, 3, 1]  # the wrong size never left the client


def test_the_token_is_sent_when_given_and_its_absence_is_named():
    meta = {"inputs": [], "parameters": {"max_batch": 8}}
    tiles = _tiles(3)
    with StandIn(meta, token="s3cret-token-for-tests") as server:
        with pytest.raises(client.ServerError, match="HTTP 401: .*give token="):
            client.embed(server.url, tiles)
        got = client.embed(server.url, tiles, token="s3cret-token-for-tests")
    np.testing.assert_array_equal(got, stand_in(tiles))


@pytest.mark.parametrize("retry_after", ["0", None], ids=["retry-after-0", "no-retry-after"])
def test_a_busy_server_is_asked_again_after_its_retry_after(retry_after):
    meta = {"inputs": [], "parameters": {"max_batch": 8}}
    with StandIn(meta, busy=2, retry_after=retry_after) as server:  # no header: Ray's own queue, 1 s
        assert client.embed(server.url, _tiles(2)).shape == (2, 4)
    assert server.busy == 0 and server.seen == [2]


def test_zero_tiles_are_one_line_before_any_request():
    meta = {"inputs": [], "parameters": {"max_batch": 8}}
    with StandIn(meta) as server:
        with pytest.raises(InputError, match=r"no tiles to embed \(shape \(0, 8, 8, 3\)\)"):
            client.embed(server.url, np.zeros((0, 8, 8, 3), np.uint8))
    assert server.seen == []


@pytest.mark.parametrize(
    ("fault", "reason"),
    [({"short": 1}, r"3 tiles sent, embeddings of shape \(2, 4\) returned"),
     ({"garbled": True}, "the answer is not one KServe v2 embedding output")],
    ids=["a-row-short", "not-json"],
)  # fmt: skip
def test_an_answer_that_does_not_fit_what_was_sent_is_a_server_error(fault, reason):
    meta = {"inputs": [], "parameters": {"max_batch": 8}}
    with StandIn(meta, **fault) as server:
        with pytest.raises(client.ServerError, match=reason):
            client.embed(server.url, _tiles(3))


def test_bad_tiles_and_no_server_are_one_line_errors():
    with pytest.raises(InputError, match=r"give uint8 \(N, H, W, 3\)"):
        client.embed("127.0.0.1:1", np.zeros((2, 8, 8), np.float32))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(client.ServerError, match="cannot reach .*is `virchow-rt serve` running"):
        client.embed(f"127.0.0.1:{port}", np.zeros((1, 8, 8, 3), np.uint8), timeout=5)
