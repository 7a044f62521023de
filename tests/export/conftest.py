"""Fixtures for the export tests: tiny exports made once per variant, a published-layout checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from export_helpers import TINY, write_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A virchow2-tiny checkpoint folder in the published layout (both weight files)."""
    folder = tmp_path_factory.mktemp("ckpt") / "Virchow2"
    write_checkpoint(folder, "virchow2-tiny")
    return folder


@pytest.fixture(scope="session", params=TINY)
def tiny_export(request, tmp_path_factory) -> tuple[str, Path, dict]:
    """(variant name, export folder, manifest) of a random-weights fp32 + fp16 export with both outputs."""
    from virchow_rt.export.pipeline import export_model

    out = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = export_model(
            request.param, out, random_weights=True, outputs=("embedding", "patch_tokens"), parity_tiles=8
        )
    return request.param, out, manifest
