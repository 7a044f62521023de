"""What a request to ``virchow-rt serve`` says about itself, checked before memory is spent on it.

A KServe v2 infer request (JSON ``data`` or the binary-data extension) and a ``POST /embed`` body (a
``.npy`` batch or one image) become uint8 tiles ``(N, H, W, 3)``, or a :class:`BadRequest` with its HTTP
status and a one-line reason: counts, sides and byte sizes are bounded from the header (the JSON shape,
the ``.npy`` header, the image header) before anything is decoded. numpy only (Pillow for images, lazily).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from virchow_rt.errors import InputError
from virchow_rt.serve.client import INFERENCE_HEADER

#: a tile is at most this many pixels a side (a 13000 px square PNG is 160 KB, and 500 MB decoded)
MAX_TILE_SIDE = 4096
#: image formats ``POST /embed`` decodes (Pillow's other plugins are not offered to strangers)
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")
_CURL = "e.g. curl --data-binary @tile.png http://HOST:PORT/embed"


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


def _check_sides(count: int, height: int, width: int, max_tiles: int, what: str) -> None:
    """1 to ``max_tiles`` tiles of 1 to :data:`MAX_TILE_SIDE` px a side."""
    if not 1 <= count <= max_tiles:
        raise BadRequest(f"{count} tiles in {what}: send 1 to {max_tiles} (the server's --max-batch)")
    if not (1 <= height <= MAX_TILE_SIDE and 1 <= width <= MAX_TILE_SIDE):
        raise BadRequest(
            f"tiles of {height}x{width} px in {what}: a tile is 1 to {MAX_TILE_SIDE} px a side; cut larger "
            "images into tiles first (virchow-rt slides does whole slides)",
            413,
        )


def parse_infer(body: bytes, header_length: int | None, max_tiles: int) -> tuple[np.ndarray, bool]:
    """A KServe v2 infer request -> (uint8 tiles, whether the answer should be binary)."""
    try:
        head = json.loads(body[:header_length] if header_length is not None else body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise BadRequest(f"the request is not KServe v2 JSON ({_short(str(err), 120)})") from None
    inputs = head.get("inputs") if isinstance(head, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest('give exactly one input, "tiles": UINT8 [N, H, W, 3]')
    spec = inputs[0]
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
        raw = body[header_length:]
        if type(binary) is not int or len(raw) != binary or binary != size:
            raise BadRequest(
                f"binary input of {len(raw)} bytes (binary_data_size {_short(binary)}) for shape {shape}: "
                f"{size} bytes expected"
            )
        tiles = np.frombuffer(raw, np.uint8).reshape(shape)
    else:
        tiles = _json_tiles(spec.get("data"), shape, size)
    outputs = head.get("outputs") if isinstance(head.get("outputs"), list) else []
    binary_out = bool(_params(head).get("binary_data_output")) or any(
        _params(o).get("binary_data") for o in outputs if isinstance(o, dict)
    )
    return np.ascontiguousarray(tiles), binary_out


def _json_tiles(data: Any, shape: list[int], size: int) -> np.ndarray:
    """JSON ``data`` (flat or nested lists of integers 0..255) -> uint8 tiles of ``shape``."""
    if not isinstance(data, list):
        raise BadRequest('the input has no "data" list (or binary_data_size): give the tile bytes')
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged, or nested too deep
        raise BadRequest(f"input data does not hold {size} integers for shape {shape}") from None
    if values.dtype.kind not in "iu":  # floats (1e400 is inf), huge ints (object), strings, booleans
        raise BadRequest(f"input data of {values.dtype.name} values: UINT8 data are integers 0..255")
    if values.size != size:
        raise BadRequest(f"input data holds {values.size} integers; shape {shape} needs {size}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadRequest("input data out of the UINT8 range 0..255")
    return values.astype(np.uint8).reshape(shape)


def _params(part: dict[str, Any]) -> dict[str, Any]:
    """A request part's ``parameters`` (an empty dict when missing or not an object)."""
    params = part.get("parameters")
    return params if isinstance(params, dict) else {}


def parse_upload(body: bytes, content_type: str, max_tiles: int) -> np.ndarray:
    """The ``POST /embed`` body: a ``.npy`` uint8 batch (N, H, W, 3) or one image file -> uint8 tiles."""
    if not body:
        raise BadRequest(f"the body is empty: send a .npy batch or one PNG/JPEG tile as the body, {_CURL}")
    if content_type.lower().startswith("multipart/"):
        raise BadRequest(
            f"a multipart form upload (curl -F) is not read: send the file itself as the body, {_CURL}"
        )
    if body.startswith(b"\x93NUMPY"):
        return _read_npy(body, max_tiles)
    return _read_image(body)


def _read_npy(body: bytes, max_tiles: int) -> np.ndarray:
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
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
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


def _read_image(body: bytes) -> np.ndarray:
    """One PNG/JPEG/TIFF tile -> (1, H, W, 3) uint8; its size is read from the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            _check_sides(1, height, width, 1, "the image")
            return np.asarray(image.convert("RGB"))[None]
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
