"""A manifest's artifact paths stay inside their export folder: no absolute path, no '..', no symlink out
(``open_backend`` refuses them before opening anything); names that become folders are plain names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from virchow_rt.backends import open_backend
from virchow_rt.errors import InputError, ModelFileError
from virchow_rt.paths import check_name, inside_folder


def _export(folder: Path, model: Path, path: str) -> Path:
    """An export folder whose manifest lists ``path`` as its fp32 ONNX model."""
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = [{"path": path, "format": "onnx", "precision": "fp32"}]
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "artifacts": artifacts}))
    return folder


def test_a_plain_name_and_a_symlink_inside_the_folder_open(models, tmp_path):
    folder = _export(tmp_path / "export", models["fp32"], "tiny.fp32.onnx")
    shutil.copy(models["fp32"], folder / "tiny.fp32.onnx")
    with open_backend(folder) as backend:
        assert backend.path == folder / "tiny.fp32.onnx"
    (folder / "sub").mkdir()
    os.symlink("../tiny.fp32.onnx", folder / "sub" / "link.onnx")  # leads back inside: fine
    _export(folder, models["fp32"], "sub/link.onnx")
    with open_backend(folder) as backend:
        assert backend.path.name == "link.onnx"


@pytest.mark.parametrize(
    ("listed", "reason"),
    [
        ("../outside/tiny.fp32.onnx", "climbs out with '..'"),
        ("sub/../../outside/tiny.fp32.onnx", "climbs out with '..'"),
        ("ABSOLUTE", "an absolute path"),
        ("link.onnx", "through a symlink"),
        ("C:\\models\\tiny.onnx", "an absolute path"),
    ],
)
def test_a_path_that_leaves_the_folder_is_refused(models, tmp_path, listed, reason):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(models["fp32"], outside / "tiny.fp32.onnx")  # a real model there: only the path is wrong
    listed = str(outside / "tiny.fp32.onnx") if listed == "ABSOLUTE" else listed
    folder = _export(tmp_path / "export", models["fp32"], listed)
    os.symlink(outside / "tiny.fp32.onnx", folder / "link.onnx")
    with pytest.raises(ModelFileError, match=f"not a file inside .*{reason}.*do not run export folders"):
        open_backend(folder)


def test_inside_folder_refuses_what_is_not_a_relative_name(tmp_path):
    assert inside_folder(tmp_path, "a/b.onnx") == tmp_path / "a" / "b.onnx"  # need not exist
    for bad in (None, 3, "", "  ", "a\x00b", "/etc/hostname", "..", "\\\\server\\share\\x"):
        with pytest.raises(ModelFileError, match="not a file inside"):
            inside_folder(tmp_path, bad)


@pytest.mark.parametrize("bad", ["./../escaped", "../x", "a/b", ".hidden", "", "a" * 129, "x..y", "é", 5])
def test_names_that_become_folders_are_plain(bad):
    with pytest.raises(InputError, match="--name .*cannot be used as a name"):
        check_name(bad, "--name")


def test_plain_names_pass():
    for good in ("virchow2g-mini-tiny", "uni2-h_fp16", "A.1"):
        assert check_name(good, "--name") == good


@pytest.mark.parametrize("backend", ["openvino", "openvino-fp32"])
def test_the_no_fp32_hint_is_a_command_a_shell_runs_as_is(tmp_path, backend):
    import shlex

    from virchow_rt.backends.open import _pick_from_folder
    from virchow_rt.contract import Artifact, Manifest, WeightsInfo

    folder = tmp_path / "my export's; folder"
    folder.mkdir()
    (folder / "virchow2-tiny.fp16.onnx").write_bytes(b"graph")
    fp16 = Artifact(path="virchow2-tiny.fp16.onnx", format="onnx", precision="fp16")
    weights = WeightsInfo(random=True, sha256="random", source="seed 0")
    Manifest(variant="virchow2-tiny", weights=weights, artifacts=(fp16,)).write(folder)
    with pytest.raises(ModelFileError, match=f"no fp32 ONNX in .*--backend {backend} runs only that") as err:
        _pick_from_folder(folder, backend)
    command = str(err.value).split("`")[1]
    expected = ["virchow-rt", "export", "virchow2-tiny", "--out", str(folder), "--random-weights"]
    assert shlex.split(command) == [*expected, "--precision", "fp32"]
