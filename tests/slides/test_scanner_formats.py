"""Slides laid out as scanners and converters write them: Aperio SVS, generic tiled TIFF, OME-TIFF.

Each is written with tifffile (JPEG tiles, levels at 4x and 16x: not powers of two) and must be detected
by OpenSlide and tiffslide with its µm/px read from that layout's own metadata, then tiled and embedded.
A corrupt JPEG tile inside an SVS fails that slide alone, or with ``skip_errors`` drops exactly the tiles
that touch it. DICOM WSI is passed through to OpenSlide (its DICOM driver) but not tested here: no
writer of DICOM WSI files installs on this machine.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from slide_helpers import STANDARD_PATCHES, FakeBackend, cosine_rows

from virchow_rt.errors import InputError
from virchow_rt.slides import SlideSettings, embed_slide, open_slide, process_slides, tile_grid
from virchow_rt.slides.synthetic import write_synthetic_slide

MPP, JPEG_TILE = 0.2527, 256  # a 40x Aperio scan's µm/px


def scanner_slide(folder: Path, layout: str, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or {"svs": "slide.svs", "ome": "slide.ome.tif", "generic": "slide.tif"}[layout])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patches = [(x * 2, y * 2, w * 2, h * 2) for x, y, w, h in STANDARD_PATCHES]  # at 40x: twice the size
        write_synthetic_slide(path, 3584, 2688, patches, mpp=MPP, layout=layout, downsamples=[4, 16],
                              compression="jpeg", tile=JPEG_TILE)  # fmt: skip
    return path


@pytest.mark.parametrize("layout", ["svs", "generic", "ome"])
@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
def test_each_layout_is_detected_with_its_mpp_and_levels(tmp_path: Path, layout: str, reader: str) -> None:
    path = scanner_slide(tmp_path, layout)
    with open_slide(path, reader=reader) as slide:
        assert slide.reader == reader and slide.mpp == pytest.approx(MPP) and slide.mpp_source == "metadata"
        if (layout, reader) == ("ome", "openslide"):
            assert slide.level_downsamples == (1.0,)  # OpenSlide reads an OME-TIFF's first level only
        else:
            assert slide.level_downsamples == (1.0, 4.0, 16.0) and slide.dimensions == (3584, 2688)
    with open_slide(path) as slide:  # auto: the reader that sees the whole pyramid
        assert slide.reader == ("tiffslide" if layout == "ome" else "openslide")
        assert len(slide.level_dimensions) == 3


def test_the_layouts_tile_and_embed_alike(tmp_path: Path) -> None:
    results = {layout: embed_slide(scanner_slide(tmp_path / layout, layout), FakeBackend()) for layout in
               ("svs", "generic", "ome")}  # fmt: skip
    svs = results["svs"]
    assert len(svs.coords) >= 10 and svs.grid.patch_size_level0 == 224 * 40 // 20  # TRIDENT's rule: 448
    for other in ("generic", "ome"):
        np.testing.assert_array_equal(results[other].coords, svs.coords)
        assert cosine_rows(results[other].features, svs.features).min() > 0.999  # the same JPEG pixels


def _corrupt_jpeg_tile(path: Path) -> tuple[int, int]:
    """Overwrite one level-0 JPEG tile with zeros (no JPEG markers left); returns its level-0 x, y."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        columns = -(-page.imagewidth // JPEG_TILE)
        index = 3 * columns + 4  # inside the first tissue rectangle
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)
    return (index % columns) * JPEG_TILE, (index // columns) * JPEG_TILE


def test_a_corrupt_jpeg_tile_fails_its_slide_alone_or_drops_exactly_the_tiles_touching_it(
    tmp_path: Path,
) -> None:
    bad, good = (
        scanner_slide(tmp_path / "in", "svs", "bad.svs"),
        scanner_slide(tmp_path / "in", "svs", "good.svs"),
    )
    x0, y0 = _corrupt_jpeg_tile(bad)
    with open_slide(bad) as slide:
        grid = tile_grid(slide, 0.5)
    size = grid.patch_size_level0
    touching = {(int(x), int(y)) for x, y in grid.coords
                if x < x0 + JPEG_TILE and x0 < x + size and y < y0 + JPEG_TILE and y0 < y + size}  # fmt: skip
    assert touching and grid.level == 0

    summary = process_slides(
        [bad, good], FakeBackend(), tmp_path / "strict", SlideSettings(), log=lambda s: None
    )
    status = {s["name"]: s for s in summary["slides"]}
    assert status["good"]["status"] == "done" and status["bad"]["status"] == "failed"
    assert "bad.svs" in status["bad"]["reason"] and not (tmp_path / "strict" / "bad.h5").exists()
    with pytest.raises(InputError, match=r"bad\.svs: tile at level-0 \(\d+, \d+\)"):
        embed_slide(bad, FakeBackend())

    result = embed_slide(bad, FakeBackend(), skip_errors=True)
    kept = {(int(x), int(y)) for x, y in result.coords}
    assert kept == {(int(x), int(y)) for x, y in grid.coords} - touching  # exactly those, no garbage rows
    assert result.read_stats.failed == len(touching)
    assert {(e["x"], e["y"]) for e in result.read_stats.errors} == touching
