"""Compatibility alias: the Ray path of ``virchow-rt slides`` lives in :mod:`virchow_rt.slides.ray`."""

from virchow_rt.slides.ray import process_slides_ray

__all__ = ["process_slides_ray"]
