"""What ``virchow-rt serve`` checks before it spends memory, without Ray: request parsing (header values
that ``int`` refuses, ``.npy`` shapes of booleans, JSON values numpy would take, tiles too thin to resize),
the bytes a request is counted for, the limits checked before Ray starts, and the JSON 500 for a fault."""

import asyncio
import io
import json

import numpy as np
import pytest

from virchow_rt.errors import InputError
from virchow_rt.kernels.resize import MAX_ASPECT, check_aspect, resize_tile
from virchow_rt.serve.replica import Pending, Ticket
from virchow_rt.serve.requests import (
    JSON_COST,
    MAX_JSON_HEADER,
    BadRequest,
    decode_cost,
    length_header,
    parse_infer,
    parse_upload,
)


def _request(shape, data, name="tiles", **params):
    spec = {"name": name, "shape": shape, "datatype": "UINT8", "data": data}
    if params:
        spec = {"name": name, "shape": shape, "datatype": "UINT8", "parameters": params}
    return json.dumps({"inputs": [spec]}).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([True, 1, 2], r"value True \(bool\)"),  # numpy makes it 1
        ([2**64 - 1, 1, 2], r"value 18446744073709551615 \(int\).*0\.\.255"),  # not "float64 values"
        ([0, 1, 256], r"value 256 \(int\) at 2"),
        ([0.0, 1, 2], r"value 0\.0 \(float\)"),
        ([None, 1, 2], r"value None"),
        ([[0, 1, 2]], r"not nested as shape \[1, 1, 1, 3\]"),
        ([0, 1], r"holds 2 values; shape \[1, 1, 1, 3\] needs 3"),
    ],
    ids=["bool", "2**64-1", "256", "float", "null", "badly-nested", "too-few"],
)
def test_json_data_is_integers_0_to_255_only(data, reason):
    with pytest.raises(BadRequest, match=reason) as caught:
        parse_infer(_request([1, 1, 1, 3], data), None, 4)
    assert caught.value.status == 400


def test_json_data_flat_or_nested_gives_the_same_tiles():
    tiles = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    flat, _ = parse_infer(bytearray(_request([2, 2, 3, 3], tiles.ravel().tolist())), None, 4)
    nested, binary = parse_infer(_request([2, 2, 3, 3], tiles.tolist()), None, 4)
    np.testing.assert_array_equal(flat, tiles)
    np.testing.assert_array_equal(nested, tiles)
    assert not binary


@pytest.mark.parametrize(
    ("body", "header", "reason"),
    [
        (_request([1, 1, 1, 3], [0, 1, 2], name="pixels"), None, 'input \'pixels\': .*one input is "tiles"'),
        (_request([1, 1, 1, 3], None, binary_data_size="3"), 1, "binary_data_size '3' is not an integer"),
        (_request([1, 0, 8, 3], []), None, "a 0x8 px tile in one request: a tile is at least 1 px a side"),
        (_request([1, 1, 4096, 3], []), None, f"1x4096 px tile .*at most {MAX_ASPECT}x its short side"),
        (b"{}" + b" " * MAX_JSON_HEADER, MAX_JSON_HEADER + 1, "JSON part of a binary request is 1 to 65536"),
    ],
    ids=["input-name", "binary-size-string", "0-px-side", "1x4096-tile", "json-part-too-long"],
)  # fmt: skip
def test_misleading_or_costly_requests_are_named(body, header, reason):
    if header == 1:
        header = len(body)
    with pytest.raises(BadRequest, match=reason) as caught:
        parse_infer(body, header, 8)
    assert caught.value.status == 400  # not 413 "cut larger images"


def test_an_output_other_than_the_embedding_is_refused():
    body = json.loads(_request([1, 1, 1, 3], [0, 1, 2]))
    body["outputs"] = [{"name": "patch_tokens"}]
    with pytest.raises(BadRequest, match="output 'patch_tokens': .*one output is \"embedding\""):
        parse_infer(json.dumps(body).encode(), None, 4)


@pytest.mark.parametrize(
    "value",
    ["²", "9" * 5000, "1e3", " 12", "-1", "1" * 13],
    ids=["superscript-2", "5000-digits", "exponent", "space", "negative", "13-digits"],
)
def test_length_headers_are_ascii_digits_only(value):
    with pytest.raises(BadRequest, match="is not a byte count") as caught:
        length_header(value, "Inference-Header-Content-Length")
    assert caught.value.status == 400 and len(str(caught.value)) < 200
    assert length_header("123", "Content-Length") == 123 and length_header(None, "Content-Length") is None


