"""Slide readers: OpenSlide and tiffslide see the same pyramid, pixels and µm/px of a synthetic TIFF."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from virchow_rt._deps import is_importable
from virchow_rt.errors import InputError, MissingDependency
from virchow_rt.slides import find_slides, open_slide, tile_grid
from virchow_rt.slides import reader as reader_module
from virchow_rt.slides.reader import to_rgb

READERS = [r for r in ("openslide", "tiffslide") if is_importable(r)]


@pytest.mark.parametrize("reader", READERS)
def test_pyramid_pixels_and_mpp(make_slide, reader):
    synth = make_slide()
    with open_slide(synth.path, reader=reader) as slide:
        assert slide.reader == reader and slide.name == "slide"
        assert slide.dimensions == (1792, 1344)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
        # zlib is lossless: level 0 is the image we wrote, pixel for pixel, at level-0 coordinates
        np.testing.assert_array_equal(slide.read(300, 260, 0, 100, 80), synth.image[260:340, 300:400])
        # level 1 is addressed with level-0 coordinates too
        level1 = slide.read(400, 200, 1, 64, 32)
        assert level1.shape == (32, 64, 3) and level1.dtype == np.uint8
        assert np.abs(level1.astype(int) - synth.image[200:264:2, 400:528:2].astype(int)).mean() < 12


@pytest.mark.parametrize("reader", READERS)
def test_missing_mpp_needs_slide_mpp(make_slide, reader):
    synth = make_slide("nompp.tif", 512, 512, ((0, 0, 256, 256),), mpp=None)
    with pytest.raises(InputError, match="--slide-mpp"):
        open_slide(synth.path, reader=reader)
    with open_slide(synth.path, slide_mpp=0.25, reader=reader) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "slide_mpp"


def test_metadata_wins_over_slide_mpp(make_slide):
    with open_slide(make_slide().path, slide_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"


def test_truncated_slide_is_an_input_error_naming_it(make_slide):
    synth = make_slide("broken.tif")
    data = synth.path.read_bytes()
    synth.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="broken.tif"):
        with open_slide(
            synth.path
        ) as slide:  # OpenSlide refuses it; tiffslide opens it and fails on the tiles
            tile_grid(slide)


def test_not_a_slide(tmp_path):
    bogus = tmp_path / "notes.svs"
    bogus.write_text("not an image")
    with pytest.raises(InputError, match="is not a readable slide"):
        open_slide(bogus)
    with pytest.raises(InputError, match="does not exist"):
        open_slide(tmp_path / "missing.svs")


def test_no_reader_installed_is_missing_dependency(make_slide, monkeypatch):
    def missing(reader):
        raise MissingDependency(f"{reader} is needed: pip install 'virchow-rt[slides]'")

    monkeypatch.setattr(reader_module, "_load", missing)
    with pytest.raises(MissingDependency, match=r"virchow-rt\[slides\]"):
        open_slide(make_slide().path)


def test_find_slides(make_slide, tmp_path):
    a = make_slide("a.tif", 256, 256, ())
    b = make_slide("b.svs", 256, 256, ())
    (a.path.parent / "readme.txt").write_text("x")
    assert find_slides([a.path.parent]) == [a.path.resolve(), b.path.resolve()]
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.tif").write_bytes(a.path.read_bytes())
    with pytest.raises(InputError, match="both write a.h5"):
        find_slides([a.path, other / "a.tif"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no slides found"):
        find_slides([empty])
    with pytest.raises(InputError, match="does not exist"):
        find_slides([tmp_path / "nowhere.svs"])


def test_transparent_pixels_become_glass_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgb = to_rgb(rgba)
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[1, 1].tolist() == [255, 255, 255]
    with pytest.raises(InputError, match="8-bit"):
        to_rgb(np.zeros((2, 2, 3), np.uint16))


def test_slides_package_does_not_import_torch():
    code = "import sys; sys.modules['torch'] = None; import virchow_rt.slides; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
