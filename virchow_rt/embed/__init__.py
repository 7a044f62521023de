"""Embedding tiles: :class:`Embedder` (the one batch loop over a backend) and tile sources (arrays, image
files, folders). Never imports torch."""

from virchow_rt.embed.embedder import Embedder, StreamStats
from virchow_rt.embed.tiles import TileSource, open_tiles

__all__ = ["Embedder", "StreamStats", "TileSource", "open_tiles"]
