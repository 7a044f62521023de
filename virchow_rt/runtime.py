"""The names ``virchow_rt.runtime`` offered before the code moved to ``backends/`` and ``embed/``: kept so
that existing scripts run unchanged. New code imports from :mod:`virchow_rt` or those packages."""

from virchow_rt.backends import BACKENDS, Backend, ModelInfo, open_backend
from virchow_rt.backends.capabilities import capabilities
from virchow_rt.embed import Embedder, TileSource, open_tiles

__all__ = [
    "BACKENDS", "Backend", "Embedder", "ModelInfo", "TileSource", "capabilities", "open_backend", "open_tiles"
]
