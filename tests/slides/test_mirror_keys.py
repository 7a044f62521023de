"""Slide keys (``--mirror-folders``) that would share a file, leave their folder or depend on the order of the
paths given: refused before any work, naming the slide; links that are skipped or merged: a warning."""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
import warnings
from pathlib import Path

import pytest

from virchow_rt.errors import InputError
from virchow_rt.slides import keyed_slides
from virchow_rt.slides.keys import MAX_KEY_PART_BYTES


@pytest.fixture
def put(make_slide, tmp_path: Path):
    """``put("caseA/s.tif")``: a copy of one small synthetic slide at ``<tmp>/drive/caseA/s.tif``."""
    synth = make_slide("base.tif")

    def put(relative: str) -> Path:
        path = tmp_path / "drive" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(synth.path, path)
        return path

    return put


def keys(*inputs: Path, mirror: bool = True) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning unless a test asks for one
        return sorted(keyed_slides(inputs, recursive=True, mirror_folders=mirror).values())


def test_keys_equal_but_for_case_or_unicode_form_share_a_file_only_where_names_ignore_case(
    put, tmp_path: Path, monkeypatch
) -> None:
    """``S`` and ``s`` are two files on ext4 or XFS (both kept, as before), one on macOS, Windows or an SMB
    share (refused before any work there); the folder is asked which it is."""
    from virchow_rt.slides import SlideSettings, folder

    drive, out = tmp_path / "drive", tmp_path / "out"
    put("caseA/S.tif")
    put("casea/s.tif")
    put(unicodedata.normalize("NFC", "café/s.tif"))
    put(unicodedata.normalize("NFD", "café/s.tif"))
    keyed = keyed_slides([drive], recursive=True, mirror_folders=True)
    assert len(set(keyed.values())) == 4
    assert not folder.ignores_case(out)  # this machine's /tmp tells S from s
    folder.check_layout(out, keyed, SlideSettings())
    monkeypatch.setattr(folder, "ignores_case", lambda path: True)
    with pytest.raises(InputError, match="names that differ only in case"):
        folder.check_layout(out, keyed, SlideSettings())
    assert not list(tmp_path.rglob(".virchow-rt-case-probe-*"))  # the probe file is removed


@pytest.mark.parametrize("suffix", [".h5", ".qc.png", ".pt", ".json"])
def test_a_key_inside_another_slides_file_is_refused(put, tmp_path: Path, suffix: str) -> None:
    put("k/a.bif")
    inner = put(f"k/a{suffix}/x.tif")
    put("k/b.tif")
    with pytest.raises(InputError, match=rf"slide {inner} .*is inside k/a{suffix}, the file slide .*a\.bif"):
        keys(tmp_path / "drive")


def test_a_name_too_long_for_its_lock_is_refused(put, tmp_path: Path) -> None:
    put("caseA/ok.tif")
    fits = put("caseA/" + "L" * MAX_KEY_PART_BYTES + ".tif")
    assert len(keys(tmp_path / "drive")) == 2
    fits.unlink()
    put("caseA/" + "é" * (MAX_KEY_PART_BYTES // 2 + 1) + ".tif")  # counted in bytes, as file systems do
    with pytest.raises(InputError, match=rf"has a {MAX_KEY_PART_BYTES + 2}-byte name.*rename the slide"):
        keys(tmp_path / "drive")


@pytest.mark.parametrize(
    ("name", "problem"),
    [("dots/..tif", r"'dots/\.' has a '\.' or '\.\.' part"), ("caseA/...tif", r"'caseA/\.\.' has a"),
     ("..\\x.tif", r"'\.\.\\\\x' reads as a Windows"), ("C:x.tif", "'C:x' reads as a Windows")],
)  # fmt: skip
def test_a_name_that_cannot_be_a_key_is_refused_naming_the_slide(
    put, tmp_path: Path, name: str, problem: str
) -> None:
    put("caseA/s.tif")
    bad = put(name)
    with pytest.raises(
        InputError, match=rf"slide {re.escape(str(bad))} cannot be named in --out: its key {problem}"
    ):
        keys(tmp_path / "drive")


def test_the_suffix_is_cut_from_the_name_only(put, tmp_path: Path) -> None:
    put("a.b/x.ome.tif")
    put("c/y.h5.tif")
    assert keys(tmp_path / "drive") == ["a.b/x.ome", "c/y.h5"]
    assert keys(tmp_path / "drive" / "a.b" / "x.ome.tif", mirror=False) == ["x.ome"]


def test_paths_given_inside_one_another_are_refused_in_either_order(put, tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    slide = put("caseA/s.tif")
    put("caseB/t.tif")
    for inputs in ([drive, drive / "caseA"], [drive / "caseA", drive], [slide, drive]):
        with pytest.raises(InputError, match=r"is inside .*drive, also given; .*give only"):
            keys(*inputs)
    assert keys(drive, Path(f"{drive}/")) == ["caseA/s", "caseB/t"]  # one folder twice: one key each
    assert keys(drive, drive / "caseA", mirror=False) == ["s", "t"]  # keyed by name: no order to depend on


def test_symlinked_sub_folders_and_linked_slides_are_named_in_a_warning(put, tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    put("caseA/s.tif")
    blob = put("store/blob.tif")
    (drive / "caseB").symlink_to(drive / "store", target_is_directory=True)
    with pytest.warns(UserWarning, match=r"does not follow symlinked sub-folders: caseB in .*drive skipped"):
        assert sorted(keyed_slides([drive], True, True).values()) == ["caseA/s", "store/blob"]
    (drive / "caseB").unlink()
    (drive / "caseC").mkdir()
    os.symlink(blob, drive / "caseC" / "s.tif")
    with pytest.warns(UserWarning, match=r"slides caseC/s and store/blob are one file .*embedded once"):
        assert sorted(keyed_slides([drive], True, True).values()) == ["caseA/s", "caseC/s"]
