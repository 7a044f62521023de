"""The CPU reference resize against timm's own eval transform (the oracle), pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from virchow_rt.errors import InputError
from virchow_rt.kernels import resize_geometry, resize_tile, resize_tiles
from virchow_rt.tissue import ihc_image

SIZES = [(224, 224), (256, 256), (448, 448), (300, 260), (260, 300), (225, 224), (100, 150), (511, 233)]


@pytest.fixture(scope="module")
def timm_transform():
    """timm's eval transform for Virchow: Resize(224, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize."""
    timm_data = pytest.importorskip("timm.data")
    return timm_data.create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0)


def _timm_uint8(transform, tile: np.ndarray) -> np.ndarray:
    """timm's normalized tensor, un-normalized back to uint8 (H, W, 3)."""
    import torch
    from PIL import Image

    x = transform(Image.fromarray(tile))  # (3, 224, 224) normalized float
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("h", "w"), SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_timm_eval_transform(timm_transform, h, w):
    rng = np.random.default_rng(h * 1000 + w)
    image = ihc_image()
    y, x = rng.integers(0, 512 - h + 1), rng.integers(0, 512 - w + 1)
    tiles = np.stack([image[y : y + h, x : x + w], rng.integers(0, 256, (h, w, 3), dtype=np.uint8)])
    ours = resize_tiles(tiles, 224)
    assert ours.shape == (2, 224, 224, 3) and ours.dtype == np.uint8
    for tile, got in zip(tiles, ours, strict=True):
        diff = np.abs(_timm_uint8(timm_transform, tile).astype(int) - got).max()
        assert diff <= 1, f"{h}x{w}: max abs difference {diff} from timm"


def test_normalized_tensors_match_timm(timm_transform):
    from PIL import Image

    tile = np.ascontiguousarray(ihc_image()[:300, :260])
    x = timm_transform(Image.fromarray(tile)).numpy()  # (3, S, S) normalized
    ours = resize_tile(tile, 224).astype(np.float32) / 255.0
    ours = (ours - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])  # (S, S, 3)
    assert np.abs(ours.transpose(2, 0, 1) - x).max() < 1e-5


def test_geometry_matches_torchvision_rounding():
    assert resize_geometry(300, 260, 224) == (258, 224, 17, 0)  # int(224 * 300 / 260) = 258, round(17.0)
    assert resize_geometry(225, 224, 224) == (225, 224, 0, 0)  # round(0.5) = 0: halves go to even
    assert resize_geometry(227, 224, 224) == (227, 224, 2, 0)  # round(1.5) = 2
    assert resize_geometry(100, 150, 224) == (224, 336, 0, 56)


def test_fast_path_returns_the_same_memory():
    tiles = np.zeros((3, 224, 224, 3), np.uint8)
    assert resize_tiles(tiles, 224) is tiles
    view = tiles[::2]  # strided: made contiguous
    out = resize_tiles(view, 224)
    assert out.flags.c_contiguous and out.shape == (2, 224, 224, 3)


def test_list_of_mixed_sizes():
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((224, 224, 3), (300, 260, 3))]
    out = resize_tiles(tiles, 224)
    np.testing.assert_array_equal(out[0], tiles[0])
    np.testing.assert_array_equal(out[1], resize_tile(tiles[1], 224))


@pytest.mark.parametrize(
    ("tiles", "match"),
    [
        (np.zeros((1, 8, 8, 3), np.float32), "float32"),
        (np.zeros((8, 8, 3), np.uint8), r"\(8, 8, 3\)"),
        (np.zeros((1, 8, 8, 4), np.uint8), r"\(1, 8, 8, 4\)"),
        ([np.zeros((8, 8), np.uint8)], r"tile 0 has shape \(8, 8\)"),
    ],
)
def test_bad_tiles(tiles, match):
    with pytest.raises(InputError, match=match):
        resize_tiles(tiles, 224)


@pytest.mark.parametrize(
    ("crop_pct", "interpolation"), [(0.875, "bicubic"), (1.0, "bilinear"), (0.875, "bilinear")]
)
@pytest.mark.parametrize(("h", "w"), [(224, 224), (256, 256), (300, 260)])
def test_other_geometries_match_timm(crop_pct, interpolation, h, w):
    """Prov-GigaPath's authors' 256 -> 224 crop, UNI's and Phikon's bilinear: timm's transform decides."""
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(
        input_size=(3, 224, 224), interpolation=interpolation, crop_pct=crop_pct
    )
    tile = np.ascontiguousarray(ihc_image()[40 : 40 + h, 90 : 90 + w])
    got = resize_tiles(tile[None], 224, crop_pct, interpolation)[0]
    assert np.abs(_timm_uint8(transform, tile).astype(int) - got).max() <= 1
    untouched = crop_pct == 1.0 and (h, w) == (224, 224)
    assert np.array_equal(got, tile) == untouched  # a 224 px tile is resized too when crop_pct < 1


def test_bad_geometry_is_refused():
    with pytest.raises(InputError, match="crop_pct 1.5 must be in"):
        resize_tiles(np.zeros((1, 224, 224, 3), np.uint8), 224, crop_pct=1.5)
    with pytest.raises(InputError, match="unknown interpolation 'nearest'"):
        resize_tiles(np.zeros((1, 224, 224, 3), np.uint8), 224, interpolation="nearest")
