"""open_tiles: .npy arrays, images, folders; errors that name the file; skip_errors; batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from virchow_rt.embed import open_tiles
from virchow_rt.errors import InputError
from virchow_rt.kernels.resize import resize_tile


def _png(path, tile):
    Image.fromarray(tile).save(path)
    return path


def test_npy_is_memory_mapped_and_batched(tmp_path, tissue):
    np.save(tmp_path / "a.npy", tissue[:10])
    source = open_tiles([str(tmp_path / "a.npy")])
    assert len(source) == 10
    assert isinstance(source._entries[0].array, np.memmap)
    batches = list(source.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(b.flags.c_contiguous and b.dtype == np.uint8 and b.shape[1:] == (224, 224, 3) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), tissue[:10])
    assert source.names[0] == f"{tmp_path / 'a.npy'}[0]" and len(source.names) == 10


def test_batches_cross_file_boundaries(tmp_path, tissue):
    np.save(tmp_path / "a.npy", tissue[:3])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        _png(folder / f"t{i}.png", tissue[3 + i])
    source = open_tiles([tmp_path / "a.npy", folder])
    batches = list(source.batches(5))
    assert [len(b) for b in batches] == [5, 2]
    np.testing.assert_array_equal(np.concatenate(batches), tissue[:7])
    assert source.sources[0] == {"path": str(tmp_path / "a.npy"), "kind": "npy", "rows": [0, 3]}
    assert source.sources[-1]["rows"] == [6, 7]


def test_folder_is_sorted_and_hidden_files_ignored(tmp_path, tissue):
    for name, i in (("b.png", 1), ("a.png", 0), ("c.png", 2)):
        _png(tmp_path / name, tissue[i])
    (tmp_path / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "sub").mkdir()
    source = open_tiles([tmp_path])
    assert [n.rsplit("/", 1)[-1] for n in source.names] == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(source.read_all(), tissue[:3])


def test_image_formats_and_modes_become_rgb(tmp_path, tissue):
    tile = tissue[0]
    Image.fromarray(tile).save(tmp_path / "a.tif")
    Image.fromarray(tile).convert("RGBA").save(tmp_path / "b.png")
    Image.fromarray(tile).convert("L").save(tmp_path / "c.png")
    Image.fromarray(tile).save(tmp_path / "d.jpg", quality=95)
    out = open_tiles([tmp_path]).read_all()
    assert out.shape == (4, 224, 224, 3)
    np.testing.assert_array_equal(out[0], tile)  # TIFF: lossless
    np.testing.assert_array_equal(out[1], tile)  # alpha dropped
    gray = np.asarray(Image.fromarray(tile).convert("L"))
    assert all(np.array_equal(out[2][..., c], gray) for c in range(3))
    assert np.abs(out[3].astype(int) - tile).mean() < 4  # JPEG: lossy but close


def test_other_sizes_are_resized_like_timm(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    _png(tmp_path / "big.png", big)
    np.save(tmp_path / "big.npy", big[None])
    out = open_tiles([tmp_path / "big.png", tmp_path / "big.npy"]).read_all()
    np.testing.assert_array_equal(out[0], resize_tile(big, 224))
    np.testing.assert_array_equal(out[1], resize_tile(big, 224))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), ["float32", "uint8", "astype"]),
        (np.zeros((8, 8, 3), np.uint8), ["(8, 8, 3)", "x[None]"]),
        (np.zeros((2, 8, 8, 4), np.uint8), ["(2, 8, 8, 4)", "RGBA"]),
        (np.zeros((2, 3, 8, 8), np.uint8), ["(2, 3, 8, 8)", "transpose"]),
    ],
    ids=["dtype", "rank", "channels", "channels-first"],
)
def test_bad_arrays_are_named(tmp_path, array, words):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(InputError) as err:
        open_tiles([path])
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_garbage_npy_and_missing_path(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(InputError, match="junk.npy is not a readable .npy"):
        open_tiles([tmp_path / "junk.npy"])
    with pytest.raises(InputError, match="nothere.png does not exist"):
        open_tiles([tmp_path / "nothere.png"])


def test_empty_folder_and_zero_tiles(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty has no files of tiles: put .npy arrays or PNG"):
        open_tiles([tmp_path / "empty"])
    np.save(tmp_path / "zero.npy", np.zeros((0, 224, 224, 3), np.uint8))
    with pytest.raises(InputError, match="no tiles to embed"):
        open_tiles([tmp_path / "zero.npy"])


def test_files_that_are_not_tiles_are_ignored_and_counted(tmp_path, tissue):
    _png(tmp_path / "a.png", tissue[0])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("a.png,tumour")
    source = open_tiles([tmp_path])  # a stray notes.txt no longer stops the run
    assert len(source) == 1 and source.skipped == []
    assert source.ignored == [str(tmp_path / "labels.csv"), str(tmp_path / "notes.txt")]
    with pytest.raises(InputError, match="notes.txt is not an image.*--skip-errors"):
        open_tiles([tmp_path / "notes.txt"])  # named explicitly, it is still checked


def test_sub_folders_with_recursive(tmp_path, tissue):
    for case in ("case1", "case2"):
        (tmp_path / case).mkdir()
        _png(tmp_path / case / "t.png", tissue[0])
    with pytest.raises(InputError, match="no files of tiles.*pass --recursive"):
        open_tiles([tmp_path])
    source = open_tiles([tmp_path], recursive=True)
    assert len(source) == 2 and [Path(n).parent.name for n in source.names] == ["case1", "case2"]


def test_truncated_image_is_named_or_skipped(tmp_path, tissue):
    for i in range(3):
        _png(tmp_path / f"t{i}.png", tissue[i])
    data = (tmp_path / "t1.png").read_bytes()
    (tmp_path / "t1.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    source = open_tiles([tmp_path])
    with pytest.raises(InputError, match="t1.png.*corrupt or truncated"):
        list(source.batches(2))
    source = open_tiles([tmp_path], skip_errors=True)
    assert len(source) == 3  # not known until the pixels are read
    out = np.concatenate(list(source.batches(2)))
    np.testing.assert_array_equal(out, tissue[[0, 2]])
    assert len(source) == 2 and [n.rsplit("/", 1)[-1] for n in source.names] == ["t0.png", "t2.png"]
    assert source.skipped[0][0] == str(tmp_path / "t1.png") and "truncated" in source.skipped[0][1]
    assert [s["rows"] for s in source.sources] == [[0, 1], [1, 2]]


def test_all_inputs_skipped_is_an_error(tmp_path):
    (tmp_path / "a.png").write_text("x")
    with pytest.raises(InputError, match=r"no tiles to embed.*1 unreadable file skipped"):
        open_tiles([tmp_path], skip_errors=True)
