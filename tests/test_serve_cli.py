"""``virchow-rt serve`` as a user starts it: what is refused in one line before Ray starts (a busy port, a
bad host, a bad token file, limits it cannot run with), a Ray of its own (never one already running here),
one real server from the command line (a subprocess) with a bearer token and a small --max-pending-mb: 401
without the token, 503 + Retry-After when full, a JSON body counted at what parsing it costs, a clean
console, a clean stop on SIGTERM; and a model the replicas cannot open, said in one line."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from virchow_rt.cli import main as cli
from virchow_rt.serve.launch import DEFAULT_PORT, check_port

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")
NAME = "virchow2g-mini-tiny"
TOKEN = "a-long-enough-test-token-0123456789"


def test_the_default_port_is_not_tritons():
    assert DEFAULT_PORT not in (8000, 8001, 8002)


def _refused(argv, capsys):
    code = cli.main(["serve", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # before Ray started
    return err


def test_a_busy_port_is_one_line_before_ray_starts(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _refused([str(tmp_path), "--port", str(port)], capsys)
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port" in err
    check_port("127.0.0.1", port)  # free again: no complaint


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--host", "256.1.1.1"], "--host 256.1.1.1: not an address"),
        (["--port", "70000"], "--port 70000: give a port from 1 to 65535"),
        (["--token-file", "MISSING"], "--token-file .*MISSING: cannot read it"),
        (["--token-file", "SHORT"], "give one line of at least 16 printable ASCII characters"),
        (["--token-file", "NONASCII"], "at least 16 printable ASCII characters"),  # never matches a header
        (["--name", "../x"], "--name '../x' cannot be used as a name"),
        (["--replicas", "-1"], "--replicas -1: give 1 or more"),
        (["--max-pending-mb", "inf"], "--max-pending-mb inf: give a finite number above 0"),
        (["--max-wait-ms", "nan"], "--max-wait-ms nan: give a finite number, 0 or more"),
        (["--body-timeout-s", "0"], "--body-timeout-s 0.0: give a finite number above 0"),
    ],
)
def test_bad_options_are_one_line_before_ray_starts(tmp_path, capsys, extra, reason):
    (tmp_path / "SHORT").write_text("short\n")
    (tmp_path / "NONASCII").write_text("schlüssel-" * 4 + "\n")
    (tmp_path / "NONASCII").chmod(0o600)
    extra = [str(tmp_path / a) if a in ("MISSING", "SHORT", "NONASCII") else a for a in extra]
    port = [] if "--port" in extra else ["--port", str(_free_port())]
    err = _refused([str(tmp_path), *port, *extra], capsys)
    assert re.search(reason, err), err


def test_serve_starts_a_ray_of_its_own_unless_ray_address_names_one(tmp_path, monkeypatch):
    """ray.init() with no address joins the cluster `ray start --head` left on this machine (its Serve, its
    port, its apps); serve asks for a new local instance, unless RAY_ADDRESS says which cluster to join."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from virchow_rt.errors import BackendError

    asked = []

    def init(**kwargs):
        asked.append(kwargs.get("address", "none given"))
        raise BackendError("stopped where Ray would start")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["serve", str(tmp_path), "--port", str(_free_port())]
    assert (
        cli.main(argv) == BackendError.exit_code
    )  # not capsys: ray.serve, imported here, keeps the stderr it found
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cli.main(argv) == BackendError.exit_code
    assert asked == ["local", None]  # None: ray.init reads RAY_ADDRESS itself


