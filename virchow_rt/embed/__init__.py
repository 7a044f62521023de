"""Embedding tiles: :class:`Embedder` (the one batch loop over a backend) and tile sources (arrays, image
files, folders). Never imports torch."""

from virchow_rt.embed.embedder import Embedder
from virchow_rt.embed.tiles import TileSource, open_tiles

__all__ = ["Embedder", "TileSource", "open_tiles"]
