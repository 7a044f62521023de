"""The Python API: slide tiles and embeddings equal reading and embedding the same tiles directly."""

from __future__ import annotations

from concurrent import futures

import numpy as np
import pytest
from slide_helpers import FakeBackend, cosine_rows, resize_square

from virchow_rt.errors import InputError
from virchow_rt.slides import (
    complete_groups,
    embed_slide,
    iter_embeddings,
    iter_tiles,
    open_slide,
    tile_grid,
)
from virchow_rt.slides import tiles as tiles_module

tifffile = pytest.importorskip("tifffile")


def _direct(synth_path, coords, size0, backend):
    """Read the tiles ourselves from level 0 (tifffile), resize like timm, embed with the same backend."""
    level0 = tifffile.imread(synth_path, key=0)
    s = backend.info.tile_size
    tiles = np.stack([resize_square(level0[y : y + size0, x : x + size0], s) for x, y in coords])
    return backend.run(np.ascontiguousarray(tiles))


def test_features_equal_direct_embedding_at_level0(make_slide, fake_backend):
    synth = make_slide()
    result = embed_slide(synth.path, fake_backend, mpp=0.5, batch_size=7, workers=2)
    n = len(result.coords)
    assert n >= 10 and result.features.shape == (n, 48) and result.features.dtype == np.float32
    np.testing.assert_array_equal(result.coords, tile_grid(open_slide(synth.path)).coords)
    direct = _direct(synth.path, result.coords, 224, FakeBackend())
    np.testing.assert_allclose(result.features, direct, rtol=1e-5, atol=1e-5)  # same pixels, same model
    assert cosine_rows(result.features, direct).min() > 0.99999
    # and the features are informative: different tissue tiles are not all alike
    assert cosine_rows(result.features[:-1], result.features[1:]).min() < 0.99
    assert result.read_stats.tiles == n and result.read_stats.failed == 0 and result.embed_s > 0


def test_features_from_a_coarser_level_match_level0_resized(make_slide):
    synth = make_slide("scan40x.tif", 2240, 1792, ((300, 250, 1500, 1200),), mpp=0.25)
    backend = FakeBackend()
    result = embed_slide(synth.path, backend, mpp=0.5, workers=2)
    assert result.grid.level == 1 and result.grid.patch_size_level0 == 448
    direct = _direct(synth.path, result.coords, 448, FakeBackend())
    # level 1 was box-downsampled when written; the reference resizes level 0 bicubically: close, not equal
    assert cosine_rows(result.features, direct).min() > 0.999


def test_iter_tiles_batches_in_grid_order(make_slide):
    synth = make_slide()
    batches = list(iter_tiles(synth.path, batch_size=5, workers=2))
    coords = np.concatenate([b.coords for b in batches])
    np.testing.assert_array_equal(coords, tile_grid(open_slide(synth.path)).coords)
    assert [len(b) for b in batches[:-1]] == [5] * (len(batches) - 1) and 1 <= len(batches[-1]) <= 5
    for batch in batches:
        assert batch.tiles.dtype == np.uint8 and batch.tiles.shape[1:] == (224, 224, 3)
        for (x, y), tile in zip(batch.coords, batch.tiles, strict=True):
            np.testing.assert_array_equal(tile, synth.crop(x, y, 224))


def test_iter_embeddings_and_cls_pooling(make_slide):
    synth = make_slide()
    full = embed_slide(synth.path, FakeBackend())
    parts = list(iter_embeddings(synth.path, FakeBackend(), pooling="cls", batch_size=4))
    coords = np.concatenate([c for c, _ in parts])
    cls = np.concatenate([f for _, f in parts])
    np.testing.assert_array_equal(coords, full.coords)
    assert cls.shape == (len(coords), 24)  # the class token alone is the first D = width columns
    np.testing.assert_allclose(
        cls, full.features[:, :24], rtol=1e-5, atol=1e-4
    )  # other batch sizes: float order


def test_backend_max_batch_is_respected(make_slide):
    backend = FakeBackend(max_batch=4)
    result = embed_slide(make_slide().path, backend, batch_size=16)
    assert max(backend.batches) == 4 and sum(backend.batches) == len(result.coords)


def test_model_tile_size_differs_from_tile_size(make_slide):
    # 448-px tiles at 0.5 µm/px are resized to the model's 224 px in the reading threads
    synth = make_slide()
    result = embed_slide(synth.path, FakeBackend(), tile_size=448, min_tissue=0.3)
    assert result.grid.patch_size_level0 == 448 and len(result.coords) >= 2
    direct = _direct(synth.path, result.coords, 448, FakeBackend())
    assert cosine_rows(result.features, direct).min() > 0.99999


