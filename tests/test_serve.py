"""``virchow-rt serve``: the real Ray Serve server on localhost (CPU, ONNX Runtime), queried by tritonclient.

One server for the module (Ray Serve starts in seconds, on a Ray instance of its own: never one already
running here): embeddings equal the in-process Embedder's, tritonclient's own calls work (with and without
the model version), concurrent requests are merged, answers say random_weights, every bad request (unknown
routes, bodies that would cost memory or raise inside the server) gets its 4xx with {"error": ...} while
the server keeps serving, and clients that stall their bodies neither freeze it nor hold memory.
"""

import io
import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

serve = pytest.importorskip(
    "ray.serve", reason="the serve extra is not installed: pip install 'virchow-rt[serve]'"
)
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
ray = pytest.importorskip("ray")

from virchow_rt.embed import Embedder  # noqa: E402
from virchow_rt.serve.http import build_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")
NAME = "virchow2g-mini-tiny"
BODY_TIMEOUT_S = 20.0  # the stall test waits this long; long enough for a slow machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from virchow_rt.export import pipeline as export
    out = tmp_path_factory.mktemp("served-model")
    export.export_model(NAME, out, random_weights=True, precisions=["fp32"], parity_tiles=2)
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # ours, not one here
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(str(out), max_batch=16, max_wait_ms=50, body_timeout_s=BODY_TIMEOUT_S)
    serve.run(app, name="virchow-rt", route_prefix="/")
    yield {"url": f"127.0.0.1:{port}", "model": out}
    serve.delete("virchow-rt")  # then Ray stops everything (serve.shutdown() logs a raylet error)
    ray.shutdown()


