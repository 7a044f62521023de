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
