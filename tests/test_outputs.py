"""Output locations are checked before any work, errors are one line, and a failed run creates nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from virchow_rt.cli.main import main
from virchow_rt.errors import OutputError
from virchow_rt.files import check_output

UNWRITABLE = Path("/proc/virchow-rt-test")  # /proc takes no new files, even from root


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_check_output_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "a_file", "--out", folder=True)
    with pytest.raises(OutputError, match=r"names a file \(\.h5\).*--out .*one"):
        check_output(tmp_path / "one.h5", "--out", folder=True)
    with pytest.raises(OutputError, match="a_file is a file, so nothing can be written under it"):
        check_output(tmp_path / "a_file" / "emb.npy", "--out", folder=False)
    with pytest.raises(OutputError, match="cannot write in /proc"):
        check_output(UNWRITABLE / "emb.npy", "--out", folder=False)
    assert check_output(tmp_path / "new" / "deeper", "--out", folder=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_export_refuses_an_unwritable_out_before_building(capsys, monkeypatch) -> None:
    from virchow_rt.export import pipeline

    built: list[str] = []
    monkeypatch.setattr(pipeline, "build_model", lambda variant, *a, **k: built.append(variant))
    assert main(["export", "virchow2-tiny", "--random-weights", "--out", str(UNWRITABLE / "m")]) == 2
    assert "cannot write in /proc" in _one_line(capsys) and built == []  # refused before the model is built


def test_embed_refuses_a_bad_out_before_embedding(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "t.npy", np.zeros((2, 224, 224, 3), np.uint8))
    (tmp_path / "a_file").write_text("x")
    args = ["embed", str(tmp_path / "missing-model.onnx"), str(tmp_path / "t.npy"), "--out"]
    assert main([*args, str(tmp_path / "a_file" / "e.npy")]) == 2  # refused before the model is opened
    assert "is a file, so nothing can be written under it" in _one_line(capsys)


@pytest.mark.parametrize("out", ["one.h5", "a_file"])
def test_slides_refuses_a_file_for_its_folder_and_creates_nothing(tmp_path: Path, capsys, out: str) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "s.tif").write_bytes(b"")
    assert main(["slides", str(tmp_path / "s.tif"), "--model", str(tmp_path / "m.onnx"), "--out",
                 str(tmp_path / out)]) == 2  # fmt: skip
    assert "--out" in _one_line(capsys) and not (tmp_path / "one.h5").exists()


def test_a_slides_run_whose_model_fails_leaves_no_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "s.tif").write_bytes(b"")
    out = tmp_path / "features"
    assert (
        main(["slides", str(tmp_path / "s.tif"), "--model", str(tmp_path / "m.onnx"), "--out", str(out)]) == 2
    )
    assert "m.onnx does not exist" in _one_line(capsys) and not out.exists()
