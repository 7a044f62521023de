"""An interrupt (Ctrl-C, SIGTERM) at any point leaves a folder whose manifest lists the files in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from virchow_rt import files
from virchow_rt.contract import Artifact, Manifest
from virchow_rt.export.merge import commit

GRAPH = "m.fp32.onnx"


def _folder_with(folder: Path, content: bytes) -> Manifest:
    """``folder`` holding GRAPH with ``content`` and the manifest that lists it."""
    folder.mkdir()
    (folder / GRAPH).write_bytes(content)
    manifest = Manifest(variant="m", artifacts=(_entry(folder / GRAPH),))
    manifest.write(folder)
    return manifest


def _entry(path: Path) -> Artifact:
    return Artifact(path=path.name, format="onnx", precision="fp32", sha256=files.sha256_file(path))


def test_an_interrupt_after_the_new_manifest_is_in_place_undoes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    old = _folder_with(folder, b"old graph")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / GRAPH).write_bytes(b"new graph")
    new = Manifest(variant="m", artifacts=(_entry(staging / GRAPH),))
    real_fsync = files.fsync_path

    def fsync(path):
        if Path(path) == folder:  # the folder's fsync, after manifest.json was renamed into place
            assert Manifest.read(folder) == new
            raise KeyboardInterrupt
        real_fsync(path)

    monkeypatch.setattr(files, "fsync_path", fsync)
    with pytest.raises(KeyboardInterrupt):
        commit(staging, folder, new.artifacts, new)
    listed = Manifest.read(folder)
    assert listed == new != old  # the new manifest stays, and with it the new files it lists
    assert (folder / GRAPH).read_bytes() == b"new graph"
    assert files.sha256_file(folder / GRAPH) == listed.artifact_for(GRAPH).sha256


def test_an_interrupt_before_the_manifest_is_renamed_puts_the_old_files_back(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    old = _folder_with(folder, b"old graph")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / GRAPH).write_bytes(b"new graph")
    new = Manifest(variant="m", artifacts=(_entry(staging / GRAPH),))
    real_fsync = files.fsync_path

    def fsync(path):
        if Path(path).name.endswith(".partial"):  # the new manifest's data, before its rename
            raise KeyboardInterrupt
        real_fsync(path)

    monkeypatch.setattr(files, "fsync_path", fsync)
    with pytest.raises(KeyboardInterrupt):
        commit(staging, folder, new.artifacts, new)
    assert Manifest.read(folder) == old and (folder / GRAPH).read_bytes() == b"old graph"


def test_sigterm_is_left_to_its_default_during_the_tensorrt_build(tmp_path, monkeypatch):
    """The handler that turns SIGTERM into KeyboardInterrupt waits for the build's C call (minutes) to
    return; the ONNX is committed by then, so the build runs with the disposition from before the export."""
    import signal

    from virchow_rt.backends import tensorrt_module
    from virchow_rt.cli.main import main
    from virchow_rt.export import pipeline

    seen: dict[str, object] = {}
    real_build = pipeline.build_model

    def build_model(*args, **kwargs):
        seen["onnx"] = signal.getsignal(signal.SIGTERM)
        return real_build(*args, **kwargs)

    def build_engine(*args, **kwargs):
        seen["tensorrt"] = signal.getsignal(signal.SIGTERM)

    monkeypatch.setattr(tensorrt_module, "import_tensorrt", lambda *a: None)  # none here: never used
    monkeypatch.setattr(pipeline, "build_model", build_model)
    monkeypatch.setattr(pipeline, "_build_engine", build_engine)
    before = signal.getsignal(signal.SIGTERM)
    args = ["export", "virchow2-tiny", "--out", str(tmp_path), "--random-weights", "--precision", "fp16"]
    with pytest.warns(UserWarning, match="random"):
        assert main([*args, "--parity-tiles", "2", "--tensorrt"]) == 0
    assert seen["onnx"] not in (before, signal.SIG_DFL)  # the ONNX stages: SIGTERM rolls back
    assert seen["tensorrt"] == before and signal.getsignal(signal.SIGTERM) == before
