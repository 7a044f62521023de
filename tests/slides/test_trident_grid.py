"""Our grid against TRIDENT's rules, on synthetic slides at the µm/px scanners write (issue 21).

TRIDENT's rules are re-stated here from its code (``WSI._fetch_magnification``, ``WSIPatcher``), as an
oracle independent of ours: the scan's band, the level-0 side ``round(patch_size · (10/dst) / (10/src))``,
a grid of ``ceil(width / step)`` columns (tiles may run past the edge), row by row.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from slide_helpers import FakeBackend

from virchow_rt.slides import SlideSettings, open_slide, process_slides, tile_grid
from virchow_rt.slides.grid import grid_coords
from virchow_rt.slides.mask import TissueMask
from virchow_rt.slides.tiles import read_tile

SCANS = (0.2208, 0.243, 0.2527, 0.263, 0.455, 0.5)  # µm/px of common scanners (Aperio GT450 is 0.263)
QUIET = {"log": lambda s: None}


def trident_band(mpp: float) -> int:
    """TRIDENT's ``_fetch_magnification``."""
    for bound, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < bound:
            return mag
    raise ValueError(mpp)


def trident_side(patch_size: int, src_mag: float, dst_mag: float) -> int:
    """``WSIPatcher.patch_size_src``."""
    return round(patch_size * ((10 / dst_mag) / (10 / src_mag)))


def trident_grid(width: int, height: int, step: int) -> np.ndarray:
    """``WSIPatcher._compute_cols_rows`` and its row-major coordinates."""
    cols = rows = 0
    while cols * step < width:
        cols += 1
    while rows * step < height:
        rows += 1
    return np.array([(c * step, r * step) for r in range(rows) for c in range(cols)], np.int64)


