"""What a request to ``virchow-rt serve`` says about itself, checked before memory is spent on it.

A KServe v2 infer request (JSON ``data`` or the binary-data extension) and a ``POST /embed`` body (a
``.npy`` batch or one image) become uint8 tiles ``(N, H, W, 3)``, or a :class:`BadRequest` with its HTTP
status and a one-line reason. Tile counts, sides and byte sizes are bounded from what comes first (the
``.npy`` header, the image header, the binary request's JSON part) before the tiles are decoded; a JSON
request is parsed whole, so the server caps its body much lower (:data:`JSON_BODY_LIMIT`) and counts
:data:`JSON_COST` bytes of memory per body byte for it. These functions are blocking (the server runs them
in a thread). numpy only (Pillow for images, lazily).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import numpy as np

from virchow_rt.errors import InputError
from virchow_rt.kernels.resize import check_aspect
from virchow_rt.serve.client import INFERENCE_HEADER

#: a tile is at most this many pixels a side (a 13000 px square PNG is 160 KB, and 500 MB decoded)
MAX_TILE_SIDE = 4096
#: image formats ``POST /embed`` decodes (Pillow's other plugins are not offered to strangers)
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")
#: the JSON part of a binary-data request (its ``Inference-Header-Content-Length``) is at most this long
MAX_JSON_HEADER = 64 << 10
#: a request that is JSON through and through (tiles as ``data`` lists) is at most this many bytes: parsed,
#: it costs up to :data:`JSON_COST` times its size (``[],[],...``: a list object per 3 bytes)
JSON_BODY_LIMIT = 8 << 20
JSON_COST = 25
_CURL = "e.g. curl --data-binary @tile.png http://HOST:PORT/embed"
_BINARY = "send the tiles with the binary-data extension (tritonclient: binary_data=True; client.embed does)"


class BadRequest(InputError):
    """A request the server refuses, with its HTTP status (and headers, e.g. ``Retry-After``)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a request's values are echoed, never in full)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}..."


