"""Re-exporting a graph that had external data (``.onnx.data``) without it, and back: the stale data file is
moved aside and gone after success, and put back (or the new one removed) when the export fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from virchow_rt.contract import Manifest
from virchow_rt.export import onnx_export
from virchow_rt.export.pipeline import export_model

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")
NAME = "virchow2-tiny"
FP32 = f"{NAME}.fp32.onnx"
DATA = f"{FP32}.data"


def _export(folder: Path, monkeypatch, external: bool) -> Manifest:
    # threshold 0: every graph keeps its weights in <name>.data, as a ViT-H/G above 2 GB does
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0 if external else 2**31 - 2**27)
    return export_model(NAME, folder, random_weights=True, precisions=["fp32"], parity_tiles=4)


def _state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(folder.iterdir())}


def _fail_write(*args, **kwargs):
    raise RuntimeError("planted failure")


@pytest.mark.parametrize("first_external", [True, False])
def test_the_other_layouts_data_file_is_gone_after_success(tmp_path, monkeypatch, first_external):
    first = _export(tmp_path, monkeypatch, external=first_external)
    assert (first.artifact_for(FP32).external_data == DATA) is first_external
    assert (tmp_path / DATA).exists() is first_external
    manifest = _export(tmp_path, monkeypatch, external=not first_external)
    assert (manifest.artifact_for(FP32).external_data == DATA) is not first_external
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", FP32, *([DATA] if not first_external else [])]
    )  # no stale data file, no staging folder


@pytest.mark.parametrize("first_external", [True, False])
def test_a_failed_export_puts_the_old_layout_back(tmp_path, monkeypatch, first_external):
    _export(tmp_path, monkeypatch, external=first_external)
    old, manifest = _state(tmp_path), Manifest.read(tmp_path)
    monkeypatch.setattr(Manifest, "write", _fail_write)
    with pytest.raises(RuntimeError, match="planted failure"):
        _export(tmp_path, monkeypatch, external=not first_external)
    assert _state(tmp_path) == old  # same files (inodes) and bytes: the old data file back, a new one gone
    monkeypatch.undo()
    assert Manifest.read(tmp_path) == manifest
