"""One ``serve`` replica without Ray: how it merges the requests ``serve.batch`` hands it, splits the answer.

``tests/test_serve.py`` drives the same code through a real Ray Serve server; these run in milliseconds, so
that mutation testing of ``virchow_rt/serve/replica.py`` can afford them on every mutant.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import virchow_rt.embed
from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo
from virchow_rt.serve.replica import Pending, Ticket, TileEmbedderServer, _text
from virchow_rt.serve.requests import BadRequest

S, W = 28, 4  # tile size, width (embedding 2·W)


class Probe(Backend):
    """Each tile's embedding is a function of its own pixels only; a tile whose first pixel is 13 fails."""

    name = "probe-cpu"

    def __init__(self) -> None:
        self.info = ModelInfo("virchow2g-mini-tiny", 2 * W, W, S, "fp32", True, "random")
        self.calls: list[int] = []
        self.proj = np.random.default_rng(7).standard_normal((3, 2 * W)).astype(np.float32)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.shape[1:] == (S, S, 3), tiles.shape
        self.calls.append(len(tiles))
        if (tiles[:, 0, 0, 0] == 13).any():
            raise RuntimeError("poisoned tile")
        means = tiles.reshape(len(tiles), -1, 3).mean(axis=1, dtype=np.float64)  # (B, 3)
        return (means @ self.proj + np.arange(2 * W)).astype(np.float32)  # (B, 2W)


def _server(max_batch: int = 16, max_wait_s: float = 0.05) -> tuple[TileEmbedderServer, Probe]:
    probe = Probe()
    return TileEmbedderServer(probe, "auto", "tiny", max_batch, max_wait_s), probe  # type: ignore[arg-type]


def _tiles(n: int, size: int = S, seed: int = 0) -> np.ndarray:
    tiles = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    tiles[:, 0, 0, 0] = 200  # never the poisoned value
    return tiles


def _alone(tiles: np.ndarray) -> np.ndarray:
    """What embedding ``tiles`` by themselves in a fresh replica gives."""
    server, _ = _server()
    return server.embedder.embed(tiles)


def test_requests_of_one_tile_size_make_one_model_batch_and_each_gets_its_own_rows():
    server, _ = _server()
    requests = [_tiles(1, seed=1), _tiles(3, seed=2), _tiles(2, seed=3)]
    answers = asyncio.run(server._embed_batch(requests))
    assert dict(server.batches) == {6: 1}  # one model call of all six tiles
    assert len(answers) == 3
    for tiles, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(answer, _alone(tiles), rtol=1e-6, atol=1e-6)


def test_requests_of_other_tile_sizes_are_batched_apart_and_answered_in_request_order():
    server, probe = _server()
    requests = [_tiles(2, seed=1), _tiles(1, 40, seed=2), _tiles(3, seed=3), _tiles(2, 40, seed=4)]
    answers = asyncio.run(server._embed_batch(requests))
    assert dict(server.batches) == {5: 1, 3: 1}  # 28 px: 2 + 3 tiles; 40 px (resized): 1 + 2
    assert sorted(probe.calls) == [3, 5]
    for tiles, answer in zip(requests, answers, strict=True):
        assert answer.shape == (len(tiles), 2 * W)
        np.testing.assert_allclose(answer, _alone(tiles), rtol=1e-6, atol=1e-6)


def test_a_failing_group_answers_each_of_its_requests_with_the_error_and_spares_the_others():
    server, _ = _server()
    poisoned = np.concatenate([np.full((1, 40, 40, 3), 13, np.uint8), _tiles(1, 40, seed=5)])
    requests = [poisoned, _tiles(2, seed=1), _tiles(1, 40, seed=6), _tiles(1, seed=7)]  # failing group first
    answers = asyncio.run(server._embed_batch(requests))
    assert isinstance(answers[0], RuntimeError) and answers[2] is answers[0]  # both 40-px requests
    for i in (1, 3):  # the group after it still ran
        np.testing.assert_allclose(answers[i], _alone(requests[i]), rtol=1e-6, atol=1e-6)
    assert dict(server.batches) == {3: 2}  # the failed call is counted too