@pytest.mark.parametrize("mpp", SCANS)
@pytest.mark.parametrize("mag", [20, 10])
def test_default_tile_side_is_tridents(make_slide, mpp, mag):
    """448 px at 20x on every 40x-band scan, 224 px on every 20x-band one (and twice that at 10x)."""
    with open_slide(make_slide(f"s{mpp}.tif", 1792, 1344, mpp=mpp).path) as slide:
        grid = tile_grid(slide, mpp=10 / mag, min_tissue=0.0)
    band = trident_band(mpp)
    assert grid.level0_magnification == band and grid.target_magnification == mag
    assert grid.patch_size_level0 == trident_side(224, band, mag) == 224 * (band // 20) * (20 // mag)
    assert (grid.coords % grid.patch_size_level0 == 0).all()


def test_coords_attributes_let_tridents_patcher_reread_the_same_squares(make_slide, tmp_path):
    """At 0.263 µm/px (TRIDENT: 40x) the file says 40x and 448 px; with --grid mpp it says the exact
    magnifications, from which TRIDENT's patcher computes the exact side (426 px) again."""
    synth = make_slide("gt450.tif", 1792, 1344, mpp=0.263)
    for rule, out in (("magnification", tmp_path / "bands"), ("mpp", tmp_path / "exact")):
        process_slides([synth.path], FakeBackend(), out, SlideSettings(grid=rule), **QUIET)
        with h5py.File(out / "gt450.h5") as f:
            attrs = dict(f["coords"].attrs)
            size0 = trident_side(
                attrs["patch_size"], attrs["level0_magnification"], attrs["target_magnification"]
            )
            assert size0 == attrs["patch_size_level0"]
            if rule == "magnification":
                assert attrs["level0_magnification"] == 40 and size0 == 448
                assert f.attrs["grid_rule"] == "magnification-bands"
            else:
                assert size0 == round(224 * 0.5 / 0.263) == 426 and f.attrs["grid_rule"] == "mpp"


def test_edge_tiles_are_tridents_grid_read_black_outside(make_slide):
    # 1900 x 1400 px at 0.5 µm/px: 224-px tiles leave 108 px and 152 px strips at the right and bottom
    synth = make_slide("edge.tif", 1900, 1400, ((1500, 200, 400, 900), (200, 1200, 600, 200)))
    assert np.array_equal(grid_coords(1900, 1400, 224, past_edge=True), trident_grid(1900, 1400, 224))
    with open_slide(synth.path) as slide:
        inside = tile_grid(slide, min_tissue=0.0)
        edge = tile_grid(slide, min_tissue=0.0, edge_tiles=True)
        past = [(x, y) for x, y in edge.coords if x + 224 > 1900 or y + 224 > 1400]
        assert past and not any(x + 224 > 1900 or y + 224 > 1400 for x, y in inside.coords)
        assert {tuple(c) for c in inside.coords} < {tuple(c) for c in edge.coords}
        assert edge.edge_fill == 0 and inside.edge_fill == 255
        x, y = past[0]
        tile = read_tile(slide, x, y, 224, edge.plan.level[0], 224, edge.plan.fill)
    w, h = min(224, 1900 - x), min(224, 1400 - y)
    np.testing.assert_array_equal(tile[:h, :w], synth.image[y : y + h, x : x + w])
    assert (tile[h:] == 0).all() and (tile[:, w:] == 0).all()  # what TRIDENT's OpenSlide reader gives


def test_tiles_past_the_edge_of_a_coarser_level_are_filled_too(make_slide):
    synth = make_slide("edge.tif", 1900, 1400, ((1500, 200, 400, 900),), mpp=0.25)
    with open_slide(synth.path) as slide:
        grid = tile_grid(slide, min_tissue=0.0, edge_tiles=True)  # 448 level-0 px read at level 1
        assert grid.level == 1 and grid.patch_size_level0 == 448
        x, y = 1792, 1344  # the bottom-right tile: level-1 (896, 672) of a 950 x 700 level
        black = read_tile(slide, x, y, 448, 1, 224, 0)
        white = read_tile(slide, x, y, 448, 1, 224, 255)
        w, h = 950 - x // 2, 700 - y // 2
        inside = slide.read(x, y, 1, w, h)
    assert (black[h:] == 0).all() and (black[:, w:] == 0).all() and (white[h:] == 255).all()
    np.testing.assert_array_equal(black[:h, :w], inside)
    np.testing.assert_array_equal(white[:h, :w], inside)


def test_min_tissue_zero_keeps_the_tiles_that_touch_tissue():
    mask = np.zeros((40, 40), bool)
    mask[10, 17] = True  # one mask pixel (4 level-0 px a side) of tissue
    tm = TissueMask(mask, downsample=4.0, threshold=0.1)
    coords = np.array([[32, 0], [40, 20], [64, 32], [0, 64], [36, 40], [72, 40]])  # 36-px tiles
    # the tissue pixel is level-0 x 68..72, y 40..44: [72, 40] starts right after it, [32, 0] ends above it
    np.testing.assert_array_equal(tm.touches(coords, 36), [False, True, True, False, True, False])
    assert tm.fraction(coords, 36).max() < 0.05  # far below any --min-tissue > 0


def test_min_tissue_zero_drops_glass_and_keeps_slivers(make_slide):
    """TRIDENT keeps a tile that touches tissue at all; glass away from tissue never."""
    synth = make_slide()  # two tissue pieces off the 224-px grid
    with open_slide(synth.path) as slide:
        touching = tile_grid(slide, min_tissue=0.0)
        half = tile_grid(slide, min_tissue=0.5, mask=touching.mask)
    every = grid_coords(1792, 1344, 224)
    truth = np.array([synth.tissue[y : y + 224, x : x + 224].mean() for x, y in every])
    # glass with no tissue within a quarter tile (the mask's closing radius) around it
    margin = np.array(
        [synth.tissue[max(0, y - 56) : y + 280, max(0, x - 56) : x + 280].any() for x, y in every]
    )
    kept = {tuple(c) for c in touching.coords}
    assert {tuple(c) for c in every[truth > 0.05]} <= kept  # every tile with tissue in it
    assert {tuple(c) for c in every[~margin]}.isdisjoint(kept) and (~margin).sum() >= 10
    assert len(half.coords) < len(touching.coords) and (touching.tissue > 0).all()


def test_min_tissue_zero_with_edge_tiles_is_tridents_selection_through_the_cli(make_slide, tmp_path):
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    synth = make_slide("edge.tif", 1900, 1400, ((1500, 200, 400, 900),))
    out = tmp_path / "o"
    args = build_parser().parse_args(
        ["slides", str(synth.path), "--model", "m", "--out", str(out), "--min-tissue", "0", "--edge-tiles"]
    )
    args.model = FakeBackend()
    assert run_cli(args) == 0
    with h5py.File(out / "edge.h5") as f:
        coords = f["coords"][()]
        assert f.attrs["edge_fill"] == 0 and f.attrs["grid_rule"] == "magnification-bands+edge-tiles"
    assert (coords[:, 0] + 224 > 1900).any()  # the tissue reaches the right edge: tiles past it are kept
