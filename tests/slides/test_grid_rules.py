"""The tile grid's small rules, one by one: written from the mutants ``mutmut`` left alive in
``virchow_rt/slides/grid.py`` (README: Tests). The grid on real slides is in ``test_tissue_grid.py`` and
``test_trident_grid.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from virchow_rt.errors import InputError
from virchow_rt.slides import grid
from virchow_rt.slides.grid import BLACK, WHITE, TileGrid, TilePlan


def test_magnification_to_mpp_takes_any_positive_magnification():
    assert grid.magnification_to_mpp(1) == 10.0 and grid.magnification_to_mpp(0.5) == 20.0
    for bad in (0, -5):
        with pytest.raises(InputError, match=rf"^magnification {bad} must be positive, e\.g\. 5, 10, 20"):
            grid.magnification_to_mpp(bad)


def test_a_resized_plan_keeps_its_tiles_and_what_is_read_outside_the_slide():
    plan = TilePlan(np.array([[0, 0], [448, 0]]), np.array([448, 448]), np.array([1, 1]), 224, fill=BLACK)
    resized = plan.resized(256.0)
    assert (resized.out_size, resized.fill) == (256, BLACK) and isinstance(resized.out_size, int)
    assert resized.coords is plan.coords and resized.size0 is plan.size0 and resized.level is plan.level
    assert TilePlan(plan.coords, plan.size0, plan.level, 224).fill == WHITE  # the default


def _grid(**kw) -> TileGrid:
    plan = TilePlan(np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 224)
    fields = dict(plan=plan, mpp=0.5, tile_size=224, patch_size_level0=448, slide_mpp=0.25,
                  tissue=np.zeros(0), mask=None, level0_magnification=40,
                  target_magnification=20)  # fmt: skip
    return TileGrid(**{**fields, **kw})


def test_coords_attrs_are_tridents_names():
    assert _grid().coords_attrs() == {
        "patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40, "target_magnification": 20,
        "overlap": 0,
    }  # fmt: skip
    clam = _grid(patch_size=256, overlap=16, legacy={"patch_level": 0})
    assert clam.coords_attrs() == {
        "patch_size": 256, "patch_size_level0": 448, "level0_magnification": 40, "target_magnification": 20,
        "overlap": 16, "patch_level": 0,
    }  # fmt: skip


def test_nominal_magnification_is_an_integer_within_two_percent():
    for mpp, mag in ((0.5, 20), (0.502, 20), (0.25, 40), (1.0, 10)):
        got = grid.nominal_magnification(mpp)
        assert got == mag and type(got) is int, (mpp, got)  # written to coords attrs as TRIDENT's integers
    assert grid.nominal_magnification(0.8) == 12.5 and grid.nominal_magnification(3.0) == 3.333  # 2% off


def test_grid_names_say_the_rule_and_edge_tiles_only_when_asked():
    assert grid.grid_name("magnification") == "magnification-bands" and grid.grid_name("mpp") == "mpp"
    assert grid.grid_name("mpp", edge_tiles=True) == "mpp+edge-tiles"
    assert grid.grid_name("magnification", True) == "magnification-bands+edge-tiles"


def test_grid_coords_keep_full_squares_or_with_edge_tiles_every_square_that_starts_inside():
    np.testing.assert_array_equal(grid.grid_coords(896, 448, 448), [[0, 0], [448, 0]])
    np.testing.assert_array_equal(grid.grid_coords(895, 448, 448), [[0, 0]])
    np.testing.assert_array_equal(grid.grid_coords(449, 448, 448), [[0, 0]])
    np.testing.assert_array_equal(  # TRIDENT's: a square that starts on the last column still counts
        grid.grid_coords(449, 449, 448, past_edge=True), [[0, 0], [448, 0], [0, 448], [448, 448]]
    )
    np.testing.assert_array_equal(grid.grid_coords(448, 448, 448, past_edge=True), [[0, 0]])
    none = grid.grid_coords(447, 448, 448)
    assert none.shape == (0, 2) and none.dtype == np.int64
    np.testing.assert_array_equal(grid.grid_coords(448, 895, 448), [[0, 0]])  # rows as columns


def test_the_default_rule_is_tridents_magnification_bands():
    scan = SimpleNamespace(mpp=0.2527, name="scan")  # 40x band: 39.57 exactly
    assert grid.grid_magnifications(scan, 0.5) == (40, 20)
    assert grid.grid_magnifications(scan, 0.5, "mpp") == pytest.approx((10 / 0.2527, 20.0))
    assert grid.patch_size_level0(scan, 0.5, 224) == 224 * 40 // 20
    assert grid.patch_size_level0(scan, 0.5, 224, "mpp") == round(224 * 0.5 / 0.2527)
    with pytest.raises(InputError, match="unknown grid rule 'bands'; use one of: magnification, mpp"):
        grid.patch_size_level0(scan, 0.5, 224, "bands")


def test_tile_grid_masks_tissue_with_the_settings_given(make_slide):
    from virchow_rt.slides import open_slide, tile_grid
    from virchow_rt.slides.mask import MaskConfig

    strict = MaskConfig(min_threshold=0.9, max_threshold=0.95)  # nothing on this slide is that saturated
    with open_slide(make_slide().path) as slide:
        default, masked = tile_grid(slide), tile_grid(slide, mask_config=strict)
    assert default.mask.threshold < 0.9 <= masked.mask.threshold
    assert len(default.coords) > 0 and len(masked.coords) == 0


def test_scan_bands_are_tridents_half_open_intervals():
    assert [grid.level0_magnification(m) for m in (0.2, 0.2999, 0.3, 0.5999, 0.6, 1.2)] == [
        40,
        40,
        20,
        20,
        10,
        5,
    ]
    assert grid.level0_magnification(2.5) == 4  # coarser than TRIDENT's bands: its nominal magnification


def test_a_tile_of_one_level0_pixel_is_allowed_and_none_is_refused():
    scan = SimpleNamespace(mpp=0.25, name="scan")
    assert grid.patch_size_level0(scan, 0.25 / 8, 8, "mpp") == 1
    with pytest.raises(InputError, match=r"a 8-px tile at 0.01 µm/px is smaller than one pixel of scan"):
        grid.patch_size_level0(scan, 0.01, 8, "mpp")


def test_plan_tiles_reads_each_tile_at_the_level_given():
    plan = grid.plan_tiles(SimpleNamespace(mpp=0.25), [(0, 0), (448, 0)], 448, 224, level=1, fill=BLACK)
    assert (plan.out_size, plan.fill, len(plan)) == (224, BLACK, 2)
    np.testing.assert_array_equal(plan.size0, [448, 448])
    np.testing.assert_array_equal(plan.level, [1, 1])
    assert plan.coords.dtype == plan.size0.dtype == plan.level.dtype == np.int64


def test_a_tile_with_exactly_the_minimum_tissue_is_kept(make_slide):
    from virchow_rt.slides import open_slide, tile_grid
    from virchow_rt.slides.mask import TissueMask

    with open_slide(make_slide().path) as slide:
        width, height = slide.dimensions
        pixels = np.zeros((height // 16, width // 16), bool)  # 16 level-0 px a mask pixel: 14 a tile
        pixels[:14, :7] = True  # the first tile: its left half
        result = tile_grid(slide, mask=TissueMask(pixels, 16.0, 0.05), min_tissue=0.5)
    np.testing.assert_array_equal(result.coords, [[0, 0]])
    assert result.tissue.tolist() == [0.5]