def _npy(shape, data=b""):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def test_npy_shapes_of_booleans_and_thin_tiles_are_refused():
    with pytest.raises(BadRequest, match=r"\.npy of uint8 \(True, 1, 1, 3\)"):
        parse_upload(_npy((True, 1, 1, 3), b"\0" * 3), "", 4)
    with pytest.raises(BadRequest, match="1x4096 px tile in the .npy"):
        parse_upload(_npy((8, 1, 4096, 3), b"\0" * 8 * 4096 * 3), "", 8)  # 98 KB that cost ~880 MB


def test_an_images_decoding_is_counted_from_its_header():
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (300, 200)).save(png, format="PNG")
    body = bytearray(png.getvalue())
    assert decode_cost(body, "") >= 300 * 200 * 3 * 2  # the decoded pixels and the array made of them
    assert decode_cost(_npy((1, 8, 8, 3), b"\0" * 192), "") == 0  # read in place
    assert parse_upload(body, "image/png", 1).shape == (1, 200, 300, 3)
    thin = io.BytesIO()
    Image.new("RGB", (4000, 2)).save(thin, format="PNG")
    with pytest.raises(BadRequest, match="2x4000 px tile in the image"):
        decode_cost(thin.getvalue(), "")


def test_check_aspect_bounds_what_the_cpu_resize_allocates():
    check_aspect(224, 224 * MAX_ASPECT)
    with pytest.raises(InputError, match=f"a 1x{MAX_ASPECT + 1} px tile: .*cut the image into square tiles"):
        check_aspect(1, MAX_ASPECT + 1)
    with pytest.raises(InputError, match="at most 4x its short side"):  # before the 917,504 px intermediate
        resize_tile(np.zeros((1, 4096, 3), np.uint8), 224)
    assert resize_tile(np.zeros((100, 400, 3), np.uint8), 224).shape == (224, 224, 3)


def test_a_ticket_counts_and_gives_back_and_names_what_the_bytes_are_for():
    pending = Pending(100)
    ticket = Ticket(pending)
    ticket.take(60)
    ticket.give_back(50)
    assert pending.held == 10 and ticket.taken == 10
    with pytest.raises(BadRequest, match=r"a request of 110 bytes \(parsing JSON\) is more") as caught:
        ticket.take(100, "parsing JSON")
    assert caught.value.status == 413
    other = Ticket(pending)
    other.take(85)
    with pytest.raises(BadRequest, match="busy") as caught:
        ticket.take(10)
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
    ticket.release()
    other.release()
    assert pending.held == 0
    assert JSON_COST >= 20  # "[],[],..." is a list object per 3 bytes


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"replicas": -1}, "--replicas -1: give 1 or more"),
        ({"replicas": 0}, "--replicas 0: give 1 or more"),
        ({"max_pending_mb": float("inf")}, "--max-pending-mb inf: give a finite number above 0"),
        ({"max_wait_ms": float("nan")}, "--max-wait-ms nan: give a finite number"),
        ({"body_timeout_s": 0.0}, "--body-timeout-s 0.0: give a finite number above 0"),
        ({"max_batch": 0}, "--max-batch 0: give 1 or more"),
    ],
)
def test_limits_the_server_cannot_run_with_are_one_line(limits, reason):
    from virchow_rt.serve.http import check_limits

    given = {"max_batch": 8, "max_wait_ms": 5.0, "max_pending_mb": 64.0, "replicas": None,
             "body_timeout_s": 30.0, **limits}  # fmt: skip
    with pytest.raises(InputError, match=reason):
        check_limits(**given)


def test_a_fault_of_the_server_is_a_json_500_not_a_traceback():
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'virchow-rt[serve]'")
    from virchow_rt.serve.guards import CatchAll

    async def broken(scope, receive, send):
        raise ZeroDivisionError("planted")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/v2/models/m/config", "headers": []}
    asyncio.run(CatchAll(broken)(scope, receive, send))
    start, body = sent[0], json.loads(sent[1]["body"])
    assert start["status"] == 500 and (b"content-type", b"application/json") in start["headers"]
    assert body["error"].startswith("GET /v2/models/m/config: the server failed (ZeroDivisionError)")
