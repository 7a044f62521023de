"""One export at a time writes a folder, and what its manifest says is checked before it is kept."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from virchow_rt.contract import Manifest
from virchow_rt.errors import OutputError
from virchow_rt.export import pipeline
from virchow_rt.export.pipeline import export_model

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")
NAME = "virchow2-tiny"


def _export(folder: Path, precisions: list[str], **kwargs) -> Manifest:
    kwargs.setdefault("random_weights", True)
    return export_model(NAME, folder, precisions=precisions, parity_tiles=4, **kwargs)


def test_a_second_export_into_a_folder_being_written_fails_at_once(tmp_path, monkeypatch):
    building, release, results = threading.Event(), threading.Event(), {}
    real = pipeline.build_model

    def held_build(*args, **kwargs):
        if not building.is_set():  # the first export: hold it here, its lock taken
            building.set()
            assert release.wait(60), "the second export never finished"
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_model", held_build)

    def first() -> None:
        try:
            results["first"] = _export(tmp_path, ["fp32"])
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            results["first"] = err

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert building.wait(60), "the first export never started building"
        with pytest.raises(OutputError, match="another export is writing .*; wait for it or export"):
            _export(tmp_path, ["fp16"])
    finally:
        release.set()
        thread.join(120)
    manifest = results["first"]
    assert isinstance(manifest, Manifest), manifest
    assert [a.precision for a in manifest.artifacts] == ["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", f"{NAME}.fp32.onnx"]  # no lock
    assert [a.precision for a in _export(tmp_path, ["fp16"]).artifacts] == ["fp32", "fp16"]  # free again


def test_a_refused_export_into_a_new_folder_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "export"
    with pytest.raises(Exception, match="weights"):
        export_model(NAME, out, weights=tmp_path / "missing.pt", precisions=["fp32"], parity_tiles=4)
    assert list(tmp_path.iterdir()) == []