def test_when_the_replicas_fail_for_no_reason_found_here_the_logs_are_this_rays(monkeypatch):
    ray = pytest.importorskip("ray")
    import virchow_rt.backends as backends
    from virchow_rt.serve.launch import _why_replicas_failed

    class Opened:
        def close(self):
            pass

    class Context:
        def get_temp_dir(self):
            return "/scratch/ray"

        def get_session_name(self):
            return "session_ours"

    monkeypatch.setattr(backends, "open_backend", lambda *args, **kwargs: Opened())
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    err = _why_replicas_failed("model", "auto", False, RuntimeError("Failed to update the deployments"))
    assert "Ray's logs: /scratch/ray/session_ours/logs/serve/" in str(err), err  # not session_latest


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    export = pytest.importorskip("virchow_rt.export.pipeline")
    pytest.importorskip(
        "ray.serve", reason="the serve extra is not installed: pip install 'virchow-rt[serve]'"
    )
    folder = tmp_path_factory.mktemp("cli-served")
    export.export_model(NAME, folder / "model", random_weights=True, precisions=["fp32"], parity_tiles=2)
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    argv = [sys.executable, "-m", "virchow_rt.cli.main", "serve", str(folder / "model"), "--port", str(port),
            "--token-file", str(token), "--max-batch", "4", "--max-pending-mb", "12"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines, up = [], threading.Event()

    def read(stream):
        for line in stream:
            lines.append(line)
            if line.startswith("serving "):
                up.set()

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for reader in readers:
        reader.start()
    while not up.wait(1.0):  # synchronised on the server's own "serving" line (or its exit)
        if proc.poll() is not None:
            pytest.fail(f"virchow-rt serve exited {proc.returncode}: {''.join(lines)}")
    state = {"url": f"http://127.0.0.1:{port}", "proc": proc, "lines": lines, "readers": readers,
             "model": folder / "model"}  # fmt: skip
    yield state
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _get(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as reply:
            return reply.status, json.loads(reply.read()), reply.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def test_every_route_but_health_needs_the_token(cli_server):
    url = cli_server["url"]
    assert _get(f"{url}/v2/health/ready")[:2] == (200, {"ready": True})
    for route in ("/v2", f"/v2/models/{NAME}", f"/v2/models/{NAME}/config", "/nowhere", "/docs"):
        status, body, headers = _get(f"{url}{route}")
        assert (
            status == 401
            and "Authorization: Bearer" in body["error"]
            and headers["WWW-Authenticate"] == "Bearer"
        )
        assert _get(f"{url}{route}", token=TOKEN + "x")[0] == 401
    assert _get(f"{url}/v2", token=TOKEN)[:2] == (200, {"name": "virchow-rt", "version": "0.1.0",
                                                       "extensions": ["binary_tensor_data"]})  # fmt: skip
    assert _get(f"{url}/docs", token=TOKEN)[0] == 404  # FastAPI's pages are off
    httpclient = pytest.importorskip("tritonclient.http")
    triton = httpclient.InferenceServerClient(url.removeprefix("http://"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert triton.get_model_config(NAME, headers=auth)["max_batch_size"] == 4
    from virchow_rt.serve import client

    tiles = np.random.default_rng(0).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    assert client.embed(url, tiles, token=TOKEN).shape == (6, 192)  # 4 + 2: the server's --max-batch 4
    with pytest.raises(client.ServerError, match="HTTP 401.*give token="):
        client.embed(url, tiles)


def _pending(url):
    return _get(f"{url}/v2/models/{NAME}/stats", token=TOKEN)[1]["pending_bytes"]


def _infer_request(url, tiles):
    raw = tiles.tobytes()
    head = json.dumps(
        {"inputs": [{"name": "tiles", "shape": list(tiles.shape), "datatype": "UINT8",
                     "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()  # fmt: skip
    headers = {"Authorization": f"Bearer {TOKEN}", "Inference-Header-Content-Length": str(len(head))}
    return urllib.request.Request(
        f"{url}/v2/models/{NAME}/infer", data=head + raw, headers=headers, method="POST"
    )


def _wait_for(condition, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():  # synchronised on what the server reports (its stats)
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_full_server_answers_503_with_retry_after_and_keeps_serving(cli_server):
    """A body that stalls after 10 MB holds 10 MB of the 12 MB allowed; a 4.8 MB request then gets 503, and
    once the stalled client leaves, the same request is served."""
    url = cli_server["url"]
    port = int(url.rsplit(":", 1)[1])
    stalled = socket.create_connection(("127.0.0.1", port))
    head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 10500000\r\n\r\n")  # fmt: skip
    stalled.sendall(head.encode() + b"\x93NUMPY" + b"\0" * (10_000_000 - 6))  # sent, then nothing more
    _wait_for(lambda: _pending(url) >= 10_000_000, "the stalled body was never counted")
    request = _infer_request(url, np.zeros((4, 448, 448, 3), np.uint8))  # 2.4 MB body + 2.4 MB tiles
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "1"
    assert "busy" in json.loads(caught.value.read())["error"]
    stalled.close()
    _wait_for(lambda: _pending(url) == 0, "the stalled request's bytes were never given back")
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200


def test_a_json_body_is_counted_at_what_parsing_it_costs(cli_server):
    """750 KB of JSON data (one 224 px tile as "255, " values) fits the 12 MB --max-pending-mb as bytes,
    but parsing it costs ~25x: refused (413) before it is parsed, naming why."""
    tile = {"name": "tiles", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [255] * (224 * 224 * 3)}
    body = json.dumps({"inputs": [tile]}).encode()
    assert 700_000 < len(body) < 12 << 20
    request = urllib.request.Request(
        f"{cli_server['url']}/v2/models/{NAME}/infer", data=body, method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    error = json.loads(caught.value.read())["error"]
    assert caught.value.code == 413 and f"parsing its {len(body)} bytes of JSON takes about 25x" in error
    assert _pending(cli_server["url"]) == 0


def test_sigterm_stops_it_cleanly_and_the_console_holds_no_ray_noise(cli_server):
    proc = cli_server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    for reader in cli_server["readers"]:
        reader.join(timeout=30)
    console = "".join(cli_server["lines"])
    assert "stopping: finishing the requests in flight" in console
    for noise in ("Token authentication", "will not be applied", "graceful_shutdown", "\x1b[", "Traceback"):
        assert noise not in console, console


def test_a_model_the_replicas_cannot_open_is_one_line(cli_server, tmp_path, capsys):
    """Ray says only "Failed to update the deployments"; the CLI says why (here a planted manifest path)."""
    planted = tmp_path / "planted"
    shutil.copytree(cli_server["model"], planted)
    manifest = json.loads((planted / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = f"../{cli_server['model'].name}/{manifest['artifacts'][0]['path']}"
    (planted / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(cli_server["model"], tmp_path / cli_server["model"].name)  # a real model out there
    assert cli.main(["serve", str(planted), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "climbs out with '..'" in err, err
