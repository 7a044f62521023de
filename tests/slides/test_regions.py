"""Multi-magnification regions: the tiles of every magnification line up inside each region."""

from __future__ import annotations

import numpy as np
import pytest
from slide_helpers import FakeBackend, cosine_rows, resize_square

from virchow_rt.errors import InputError, OutputError
from virchow_rt.slides import (
    SlideSettings,
    embed_regions,
    open_slide,
    process_slides,
    read_features,
    region_grid,
)
from virchow_rt.slides.grid import patch_size_level0
from virchow_rt.slides.regions import parse_magnifications, region_layout

tifffile = pytest.importorskip("tifffile")

QUIET = {"log": lambda line: None, "warn": lambda line: None}
# a 2688 × 1792 slide at 0.5 µm/px: 3 × 2 regions of 896 level-0 px at 5x
REGION_SLIDE = dict(name="regions.tif", width=2688, height=1792, patches=((150, 100, 2300, 1500),))


def _assert_tiles_partition_region(coords, size0, region_xy, region_size):
    """The squares (x, y, size0) cover the region square exactly once."""
    step = int(size0.min())
    cover = np.zeros((region_size // step, region_size // step), int)
    for (x, y), s in zip(coords, size0, strict=True):
        dx, dy = x - region_xy[0], y - region_xy[1]
        assert (
            dx % step == 0 and dy % step == 0 and 0 <= dx and dx + s <= region_size and dy + s <= region_size
        )
        cover[dy // step : (dy + s) // step, dx // step : (dx + s) // step] += 1
    assert (cover == 1).all()


def test_layout_order_and_alignment(make_slide):
    with open_slide(make_slide(**REGION_SLIDE).path) as slide:
        layout = region_layout(slide, (20, 5, 10), tile_size=224)
    assert layout.magnifications == (5.0, 10.0, 20.0) and layout.tiles_per_region == 21
    np.testing.assert_array_equal(layout.magnification, [5] + [10] * 4 + [20] * 16)
    np.testing.assert_allclose(layout.mpp, [2.0] + [1.0] * 4 + [0.5] * 16)
    np.testing.assert_array_equal(layout.size0, [896] + [448] * 4 + [224] * 16)
    assert layout.region_size0 == 896
    np.testing.assert_array_equal(layout.position[1:5], [[0, 0], [0, 1], [1, 0], [1, 1]])  # row by row
    for mag in (5, 10, 20):
        idx = layout.index_of(mag)
        _assert_tiles_partition_region(layout.offset[idx], layout.size0[idx], (0, 0), 896)


def test_layout_on_an_odd_scanner_resolution(make_slide):
    # 0.2527 µm/px is a 40x scan (TRIDENT's rule): 224 px at 20x is 448 level-0 px; sizes come from the
    # finest tile, so 4 × 20x == 2 × 10x == 1 × 5x exactly
    with open_slide(make_slide("odd.tif", 512, 512, (), mpp=None).path, slide_mpp=0.2527) as slide:
        layout = region_layout(slide, (5, 10, 20), tile_size=224)
        assert patch_size_level0(slide, 0.5, 224, rule="mpp") == round(224 * 0.5 / 0.2527) == 443  # exact
    assert layout.size0[-1] == 224 * 40 // 20 == 448
    np.testing.assert_array_equal(np.unique(layout.size0), [448, 896, 1792])
    assert layout.region_size0 == 1792


def test_magnifications_must_nest():
    assert parse_magnifications([20, 5, 10, 10]) == (5.0, 10.0, 20.0)
    assert parse_magnifications([2.5, 10]) == (2.5, 10.0)
    for bad in ([5, 15, 20], [10, 15], [0, 5], []):
        with pytest.raises(InputError, match="--regions"):
            parse_magnifications(bad)


def test_region_grid_and_embeddings_line_up(make_slide):
    synth = make_slide(**REGION_SLIDE)
    with open_slide(synth.path) as slide:
        grid = region_grid(slide, (5, 10, 20), tile_size=224)
        assert len(grid) == 6 and (grid.region_coords % 896 == 0).all()
        result = embed_regions(slide, FakeBackend(), (5, 10, 20), batch_size=10, workers=2)
    r, t = len(grid), 21
    assert result.features.shape == (r, t, 48) and result.coords.shape == (r, t, 2)
    layout = result.grid.layout
    for region, coords in zip(grid.region_coords, result.coords, strict=True):
        assert tuple(coords[0]) == tuple(region)  # the 5x tile is the region
        for mag in (10, 20):  # the 4 10x tiles and the 16 20x tiles tile the 5x region
            idx = layout.index_of(mag)
            _assert_tiles_partition_region(coords[idx], layout.size0[idx], region, 896)
    # each tile's features equal reading it ourselves from level 0 at its magnification and embedding it
    level0 = tifffile.imread(synth.path, key=0)
    backend = FakeBackend()
    for pos in (0, 1, 4, 5, 20):
        size0 = int(layout.size0[pos])
        tiles = np.stack(
            [resize_square(level0[y : y + size0, x : x + size0], 224) for x, y in result.coords[:, pos]]
        )
        cos = cosine_rows(result.features[:, pos], backend.run(tiles))
        # 20x is read from level 0 (exact); 10x and 5x from the box-downsampled levels 1 and 2 (close)
        assert cos.min() > (0.99999 if pos >= 5 else 0.999), (pos, cos.min())


def test_regions_in_the_h5(make_slide, tmp_path):
    synth = make_slide(**REGION_SLIDE)
    out = tmp_path / "out"
    settings = SlideSettings(regions=(5, 10, 20), mpp=0.5)
    summary = process_slides([synth.path], FakeBackend(), out, settings, **QUIET)
    record = summary["slides"][0]
    plain = process_slides([synth.path], FakeBackend(), tmp_path / "plain", SlideSettings(mpp=0.5), **QUIET)
    grid_tiles = plain["slides"][0]["tiles"]
    assert record["regions"] == 6 and record["tiles"] == grid_tiles
    assert record["embedded_tiles"] == summary["totals"]["tiles_embedded"] == grid_tiles + 6 * 21
    data = read_features(out / "regions.h5")
    reg = data["regions"]
    assert reg["features"].shape == (6, 21, 48) and reg["coords"].shape == (6, 21, 2)
    np.testing.assert_array_equal(reg["magnification"], [5] + [10] * 4 + [20] * 16)
    np.testing.assert_array_equal(reg["patch_size_level0"], [896] + [448] * 4 + [224] * 16)
    # the TRIDENT-layout datasets are the slide's tile grid whatever --regions says: regions are added
    without = read_features(tmp_path / "plain" / "regions.h5")
    np.testing.assert_array_equal(data["coords"], without["coords"])
    np.testing.assert_array_equal(data["features"], without["features"])
    assert data["attrs"]["regions"] == "5,10,20" and data["attrs"]["num_regions"] == 6
    assert data["attrs"]["region_size_level0"] == 896 and data["attrs"]["patch_size_level0"] == 224
    # resumable like the plain layout; another region list is another configuration: another folder
    again = process_slides([synth.path], FakeBackend(), out, settings, **QUIET)
    assert again["this_run"][0]["status"] == "skipped" and again["slides"][0]["regions"] == 6
    other = SlideSettings(regions=(10, 20), mpp=0.5)
    with pytest.raises(OutputError, match="another configuration \\(regions '5,10,20' -> '10,20'\\)"):
        process_slides([synth.path], FakeBackend(), out, other, **QUIET)
    process_slides([synth.path], FakeBackend(), tmp_path / "out-10-20", other, **QUIET)
    assert read_features(tmp_path / "out-10-20" / "regions.h5")["regions"]["features"].shape[1] == 5
