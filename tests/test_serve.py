"""``virchow-rt serve``: the real Ray Serve server on localhost (CPU, ONNX Runtime), queried by tritonclient.

One server for the module (Ray Serve starts in seconds): embeddings equal the in-process Embedder's,
concurrent requests are merged, and every bad request gets its 4xx while the server keeps serving.
"""

import io
import json
import socket
import threading
import urllib.error
import urllib.request

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    export = pytest.importorskip("virchow_rt.export.pipeline")
    out = tmp_path_factory.mktemp("served-model")
    export.export_model(NAME, out, random_weights=True, precisions=["fp32"], parity_tiles=2)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(out), max_batch=16, max_wait_ms=50), name="virchow-rt", route_prefix="/")
    yield {"url": f"127.0.0.1:{port}", "model": out}
    serve.shutdown()
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
    meta = client.get_model_metadata(NAME)
    assert meta["parameters"]["variant"] == NAME and meta["parameters"]["random_weights"] is True
    assert meta["inputs"][0]["datatype"] == "UINT8" and meta["outputs"][0]["datatype"] == "FP32"
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
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(body)["embeddings"]), expected, atol=1e-5)
    status, body = _post(server["url"], buffer.getvalue(), {"Accept": "application/x-npy"})
    np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, atol=1e-5)
    from virchow_rt.serve import client as plain_client

    np.testing.assert_allclose(plain_client.embed(server["url"], tiles), expected, atol=1e-5)
    with pytest.raises(plain_client.ServerError, match="HTTP 400: .*send 1 to 16"):
        plain_client.embed(server["url"], _tiles(17, size=8))
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(tiles[0]).save(png, format="PNG")
    status, body = _post(server["url"], png.getvalue())
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(body)["embeddings"]), expected[:1], atol=1e-5)


def test_concurrent_clients_are_merged_into_batches(server):
    errors = []

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
    with urllib.request.urlopen(f"http://{server['url']}/v2/models/{NAME}/stats", timeout=30) as reply:
        stats = json.loads(reply.read())
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 1, stats


def _request(shape, datatype, data):
    return {"inputs": [{"name": "tiles", "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [
        (_request([1, 4, 4, 3], "FP32", [0.0] * 48), {}, 400, "UINT8"),
        (_request([1, 4, 4], "UINT8", [0] * 16), {}, 400, "shape"),
        (_request([0, 4, 4, 3], "UINT8", []), {}, 400, "0 tiles"),
        (_request([17, 1, 1, 3], "UINT8", [0] * 51), {}, 400, "--max-batch"),
        (_request([1, 1, 1, 3], "UINT8", [0, 1]), {}, 400, "integers"),
        (_request([1, 1, 1, 3], "UINT8", [0, 1, 300]), {}, 400, "0..255"),
        (b"{not json", {}, 400, "not KServe v2 JSON"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, body, headers, status, reason):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server['url']}/v2/models/{NAME}/infer", data=data, headers=headers, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == status
    assert reason in json.loads(caught.value.read())["error"]
    assert _infer(httpclient.InferenceServerClient(server["url"]), _tiles(1)).shape == (1, 192)


def test_parameters_that_are_not_objects_are_ignored(server):
    body = {**_request([1, 1, 1, 3], "UINT8", [0, 1, 2]), "parameters": "odd", "outputs": [{"parameters": 1}]}
    request = urllib.request.Request(
        f"http://{server['url']}/v2/models/{NAME}/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["outputs"][0]["shape"] == [1, 192]


def test_plain_route_refuses_what_is_not_tiles(server):
    status, body = _post(server["url"], b"GIF89a not really")
    assert status == 400 and "neither a .npy batch nor an image" in json.loads(body)["error"]
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