def test_tiles_of_one_width_and_another_height_are_not_merged():
    server, _ = _server()
    requests = [_tiles(2, 40, seed=1), np.ascontiguousarray(_tiles(1, 40, seed=2)[:, :30])]  # 40×40, 30×40
    answers = asyncio.run(server._embed_batch(requests))
    assert dict(server.batches) == {2: 1, 1: 1}
    for tiles, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(answer, _alone(tiles), rtol=1e-6, atol=1e-6)


def test_embed_raises_its_own_failure_and_returns_its_rows():
    server, _ = _server()

    async def one(tiles):  # what serve.batch does for a single request: hands it its own answer
        answers = await TileEmbedderServer._embed_batch(server, [tiles])
        return answers[0]

    server._embed_batch = one
    good = _tiles(2, seed=8)
    np.testing.assert_allclose(asyncio.run(server.embed(good)), _alone(good), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="poisoned"):
        asyncio.run(server.embed(np.full((1, S, S, 3), 13, np.uint8)))


def test_metadata_and_config_describe_the_model_as_triton_does():
    server, _ = _server(max_batch=12, max_wait_s=0.0125)
    facts = {"variant": "virchow2g-mini-tiny", "pooling": "cls_mean", "precision": "fp32",
             "random_weights": True, "tile_size": S, "max_batch": 12}  # fmt: skip
    assert server.facts() == facts
    meta = server.metadata()
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "virchow-rt/probe-cpu"
    assert meta["inputs"] == [{"name": "tiles", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 2 * W]}]
    assert meta["parameters"] == facts
    config = server.config()
    assert config["name"] == "tiny" and config["backend"] == "probe-cpu" and config["max_batch_size"] == 12
    assert config["platform"] == "virchow-rt"
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 12500}
    assert config["input"] == [
        {"name": "tiles", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [-1, -1, 3]}
    ]
    assert config["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [2 * W]}]
    strings = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert strings == {"variant": "virchow2g-mini-tiny", "pooling": "cls_mean", "precision": "fp32",
                       "random_weights": "true", "tile_size": str(S), "max_batch": "12"}  # fmt: skip


def test_the_replica_opens_its_model_as_told_and_starts_idle(monkeypatch):
    opened = []

    class Recorder:
        def __init__(self, model, **options):
            opened.append((model, options))
            self.info = Probe().info

    monkeypatch.setattr(virchow_rt.embed, "Embedder", Recorder)
    server = TileEmbedderServer("model.onnx", "tensorrt", "m", 8, 0.01, max_pending_bytes=1234)
    TileEmbedderServer("engine.plan", "tensorrt", "m", 8, 0.01, allow_engine_host_code=True)
    assert opened == [  # an engine's host code runs only when asked for
        ("model.onnx", {"backend": "tensorrt", "allow_engine_host_code": False}),
        ("engine.plan", {"backend": "tensorrt", "allow_engine_host_code": True}),
    ]
    assert (server.pending.limit, server.pending.held, server.in_flight) == (1234, 0, 0)
    assert not server.batches


def test_config_gives_the_queue_delay_in_microseconds_and_parameters_as_triton_strings():
    server, _ = _server(max_wait_s=3.0)
    assert server.config()["dynamic_batching"] == {"max_queue_delay_microseconds": 3_000_000}
    assert (_text(True), _text(False), _text("ViT-L"), _text(224)) == ("true", "false", "ViT-L", "224")


def test_pending_admits_up_to_its_limit_and_a_ticket_adds_up_what_it_took():
    pending = Pending(100)
    ticket = Ticket(pending)
    ticket.take(30)
    ticket.take(20)
    assert ticket.taken == 50 and pending.held == 50
    Ticket(pending).take(50)  # exactly full is allowed
    assert pending.held == 100
    with pytest.raises(BadRequest, match="busy") as caught:
        Ticket(pending).take(1)
    assert caught.value.status == 503
    ticket.release()
    ticket.release()  # twice gives back nothing more
    assert ticket.taken == 0 and pending.held == 50
    alone = Ticket(Pending(100))
    alone.take(100)  # a request of exactly the limit fits
    with pytest.raises(BadRequest, match=r"^a request of 101 bytes is more than this server holds") as caught:
        alone.take(1)  # no reason given: none said
    assert caught.value.status == 413
