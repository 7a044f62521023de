"""virchow_rt.serve.client without a server: bad tiles and an unreachable server are one-line errors."""

import socket

import numpy as np
import pytest

from virchow_rt.errors import InputError
from virchow_rt.serve import client


def test_bad_tiles_and_no_server_are_one_line_errors():
    with pytest.raises(InputError, match=r"give uint8 \(N, H, W, 3\)"):
        client.embed("127.0.0.1:1", np.zeros((2, 8, 8), np.float32))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(client.ServerError, match="cannot reach .*is `virchow-rt serve` running"):
        client.embed(f"127.0.0.1:{port}", np.zeros((1, 8, 8, 3), np.uint8), timeout=5)