def length_header(value: str | None, name: str) -> int | None:
    """A byte-count header (``Content-Length``, ``Inference-Header-Content-Length``): ASCII digits only
    (``str.isdigit`` takes ``"²"``, ``int`` refuses it), at most 12 of them; None when absent."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,12}", value):
        raise BadRequest(f"{name} {_short(value, 40)} is not a byte count (1 to 12 digits)")
    return int(value)


def _check_sides(count: int, height: int, width: int, max_tiles: int, what: str) -> None:
    """1 to ``max_tiles`` tiles of 1 to :data:`MAX_TILE_SIDE` px a side, not too thin to resize."""
    if not 1 <= count <= max_tiles:
        raise BadRequest(f"{count} tiles in {what}: send 1 to {max_tiles} (the server's --max-batch)")
    if height > MAX_TILE_SIDE or width > MAX_TILE_SIDE:
        raise BadRequest(
            f"tiles of {height}x{width} px in {what}: a tile is 1 to {MAX_TILE_SIDE} px a side; cut larger "
            "images into tiles first (virchow-rt slides does whole slides)",
            413,
        )
    try:
        check_aspect(height, width, f"tile in {what}")
    except InputError as err:
        raise BadRequest(str(err)) from None


def parse_infer(
    body: bytes | bytearray, header_length: int | None, max_tiles: int
) -> tuple[np.ndarray, bool]:
    """A KServe v2 infer request -> (uint8 tiles, whether the answer should be binary).

    ``header_length``: the ``Inference-Header-Content-Length`` (the JSON part's length; None: all JSON)."""
    if header_length is not None and not 0 < header_length <= min(MAX_JSON_HEADER, len(body)):
        raise BadRequest(
            f"{INFERENCE_HEADER} {header_length}: the JSON part of a binary request is 1 to "
            f"{MAX_JSON_HEADER} bytes and within the body ({len(body)} bytes)"
        )
    try:
        head = json.loads(body[:header_length] if header_length is not None else body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise BadRequest(f"the request is not KServe v2 JSON ({_short(str(err), 120)})") from None
    inputs = head.get("inputs") if isinstance(head, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest('give exactly one input, "tiles": UINT8 [N, H, W, 3]')
    spec = inputs[0]
    if spec.get("name") != "tiles":
        raise BadRequest(f'input {_short(spec.get("name"))}: this model\'s one input is "tiles"')
    shape, dtype = spec.get("shape"), spec.get("datatype")
    if dtype != "UINT8":
        raise BadRequest(f"input datatype {_short(dtype)}: tiles are UINT8 [N, H, W, 3] (RGB bytes)")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and all(type(v) is int for v in shape)  # not bool, not float
        and shape[3] == 3
    ):
        raise BadRequest(f"input shape {_short(shape)}: tiles are [N, H, W, 3]")
    _check_sides(shape[0], shape[1], shape[2], max_tiles, "one request")
    size = shape[0] * shape[1] * shape[2] * 3  # bounded by the checks above
    binary = _params(spec).get("binary_data_size")
    if binary is not None:
        if header_length is None:
            raise BadRequest(f"binary_data_size without the {INFERENCE_HEADER} header")
        if type(binary) is not int:
            raise BadRequest(
                f"binary_data_size {_short(binary)} is not an integer: give the tiles' byte count"
            )
        raw = memoryview(body)[header_length:]
        if len(raw) != binary or binary != size:
            raise BadRequest(
                f"binary input of {len(raw)} bytes (binary_data_size {binary}) for shape {shape}: "
                f"{size} bytes expected"
            )
        tiles = np.frombuffer(raw, np.uint8).reshape(shape)
    else:
        tiles = _json_tiles(spec.get("data"), shape, size)
    outputs = head.get("outputs") if isinstance(head.get("outputs"), list) else []
    for wanted in outputs:
        if isinstance(wanted, dict) and wanted.get("name", "embedding") != "embedding":
            raise BadRequest(f'output {_short(wanted.get("name"))}: this model\'s one output is "embedding"')
    binary_out = bool(_params(head).get("binary_data_output")) or any(
        _params(o).get("binary_data") for o in outputs if isinstance(o, dict)
    )
    return np.ascontiguousarray(tiles), binary_out


def _json_tiles(data: Any, shape: list[int], size: int) -> np.ndarray:
    """JSON ``data`` (flat, or nested as ``shape``; integers 0..255, not booleans) -> uint8 tiles."""
    if not isinstance(data, list):
        raise BadRequest('the input has no "data" list (or binary_data_size): give the tile bytes')
    values: list[Any] = data
    if data and type(data[0]) is list:  # nested: each level a list of the shape's length, down to values
        values = [data]
        for length in shape:
            if not all(type(v) is list and len(v) == length for v in values):
                raise BadRequest(f"input data is not nested as shape {shape} (nor flat, {size} values)")
            values = list(chain.from_iterable(values))
    if len(values) != size:
        raise BadRequest(f"input data holds {len(values)} values; shape {shape} needs {size}")
    bad = next((i for i, v in enumerate(values) if type(v) is not int or not 0 <= v <= 255), None)
    if bad is not None:  # a float, a boolean (numpy would take True as 1), null, a list, out of range
        value = values[bad]
        raise BadRequest(
            f"input data value {_short(value)} ({type(value).__name__}) at {bad}: UINT8 data are integers "
            "0..255"
        )
    return np.array(values, np.uint8).reshape(shape)


def _params(part: dict[str, Any]) -> dict[str, Any]:
    """A request part's ``parameters`` (an empty dict when missing or not an object)."""
    params = part.get("parameters")
    return params if isinstance(params, dict) else {}


def _check_upload(body: bytes | bytearray, content_type: str) -> None:
    if not body:
        raise BadRequest(f"the body is empty: send a .npy batch or one PNG/JPEG tile as the body, {_CURL}")
    if content_type.lower().startswith("multipart/"):
        raise BadRequest(
            f"a multipart form upload (curl -F) is not read: send the file itself as the body, {_CURL}"
        )


def decode_cost(body: bytes | bytearray, content_type: str) -> int:
    """Bytes of memory :func:`parse_upload` spends beyond the body: for an image, from its header (pixels at
    up to 4 bytes decoded, then RGB, then the array); 0 for a ``.npy`` (read in place). Refuses what
    :func:`parse_upload` refuses from the header (too large, not an image)."""
    _check_upload(body, content_type)
    if body.startswith(b"\x93NUMPY"):
        return 0
    with _open_image(body) as image:
        width, height = image.size
        return width * height * 10


def parse_upload(body: bytes | bytearray, content_type: str, max_tiles: int) -> np.ndarray:
    """The ``POST /embed`` body: a ``.npy`` uint8 batch (N, H, W, 3) or one image file -> uint8 tiles."""
    _check_upload(body, content_type)
    if body.startswith(b"\x93NUMPY"):
        return _read_npy(body, max_tiles)
    with _open_image(body) as image:
        return np.asarray(image.convert("RGB"))[None]


def _read_npy(body: bytes | bytearray, max_tiles: int) -> np.ndarray:
    """A ``.npy`` body, its header checked before any array is made (never ``np.load``: it allocates
    what the header declares)."""
    stream = io.BytesIO(body)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version}; save it with numpy.save")
    except (ValueError, SyntaxError) as err:
        raise BadRequest(f"the .npy body cannot be read ({_short(str(err), 120)})") from None
    if dtype != np.uint8 or len(shape) != 4 or any(type(v) is not int for v in shape) or shape[3] != 3:
        raise BadRequest(f".npy of {dtype} {shape}: send uint8 (N, H, W, 3) RGB tiles")
    if shape[0] == 0:
        raise BadRequest("0 tiles in the .npy: send 1 or more")
    _check_sides(shape[0], shape[1], shape[2], max_tiles, "the .npy")
    offset = stream.tell()
    expected = shape[0] * shape[1] * shape[2] * 3
    if len(body) - offset != expected:
        raise BadRequest(f"the .npy declares {shape} ({expected} bytes) but holds {len(body) - offset} bytes")
    tiles = np.frombuffer(body, np.uint8, offset=offset).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(tiles)


@contextmanager
def _open_image(body: bytes | bytearray) -> Iterator[Any]:
    """One PNG/JPEG/TIFF tile, opened (its header read, its size checked, not decoded); errors raised while
    it is open or decoded become one-line :class:`BadRequest` s."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            _check_sides(1, height, width, 1, "the image")
            yield image
    except Image.DecompressionBombError:
        raise BadRequest(
            f"the image is too large to be a tile (over {MAX_TILE_SIDE} px a side)", 413
        ) from None
    except UnidentifiedImageError:
        raise BadRequest(
            "the body is neither a .npy batch nor a PNG, JPEG or TIFF image: send the file's bytes "
            f"unchanged, {_CURL} (curl -d alters binary files)"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:  # a truncated or corrupt image
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the body", str(err))  # no Python objects
        raise BadRequest(f"the image cannot be decoded ({_short(reason, 120)}); send a whole file") from None
