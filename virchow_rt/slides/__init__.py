"""Whole slides -> tissue tiles -> embeddings, in the HDF5 layout pathology tools read (TRIDENT, CLAM).

- :func:`open_slide`: OpenSlide, or tiffslide where OpenSlide is missing or cannot read the file.
- :func:`tissue_mask`, :func:`tile_grid`, :func:`region_grid`: where the tiles are (level-0 coordinates).
- :func:`iter_tiles`, :func:`iter_embeddings`, :func:`embed_slide`, :func:`embed_regions`: the Python API,
  no files written.
- :func:`write_synthetic_slide`: a pyramidal TIFF of real IHC tissue on glass (tests, demos, benchmarks).
- :func:`process_slides`: many slides -> ``<out>/<name>.h5`` + ``summary.json``, resumable; the file
  layout is documented in :mod:`virchow_rt.slides.writer`, the summary in :mod:`virchow_rt.slides.summary`.
  :func:`process_slides_ray`: the same over Ray workers. Both drive a :class:`SlideJob` per slide.

Needs the ``slides`` extra (h5py, scikit-image, openslide-python + openslide-bin or tiffslide); each is
imported on first use with an error that says what to install.
"""

from __future__ import annotations

from virchow_rt.slides.embed import (
    EmbeddingStream,
    RegionEmbedding,
    SlideEmbedding,
    complete_groups,
    embed_regions,
    embed_slide,
    iter_embeddings,
    iter_tiles,
)
from virchow_rt.slides.grid import (
    TileGrid,
    TilePlan,
    level0_magnification,
    magnification_to_mpp,
    nominal_magnification,
    pick_level,
    tile_grid,
)
from virchow_rt.slides.job import SlideJob
from virchow_rt.slides.local import process_slides
from virchow_rt.slides.mask import MaskConfig, TissueMask, tissue_mask
from virchow_rt.slides.ray import process_slides_ray
from virchow_rt.slides.reader import SLIDE_SUFFIXES, Slide, find_slides, keyed_slides, open_slide
from virchow_rt.slides.regions import RegionGrid, RegionLayout, region_grid, region_layout
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import SlideRecord
from virchow_rt.slides.synthetic import SyntheticSlide, write_synthetic_slide
from virchow_rt.slides.tiles import ReadStats, TileBatch, TileReader, read_tile
from virchow_rt.slides.writer import FeatureWriter, check_complete, read_features

__all__ = [
    "SLIDE_SUFFIXES",
    "EmbeddingStream",
    "FeatureWriter",
    "MaskConfig",
    "ReadStats",
    "RegionEmbedding",
    "RegionGrid",
    "RegionLayout",
    "Slide",
    "SlideEmbedding",
    "SlideJob",
    "SlideRecord",
    "SlideSettings",
    "SyntheticSlide",
    "TileBatch",
    "TileGrid",
    "TilePlan",
    "TileReader",
    "TissueMask",
    "check_complete",
    "complete_groups",
    "embed_regions",
    "embed_slide",
    "find_slides",
    "iter_embeddings",
    "iter_tiles",
    "keyed_slides",
    "level0_magnification",
    "magnification_to_mpp",
    "nominal_magnification",
    "open_slide",
    "pick_level",
    "process_slides",
    "process_slides_ray",
    "read_features",
    "read_tile",
    "region_grid",
    "region_layout",
    "tile_grid",
    "tissue_mask",
    "write_synthetic_slide",
]
