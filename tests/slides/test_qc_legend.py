"""The QC picture explains itself: under the thumbnail, a legend names the slide, the tile count and what
the green and blue marks are, and the whole picture stays within its size bound."""

from __future__ import annotations

import numpy as np

from virchow_rt.slides.grid import tile_grid
from virchow_rt.slides.mask import LEGEND_PX, QC_OUTLINE, QC_TILE, qc_picture
from virchow_rt.slides.reader import open_slide


def test_the_legend_is_drawn_below_the_thumbnail_in_the_marks_colours(make_slide):
    synth = make_slide("case7.tif", width=3584, height=1344)  # wide: the legend spans the full width
    with open_slide(synth.path) as slide:
        grid = tile_grid(slide)
        picture = qc_picture(slide, grid.mask, grid.coords, grid.patch_size_level0, max_side=1024)
    assert max(picture.shape[:2]) <= 1024
    legend = picture[-LEGEND_PX:]  # (LEGEND_PX, W, 3)
    assert (legend == 255).all(axis=-1).mean() > 0.8  # a white strip...
    near = lambda colour: (np.abs(legend.astype(int) - colour).max(axis=-1) < 40).sum()  # noqa: E731
    # ...with a line of text in each colour (the font is anti-aliased: near, not equal)
    assert near(QC_OUTLINE) > 20 and near(QC_TILE) > 20 and near((0, 0, 0)) > 20