def _tiles(n, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _infer(client, tiles, binary=True):
    given = httpclient.InferInput("tiles", list(tiles.shape), "UINT8")
    given.set_data_from_numpy(tiles, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    return client.infer(NAME, [given], outputs=[wanted]).as_numpy("embedding")


def _post(url, body, headers=None):
    request = urllib.request.Request(f"http://{url}/embed", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_tritonclient_and_the_plain_route_give_the_embedders_embeddings(server):
    client = httpclient.InferenceServerClient(server["url"])
    assert client.is_server_ready() and client.is_model_ready(NAME)
    assert client.get_server_metadata()["name"] == "virchow-rt"
    meta = client.get_model_metadata(NAME)
    assert meta["parameters"]["variant"] == NAME and meta["parameters"]["random_weights"] is True
    assert meta["parameters"]["max_batch"] == 16 and meta["parameters"]["tile_size"] == 224
    assert meta["inputs"][0]["datatype"] == "UINT8" and meta["outputs"][0]["datatype"] == "FP32"
    config = client.get_model_config(NAME)
    assert config["max_batch_size"] == 16 and config["output"][0]["dims"] == [192]
    assert config["parameters"]["random_weights"]["string_value"] == "true"
    tiles = _tiles(5)
    with Embedder(server["model"]) as embedder:
        expected = embedder.embed(tiles)
        resized = embedder.embed(_tiles(2, size=256, seed=1))
    np.testing.assert_allclose(_infer(client, tiles), expected, atol=1e-5)
    np.testing.assert_allclose(_infer(client, tiles, binary=False), expected, atol=1e-5)
    np.testing.assert_allclose(_infer(client, _tiles(2, size=256, seed=1)), resized, atol=1e-5)

    buffer = io.BytesIO()
    np.save(buffer, tiles)
    status, body = _post(server["url"], buffer.getvalue())
    assert status == 200 and json.loads(body)["random_weights"] is True
    np.testing.assert_allclose(np.array(json.loads(body)["embeddings"]), expected, atol=1e-5)
    request = urllib.request.Request(
        f"http://{server['url']}/embed", buffer.getvalue(), {"Accept": "application/x-npy"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["Virchow-Random-Weights"] == "true"
        np.testing.assert_allclose(np.load(io.BytesIO(reply.read())), expected, atol=1e-5)
    answer = _json(server["url"], f"/v2/models/{NAME}/infer", _request([1, 1, 1, 3], "UINT8", [0, 1, 2]))
    assert answer["parameters"]["random_weights"] is True and answer["outputs"][0]["shape"] == [1, 192]
    from virchow_rt.serve import client as plain_client

    np.testing.assert_allclose(plain_client.embed(server["url"], tiles), expected, atol=1e-5)
    many = _tiles(40, seed=2)  # over the server's --max-batch 16: the client sends 16 + 16 + 8
    with Embedder(server["model"]) as embedder:
        np.testing.assert_allclose(plain_client.embed(server["url"], many), embedder.embed(many), atol=1e-5)
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(tiles[0]).save(png, format="PNG")
    status, body = _post(server["url"], png.getvalue())
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(body)["embeddings"]), expected[:1], atol=1e-5)


def _model_calls(url: str) -> int:
    with urllib.request.urlopen(f"http://{url}/v2/models/{NAME}/stats", timeout=30) as reply:
        return sum(b["count"] for b in json.loads(reply.read())["batch_stats"])


def test_concurrent_clients_are_merged_into_batches(server):
    errors = []
    before = _model_calls(server["url"])  # the module's earlier requests made batches too: count from here

    def client_loop(seed):
        client = httpclient.InferenceServerClient(server["url"])
        try:
            for i in range(4):
                assert _infer(client, _tiles(1, seed=seed * 10 + i)).shape == (1, 192)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    calls = _model_calls(server["url"]) - before
    assert 0 < calls < 8 * 4, f"{calls} model calls for 32 single-tile requests: nothing was merged"


def _request(shape, datatype, data):
    return {"inputs": [{"name": "tiles", "shape": shape, "datatype": datatype, "data": data}]}


def _json(url, route, body):
    request = urllib.request.Request(f"http://{url}{route}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def _png_header(width, height):
    """A PNG that declares ``width`` x ``height`` pixels in 60 bytes (its pixels never come)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _npy_header(shape, data=b""):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


INFER = f"/v2/models/{NAME}/infer"
_BINARY_SIZE_STRING = (
    json.dumps(
        {
            "inputs": [
                {
                    "name": "tiles",
                    "shape": [1, 1, 1, 3],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": "3"},
                }
            ]
        }
    ).encode()
    + b"abc"
)
_ONE = '{"inputs": [{"name": "tiles", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [%s, 0, 0]}]}'
_MULTIPART = {"Content-Type": "multipart/form-data; boundary=xyz"}


_CASE_IDS = [
    "fp32", "input-name", "0-px-side", "bool-value", "2**64-1", "binary-size-string",
    "header-superscript-2", "header-5000-digits", "header-over-64KiB", "npy-bool-shape",
    "npy-1x4096-tiles", "three-dims", "no-tiles", "over-max-batch", "too-few-values", "over-255",
    "float-value", "not-json", "1e400", "10**30", "nested-100000-deep", "overflowing-shape", "2**63-tiles",
    "bool-in-shape", "npy-1.5TB-header", "npy-short-data", "npy-no-tiles", "png-13000px", "empty-body",
    "multipart", "gif", "png-no-pixels", "unknown-route", "wrong-method",
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "body", "headers", "status", "reason"),
    [
        (INFER, _request([1, 4, 4, 3], "FP32", [0.0] * 48), {}, 400, "UINT8"),
        (INFER, {"inputs": [{"name": "x", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [0, 1, 2]}]},
         {}, 400, 'input \'x\': .*one input is "tiles"'),
        (INFER, _request([1, 0, 8, 3], "UINT8", []), {}, 400, "0x8 px tile .*at least 1 px a side"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [True, 1, 2]), {}, 400, r"value True \(bool\)"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [2**64 - 1, 1, 2]), {}, 400, r"18446744073709551615 \(int\)"),
        (INFER, _BINARY_SIZE_STRING, {"Inference-Header-Content-Length": str(len(_BINARY_SIZE_STRING) - 3)},
         400, "binary_data_size '3' is not an integer"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [0, 1, 2]), {"Inference-Header-Content-Length": "²"}, 400,
         "Inference-Header-Content-Length '²' is not a byte count"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [0, 1, 2]), {"Inference-Header-Content-Length": "9" * 5000},
         400, "is not a byte count"),
        (INFER, b"{}" + b" " * 70_000, {"Inference-Header-Content-Length": "70002"}, 400,
         "JSON part of a binary request is 1 to 65536 bytes"),
        ("/embed", _npy_header((True, 1, 1, 3), b"\0" * 3), {}, 400, r"\.npy of uint8 \(True, 1, 1, 3\)"),
        ("/embed", _npy_header((8, 1, 4096, 3), b"\0" * 98_304), {}, 400, "1x4096 px tile .*at most 4x"),
        (INFER, _request([1, 4, 4], "UINT8", [0] * 16), {}, 400, "shape"),
        (INFER, _request([0, 4, 4, 3], "UINT8", []), {}, 400, "0 tiles"),
        (INFER, _request([17, 1, 1, 3], "UINT8", [0] * 51), {}, 400, "--max-batch"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [0, 1]), {}, 400, "holds 2 values"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [0, 1, 300]), {}, 400, "0..255"),
        (INFER, _request([1, 1, 1, 3], "UINT8", [0.5, 1, 2]), {}, 400, r"value 0\.5 \(float\)"),
        (INFER, b"{not json", {}, 400, "not KServe v2 JSON"),
        (INFER, (_ONE % "1e400").encode(), {}, 400, r"value inf \(float\)"),
        (INFER, (_ONE % str(10**30)).encode(), {}, 400, r"value 10{30} \(int\)"),
        (INFER, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "not KServe v2 JSON"),
        (INFER, _request([1, 2**40, 2**40, 3], "UINT8", []), {}, 413, "a tile is 1 to 4096 px"),
        (INFER, _request([2**63, 1, 1, 3], "UINT8", []), {}, 400, "send 1 to 16"),
        (INFER, _request([1, 1, 1, True], "UINT8", [0, 0, 0]), {}, 400, r"tiles are \[N, H, W, 3\]"),
        ("/embed", _npy_header((1, 1_000_000, 500_000, 3)), {}, 413, "a tile is 1 to 4096 px"),  # 1.5 TB
        ("/embed", _npy_header((2, 8, 8, 3), b"\0" * 10), {}, 400, "holds 10 bytes"),
        ("/embed", _npy_header((0, 8, 8, 3)), {}, 400, "0 tiles"),
        ("/embed", _png_header(13000, 13000), {}, 413, "13000x13000 px"),
        ("/embed", b"", {}, 400, "the body is empty: .*--data-binary"),
        ("/embed", b"--xyz\r\nContent-Disposition: form-data", _MULTIPART, 400, "curl -F.*--data-binary"),
        ("/embed", b"GIF89a not really", {}, 400, "neither a .npy batch nor a PNG, JPEG or TIFF"),
        ("/embed", _png_header(8, 8), {}, 400, "cannot be decoded"),  # no pixel data
        ("/nowhere", b"{}", {}, 404, "POST /nowhere: no such route"),
        (f"/v2/models/{NAME}/config", b"{}", {}, 405, "method not allowed"),
    ],
    ids=_CASE_IDS,
)  # fmt: skip
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, route, body, headers, status, reason):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server['url']}{route}", data=data, headers=headers, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    error = json.loads(caught.value.read())["error"]
    assert caught.value.code == status and re.search(reason, error), error
    assert "object at 0x" not in error and "\n" not in error  # one line, no Python objects
    assert _infer(httpclient.InferenceServerClient(server["url"]), _tiles(1)).shape == (1, 192)


def test_unknown_routes_answer_with_an_error_body(server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{server['url']}/docs", timeout=60)  # FastAPI's pages are off
    assert caught.value.code == 404 and "GET /docs: no such route" in json.loads(caught.value.read())["error"]


def test_parameters_that_are_not_objects_are_ignored(server):
    body = {**_request([1, 1, 1, 3], "UINT8", [0, 1, 2]), "parameters": "odd", "outputs": [{"parameters": 1}]}
    request = urllib.request.Request(
        f"http://{server['url']}/v2/models/{NAME}/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["outputs"][0]["shape"] == [1, 192]


def test_plain_route_refuses_what_is_not_tiles(server):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 8, 8), np.float32))
    status, body = _post(server["url"], buffer.getvalue())
    assert status == 400 and "uint8 (N, H, W, 3)" in json.loads(body)["error"]
    # a body declared too large is refused from its Content-Length, before it is read
    import http.client

    host, port = server["url"].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/embed")
    connection.putheader("Content-Length", str(1 << 34))
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413 and "too large" in json.loads(reply.read())["error"]
    connection.close()


def test_a_json_body_is_capped_far_below_a_binary_one(server):
    """Parsed JSON costs ~25x its bytes: a JSON-data request over 8 MiB is refused from its declared length
    (a binary one of that size is fine), naming the binary-data extension."""
    import http.client

    host, port = server["url"].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", INFER)
    connection.putheader("Content-Length", str(9 << 20))
    connection.endheaders()
    reply = connection.getresponse()
    error = json.loads(reply.read())["error"]
    assert reply.status == 413 and "for JSON data" in error and "binary_data=True" in error, error
    connection.close()


def test_the_one_version_has_the_versioned_routes(server):
    client = httpclient.InferenceServerClient(server["url"])
    assert client.get_model_metadata(NAME, model_version="1")["name"] == NAME
    assert client.is_model_ready(NAME, model_version="1")
    assert client.get_model_config(NAME, model_version="1")["max_batch_size"] == 16
    given = httpclient.InferInput("tiles", [1, 224, 224, 3], "UINT8")
    given.set_data_from_numpy(_tiles(1), binary_data=True)
    assert client.infer(NAME, [given], model_version="1").as_numpy("embedding").shape == (1, 192)
    for route in (f"/v2/models/{NAME}/versions/2", f"/v2/models/{NAME}/versions/2/ready"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{server['url']}{route}", timeout=60)
        assert (
            caught.value.code == 404 and "its one version is '1'" in json.loads(caught.value.read())["error"]
        )


def _stats(url):
    with urllib.request.urlopen(f"http://{url}/v2/models/{NAME}/stats", timeout=30) as reply:
        return json.loads(reply.read())


def _wait_for(condition, what, seconds=90):
    deadline = time.monotonic() + seconds
    while not condition():  # synchronised on what the server reports (its stats)
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _reply_status(stalled):
    """The status and JSON body the server sends on a stalled connection (read as its Content-Length says)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += stalled.recv(65536) or pytest.fail(f"the connection closed without an answer: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *([0-9]+)", head).group(1))
    while len(body) < length:
        body += stalled.recv(65536) or pytest.fail(f"the answer was cut: {data!r}")
    return int(head.split()[1]), json.loads(body)


def test_stalled_bodies_freeze_nothing_hold_only_what_came_and_get_408(server):
    """2x max-batch clients each declare a 1 MB body, send 6 bytes and stall: they all reach the replica
    (its stats say so), which still answers health, stats and an inference, counts only the 6 bytes each
    sent (not the 1 MB declared), and answers each 408 once its body deadline passes."""
    host, port = server["url"].split(":")
    stalls = []
    for _ in range(2 * 16):
        stalled = socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 60)
        stalled.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n\x93NUMPY")
        stalls.append(stalled)
    try:
        _wait_for(lambda: _stats(server["url"])["requests_in_flight"] == 32, "the stalls never all arrived")
        with urllib.request.urlopen(f"http://{server['url']}/v2/health/ready", timeout=10) as reply:
            assert json.loads(reply.read()) == {"ready": True}
        # what arrived, not the 32 MB declared
        _wait_for(lambda: _stats(server["url"])["pending_bytes"] == 32 * 6, "not the bytes that came")
        assert _infer(httpclient.InferenceServerClient(server["url"]), _tiles(1)).shape == (1, 192)
        for stalled in stalls:
            status, body = _reply_status(stalled)
            assert status == 408 and f"did not arrive within {BODY_TIMEOUT_S:g} s" in body["error"], body
    finally:
        for stalled in stalls:
            stalled.close()
    _wait_for(lambda: _stats(server["url"])["pending_bytes"] == 0, "the stalls' bytes were never given back")
    assert _stats(server["url"])["requests_in_flight"] == 0


def test_rays_own_queue_is_bounded_and_says_when_to_retry(server):
    """Past the replicas' slots and Ray Serve's queue, Ray answers 503 itself: with Retry-After (the client
    waits for it), from a queue far larger than a model batch."""
    from virchow_rt.serve.http import max_ongoing

    deployment = build_app(str(server["model"]), max_batch=16)._bound_deployment  # Ray has no public getter
    assert deployment.max_ongoing_requests == max_ongoing(16) >= 16 * 8
    assert deployment.max_queued_requests == 4 * max_ongoing(16)
    assert deployment.backpressure_config.retry_after_s == 1
