"""The QC picture explains itself: under the thumbnail, a legend names the slide, the tile count and what
the green and blue marks are, and the whole picture stays within its size bound. It appears only with its
finished slide, as a palette PNG (issue 24, item 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_helpers import FakeBackend

from virchow_rt.slides import SlideSettings, process_slides
from virchow_rt.slides.grid import tile_grid
from virchow_rt.slides.mask import LEGEND_PX, QC_MAX_SIDE, QC_OUTLINE, QC_TILE, qc_picture
from virchow_rt.slides.reader import open_slide

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")


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


class StopOnceDone(FakeBackend):
    """The model, stopped (as by Ctrl-C) at its first batch after ``done`` appears: mid-slide, no sleep."""

    def __init__(self, done: Path) -> None:
        super().__init__()
        self.done = done

    def run(self, tiles: np.ndarray) -> np.ndarray:
        if self.done.exists():
            raise KeyboardInterrupt
        return super().run(tiles)


def test_an_interrupted_slide_leaves_no_qc_picture_and_a_finished_one_has_a_light_one(make_slide, tmp_path):
    slides = [make_slide("a.tif").path, make_slide("b.tif", 3584, 1344, seed=1).path]
    out = tmp_path / "out"
    settings = SlideSettings(qc=True, batch_size=4, prefetch_slides=0)  # b is prepared once a is done
    with pytest.raises(KeyboardInterrupt):
        process_slides(slides, StopOnceDone(out / "a.h5"), out, settings, log=lambda line: None)
    assert (out / "a.qc.png").exists()
    assert not (out / "b.h5").exists() and not (out / "b.qc.png").exists()  # b was in the model
    summary = process_slides(slides, FakeBackend(), out, settings, log=lambda line: None)
    assert [s["status"] for s in summary["this_run"]] == ["skipped", "done"]
    with Image.open(out / "b.qc.png") as picture:
        width, height = picture.size
        assert picture.mode == "P" and max(width, height) <= QC_MAX_SIDE  # the 3584-px slide scaled down
    # a byte per pixel at most (the palette's indices, before compression): a third of an RGB picture
    assert (out / "b.qc.png").stat().st_size <= width * height + height + 4096
