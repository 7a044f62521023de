"""Preprocessing kernels. The CPU reference resize reproduces timm's eval transform geometry exactly."""

from __future__ import annotations

from virchow_rt.kernels.resize import resize_geometry, resize_tile, resize_tiles

__all__ = ["resize_geometry", "resize_tile", "resize_tiles"]
