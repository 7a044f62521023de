"""Tissue mask and tile grid: tiles fall on tissue, cover it, and are placed in level-0 pixels."""

from __future__ import annotations

import numpy as np
import pytest
from slide_helpers import FakeBackend

from virchow_rt._deps import is_importable
from virchow_rt.errors import InputError
from virchow_rt.slides import open_slide, pick_level, tile_grid, tissue_mask
from virchow_rt.slides.grid import grid_coords, nominal_magnification
from virchow_rt.slides.mask import TissueMask, clean_mask, saturation

READERS = [r for r in ("openslide", "tiffslide") if is_importable(r)]


def _gt_fraction(synth, coords, size0):
    return np.array([synth.tissue[y : y + size0, x : x + size0].mean() for x, y in coords])


@pytest.mark.parametrize("reader", READERS)
def test_tiles_fall_on_tissue_and_cover_it(make_slide, reader):
    synth = make_slide()
    with open_slide(synth.path, reader=reader) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.5)
    coords = grid.coords
    assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) >= 10
    kept = _gt_fraction(synth, coords, 224)
    # on tissue: every kept tile is at least ~half inside a tissue piece (the mask is a low-res estimate)
    assert kept.min() >= 0.4, kept.round(2)
    # covers it: every grid tile (almost) entirely on tissue is kept; the kept tiles hold most of the tissue
    every = grid_coords(*synth.image.shape[1::-1], 224)
    inside = every[_gt_fraction(synth, every, 224) >= 0.9]
    assert {tuple(c) for c in inside} <= {tuple(c) for c in coords}
    covered = np.zeros_like(synth.tissue)
    for x, y in coords:
        covered[y : y + 224, x : x + 224] = True
    assert (covered & synth.tissue).sum() / synth.tissue.sum() > 0.75
    assert grid.patch_size_level0 == 224 and grid.level == 0 and grid.effective_mpp == pytest.approx(0.5)


def test_coordinates_are_level0_on_a_40x_slide(make_slide):
    synth = make_slide("scan40x.tif", 2240, 1792, ((300, 250, 1500, 1200),), mpp=0.25)
    with open_slide(synth.path) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224)
        assert nominal_magnification(slide.mpp) == 40
    assert grid.patch_size_level0 == 448 and grid.level == 1  # 0.5 µm/px is level 1 of a 0.25 µm/px scan
    assert (grid.coords % 448 == 0).all() and (grid.coords + 448 <= [2240, 1792]).all()
    assert _gt_fraction(synth, grid.coords, 448).min() >= 0.4
    assert len(grid.coords) >= 6


def test_pick_level(make_slide):
    with open_slide(make_slide("scan40x.tif", 2240, 1792, ((300, 250, 1500, 1200),), mpp=0.25).path) as slide:
        assert [pick_level(slide, mpp) for mpp in (0.25, 0.3, 0.5, 0.99, 1.0, 4.0)] == [0, 0, 1, 1, 2, 2]
        assert pick_level(slide, 0.1) == 0  # finer than the scan: the finest level, upsampled
        # within 1% counts as "at the target" (downsamples such as 2.002); 2% finer does not
        assert pick_level(slide, 0.5 / 1.005) == 1 and pick_level(slide, 0.5 / 1.02) == 0


def test_glass_only_slide_has_no_tiles(make_slide):
    with open_slide(make_slide("glass.tif", 896, 672, ()).path) as slide:
        grid = tile_grid(slide)
        assert len(grid.coords) == 0 and not grid.mask.mask.any()
        assert len(tile_grid(slide, min_tissue=0.0, mask=grid.mask).coords) == 4 * 3  # every full tile


def test_mask_fraction_is_exact_on_a_known_mask():
    mask = np.zeros((10, 10), bool)
    mask[:5, :] = True  # top half
    tm = TissueMask(mask, downsample=4.0, threshold=0.1)
    frac = tm.fraction(np.array([[0, 0], [0, 20], [0, 10], [36, 36]]), 20)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.5, 0.0])


def test_clean_mask_removes_specks_and_fills_holes():
    mask = np.zeros((64, 64), bool)
    mask[8:40, 8:40] = True
    mask[20:23, 20:23] = False  # a small hole
    mask[55, 55] = True  # a speck
    cleaned = clean_mask(mask, tile_side=8.0)
    assert cleaned[21, 21] and not cleaned[55, 55] and cleaned[8:40, 8:40].all()