def test_unreadable_tile_fails_or_is_skipped(make_slide, monkeypatch):
    synth = make_slide()
    coords = tile_grid(open_slide(synth.path)).coords
    bad = tuple(int(v) for v in coords[3])
    real = tiles_module.read_tile

    def flaky(slide, x, y, size0, level, out_size, *fill):
        if (x, y) == bad:
            raise InputError(f"slide {slide.path.name}: corrupt JPEG tile")
        return real(slide, x, y, size0, level, out_size, *fill)

    monkeypatch.setattr(tiles_module, "PROCESSES_BY_DEFAULT", False)  # patched in this process only
    monkeypatch.setattr(tiles_module, "read_tile", flaky)
    with pytest.raises(InputError, match=rf"slide.tif: tile at level-0 \({bad[0]}, {bad[1]}\).*corrupt JPEG"):
        embed_slide(synth.path, FakeBackend())
    result = embed_slide(synth.path, FakeBackend(), skip_errors=True, batch_size=4)
    assert len(result.coords) == len(coords) - 1 and bad not in {tuple(c) for c in result.coords}
    assert result.read_stats.failed == 1 and result.read_stats.errors[0]["x"] == bad[0]
    np.testing.assert_allclose(
        result.features, _direct(synth.path, result.coords, 224, FakeBackend()), rtol=1e-5, atol=1e-5
    )  # float32 matmuls of other batch sizes round differently: ~1e-6 relative


def test_complete_groups_drops_groups_with_a_missing_member():
    rows = np.arange(12, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # (12, 2)
    present = np.array(
        [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    )  # index 5 was skipped: group 1 (3, 4, 5) is incomplete
    stream = [(present[i : i + 4], rows[present[i : i + 4]]) for i in range(0, len(present), 4)]
    groups = list(complete_groups(stream, 3))
    ids = np.concatenate([g for g, _ in groups])
    values = np.concatenate([v for _, v in groups])
    np.testing.assert_array_equal(ids, [0, 2, 3])
    assert values.shape == (3, 3, 2)
    np.testing.assert_array_equal(values[:, :, 0], [[0, 1, 2], [6, 7, 8], [9, 10, 11]])


def test_reader_threads_run_ahead_with_bounded_memory(make_slide, monkeypatch):
    synth = make_slide()
    calls = []
    jobs: list[futures.Future] = []  # every read job the reader submitted, in order
    real_read, real_threads = tiles_module.read_tile, tiles_module.TileReader._threads

    def counting(*args):
        calls.append(args[1:3])
        return real_read(*args)

    def recording(self, *args):
        submit, close, again = real_threads(self, *args)

        def submit_and_keep(rows):
            jobs.append(submit(rows))
            return jobs[-1]

        return submit_and_keep, close, again

    monkeypatch.setattr(tiles_module, "PROCESSES_BY_DEFAULT", False)  # patched in this process only
    monkeypatch.setattr(tiles_module, "read_tile", counting)
    monkeypatch.setattr(tiles_module.TileReader, "_threads", recording)
    with open_slide(synth.path) as slide:
        grid = tile_grid(slide)
        assert len(grid.coords) > 8
        reader = tiles_module.TileReader(slide, workers=2, prefetch_batches=1)
        batches = reader.batches(grid.plan, batch_size=2)
        first = next(batches)
        # The model would be busy here: the workers read ahead meanwhile. Jobs are submitted only by the
        # generator, now suspended, so the jobs it submitted so far are all it may read until the next
        # batch is asked for: wait until the workers have done them, then count what they read.
        _, unfinished = futures.wait(jobs, timeout=60)
        assert not unfinished, f"{len(unfinished)} read jobs still running after 60 s"
        ahead = len(calls)
        batches.close()  # stops the pool
    assert len(first) == 2
    # window = max(prefetch·batch, 2·workers·chunk) = 4 tiles in flight beyond the 2 handed out: all read
    # while the model works on the first batch (run-ahead), and not one more (bounded memory)
    assert ahead == 2 + 4, ahead


def test_threads_and_processes_read_the_same_tiles(make_slide):
    from virchow_rt.slides import TileReader, open_slide, tile_grid

    slide = make_slide()
    with open_slide(slide.path) as handle:
        plan = tile_grid(handle, 0.5).plan
        batches = {}
        for processes in (False, True):
            reader = TileReader(handle, workers=2, processes=processes)
            assert reader.processes is processes
            batches[processes] = list(reader.batches(plan, 5))
    assert [len(b) for b in batches[False]] == [len(b) for b in batches[True]]
    for a, b in zip(batches[False], batches[True], strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.tiles, b.tiles)  # the same pixels, in the same order
    assert TileReader(handle, workers=2).processes is False  # the library's default: threads (docstring)


def test_embed_slide_takes_an_embedder(make_slide):
    from virchow_rt.embed import Embedder

    synth = make_slide()
    backend = FakeBackend()
    with Embedder(backend) as embedder:
        via_embedder = embed_slide(synth.path, embedder)
        assert not backend.closed  # an open model stays open
    direct = embed_slide(synth.path, FakeBackend())
    np.testing.assert_array_equal(via_embedder.features, direct.features)