def test_saturation_separates_glass_from_stain():
    glass = np.full((1, 1, 3), 240, np.uint8)
    stain = np.array([[[150, 80, 40]]], np.uint8)
    assert saturation(glass)[0, 0] == 0 and saturation(stain)[0, 0] == pytest.approx(110 / 150)


def test_tissue_mask_threshold_is_clamped(make_slide):
    with open_slide(make_slide().path) as slide:
        mask = tissue_mask(slide, 224)
    assert 0.04 <= mask.threshold <= 0.10 and mask.downsample == 14.0


def test_bad_settings_are_input_errors(make_slide):
    with open_slide(make_slide().path) as slide:
        with pytest.raises(InputError, match="--mpp"):
            tile_grid(slide, mpp=0)
        with pytest.raises(InputError, match="--min-tissue"):
            tile_grid(slide, min_tissue=1.5)
        with pytest.raises(InputError, match="--tile-size"):
            tile_grid(slide, tile_size=4)


def test_grid_rules_follow_trident_or_the_exact_mpp(make_slide, tmp_path):
    """On a 0.2527 µm/px scan, 224 px at 1.0 µm/px: TRIDENT's 224 x 40 / 10 = 896, the exact rule 886."""
    import h5py

    from virchow_rt.slides import SlideSettings, open_slide, process_slides, tile_grid
    from virchow_rt.slides.grid import patch_size_level0

    synth = make_slide("odd.tif", 3584, 2688, mpp=None)
    with open_slide(synth.path, slide_mpp=0.2527) as slide:
        assert patch_size_level0(slide, 1.0, 224) == 896 and patch_size_level0(slide, 1.0, 224, "mpp") == 886
        assert tile_grid(slide, 1.0, rule="mpp").patch_size_level0 == 886
    out = tmp_path / "out"
    process_slides(
        [synth.path], FakeBackend(), out, SlideSettings(mpp=1.0, slide_mpp=0.2527), log=lambda s: None
    )
    with h5py.File(out / "odd.h5") as f:  # TRIDENT's attribute types on coords
        attrs = f["coords"].attrs
        assert attrs["patch_size_level0"] == 896.0 and attrs["patch_size_level0"].dtype.kind == "f"
        assert attrs["target_magnification"] == 10.0 and attrs["target_magnification"].dtype.kind == "f"
        assert attrs["level0_magnification"] == 40


def test_mag_is_tridents_spelling_of_mpp(make_slide, tmp_path):
    import json

    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    synth = make_slide()
    args = build_parser().parse_args(["slides", str(synth.path), "--model", "m", "--out", str(tmp_path / "o"),
                                      "--mag", "10"])  # fmt: skip
    args.model = FakeBackend()
    assert run_cli(args) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["settings"]["mpp"] == 1.0


@pytest.mark.parametrize("layout", ["trident", "clam"])
def test_coords_from_trident_or_clam_are_reused_tile_for_tile(make_slide, tmp_path, layout):
    import h5py

    from virchow_rt.slides import SlideSettings, process_slides
    from virchow_rt.slides.writer import read_features

    synth = make_slide()
    given = np.array([[0, 0], [224, 448], [1344, 896], [1568, 1120]], np.int64)  # glass included: kept
    folder = tmp_path / "trident" / "20x_224px_0px_overlap" / "patches"
    folder.mkdir(parents=True)
    with h5py.File(folder / "slide_patches.h5", "w") as f:
        ds = f.create_dataset("coords", data=given)
        if layout == "trident":
            ds.attrs.update({"patch_size": 224, "patch_size_level0": 224.0, "target_magnification": 20.0})
        else:  # CLAM: the size at a pyramid level and that level's downsample
            ds.attrs.update({"patch_size": 112, "patch_level": 1, "downsample": np.array([2.0, 2.0])})
    out = tmp_path / "out"
    settings = SlideSettings(coords=str(folder.parent))
    summary = process_slides([synth.path], FakeBackend(), out, settings, log=lambda s: None)
    assert summary["slides"][0]["status"] == "done"
    data = read_features(out / "slide.h5")
    np.testing.assert_array_equal(data["coords"], given)  # tile for tile, in their order
    assert data["attrs"]["patch_size_level0"] == 224 and data["features"].shape == (4, 48)
    with pytest.raises(InputError, match="has no coordinates for slide other"):
        from virchow_rt.slides.features import coords_file

        coords_file(str(folder.parent), "other")
