"""``--mirror-folders`` (issue 24, item 11): same-named slides in different sub-folders of a read-only drive
write ``<out>/<sub/folder>/<slide>.h5``; everything named after a slide follows its key (relative path)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from slide_helpers import FakeBackend, same_outputs

from virchow_rt.errors import InputError, OutputError
from virchow_rt.slides import SlideSettings, keyed_slides, locks, process_slides, read_features
from virchow_rt.slides.coords import coords_file
from virchow_rt.slides.reader import slide_file
from virchow_rt.slides.summary import read_states, state_path

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")
MIRROR = SlideSettings(recursive=True, mirror_folders=True)
#: TRIDENT's coords attributes of a 1792 x 1344 slide at 0.5 µm/px, tiled at 20x
TRIDENT = {"patch_size": 224, "patch_size_level0": 224, "overlap": 0, "level0_magnification": 20,
           "target_magnification": 20, "name": "s", "level0_width": 1792, "level0_height": 1344}  # fmt: skip


@pytest.fixture
def drive(make_slide, tmp_path: Path) -> Path:
    """A read-only drive's layout: two different slides, both named ``s.tif``, in caseA/ and caseB/."""
    root = tmp_path / "drive"
    slides = {
        "caseA": make_slide("a.tif"),
        "caseB": make_slide("b.tif", patches=((100, 100, 900, 600),), seed=1),
    }
    for case, synth in slides.items():
        (root / case).mkdir(parents=True)
        shutil.copyfile(synth.path, root / case / "s.tif")
    return root


def run(slides, out: Path, settings: SlideSettings = MIRROR, lines: list[str] | None = None) -> dict:
    log = lines.append if lines is not None else lambda line: None
    return process_slides([str(s) for s in slides], FakeBackend(), out, settings, log=log, warn=log)


def statuses(summary: dict, part: str = "slides") -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary[part]}


def test_without_the_option_the_collision_names_it_as_the_fix(drive: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"both write s\.h5; pass --mirror-folders to write caseA/s\.h5"):
        run([drive], tmp_path / "out", SlideSettings(recursive=True))
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="add --recursive"):
        run([drive], tmp_path / "out", SlideSettings(mirror_folders=True))


def test_mirrored_outputs_equal_separate_runs_and_a_rerun_skips_both(drive: Path, tmp_path: Path) -> None:
    out, lines = tmp_path / "out", []
    summary = run([drive], out, dataclasses.replace(MIRROR, qc=True), lines)
    assert statuses(summary) == {"caseA/s": "done", "caseB/s": "done"}, lines
    assert [r["name"] for r in summary["this_run"]] == ["caseA/s", "caseB/s"]
    assert any("caseB/s.tif" in line for line in lines)  # the console tells the two apart
    assert not (out / "s.h5").exists()
    for case in ("caseA", "caseB"):
        alone = tmp_path / f"alone-{case}"
        run([drive / case], alone, SlideSettings(qc=True))
        same_outputs(out / case / "s.h5", alone / "s.h5")
        assert (out / case / "s.qc.png").read_bytes() == (alone / "s.qc.png").read_bytes()
        state = json.loads((out / "slide_states" / case / "s.json").read_text())
        assert state["name"] == f"{case}/s" and state["output"] == str(out / case / "s.h5")
    assert not any(p.name.startswith(".") for p in out.rglob("*") if "slide_states" not in p.parts)
    assert sorted(read_states(out)) == ["caseA/s", "caseB/s"]  # what another run of the folder reads

    again = run([drive], out, dataclasses.replace(MIRROR, qc=True))
    assert statuses(again, "this_run") == {"caseA/s": "skipped", "caseB/s": "skipped"}
    assert statuses(again) == {"caseA/s": "done", "caseB/s": "done"}  # two slides, not four
    with pytest.raises(OutputError, match="mirror_folders True -> False"):  # one layout per folder
        run([drive / "caseA"], out, SlideSettings())


def test_a_folder_of_runs_from_before_the_option_is_not_a_changed_configuration(
    drive: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run([drive / "caseA"], out, SlideSettings())
    config = json.loads((out / "run_config.json").read_text())
    del config["mirror_folders"]  # as an older version wrote it
    (out / "run_config.json").write_text(json.dumps(config))
    assert statuses(run([drive / "caseA"], out, SlideSettings()), "this_run") == {"s": "skipped"}
    with pytest.raises(OutputError, match="mirror_folders False -> True"):
        run([drive], out)


def test_coords_dir_is_looked_up_in_the_mirrored_sub_folder(drive: Path, tmp_path: Path) -> None:
    given = {"caseA": [[0, 0], [224, 224]], "caseB": [[448, 448]]}
    coords = tmp_path / "trident"
    for case, tail in (("caseA", "_patches.h5"), ("caseB", ".h5")):
        (coords / case).mkdir(parents=True)
        with h5py.File(coords / case / f"s{tail}", "w") as f:
            f.create_dataset("coords", data=np.asarray(given[case])).attrs.update(TRIDENT)
    out = tmp_path / "out"
    summary = run([drive], out, dataclasses.replace(MIRROR, coords=str(coords)))
    assert statuses(summary) == {"caseA/s": "done", "caseB/s": "done"}, summary["failures"]
    for case, rows in given.items():
        np.testing.assert_array_equal(read_features(out / case / "s.h5")["coords"], rows)

    elsewhere = tmp_path / "elsewhere"  # a sub-folder of --coords that leads out of it
    shutil.move(coords / "caseB", elsewhere)
    (coords / "caseB").symlink_to(elsewhere, target_is_directory=True)
    again = run([drive], tmp_path / "again", dataclasses.replace(MIRROR, coords=str(coords)))
    failed = {f["name"]: f["reason"] for f in again["failures"]}
    assert list(failed) == ["caseB/s"] and "through a symlink" in failed["caseB/s"]


def test_nothing_is_written_outside_out(drive: Path, tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    for bad in ("../x", "/tmp/x", "caseA/../../x"):
        with pytest.raises(InputError, match="not inside"):
            slide_file(out, bad, ".h5")
        with pytest.raises(InputError, match="not inside"):
            state_path(out, bad)
    (tmp_path / "coords").mkdir()
    (tmp_path / "x.h5").touch()  # found through '..': refused, never read
    with pytest.raises(InputError, match="not inside"):
        coords_file(tmp_path / "coords", "../x")
    elsewhere.mkdir()
    out.mkdir()
    (out / "caseA").symlink_to(elsewhere, target_is_directory=True)  # a mirrored sub-folder leading out
    with pytest.raises(InputError, match=r"caseA/s\.h5.*through a symlink"):
        run([drive], out)
    assert list(elsewhere.iterdir()) == [] and list(out.iterdir()) == [
        out / "caseA"
    ]  # refused before any work


def test_inputs_that_mirror_to_the_same_path_are_refused_in_one_line(drive: Path, tmp_path: Path) -> None:
    other = tmp_path / "drive2"
    shutil.copytree(drive / "caseA", other / "caseA")
    assert keyed_slides([drive], recursive=True, mirror_folders=True) == {
        (drive / case / "s.tif").resolve(): f"{case}/s" for case in ("caseA", "caseB")
    }
    with pytest.raises(InputError, match=r"both write caseA/s\.h5 \(the same path under the folders given\)"):
        keyed_slides([drive, other], recursive=True, mirror_folders=True)
    assert keyed_slides([drive / "caseA" / "s.tif"], mirror_folders=True) == {  # a file given: its name
        (drive / "caseA" / "s.tif").resolve(): "s"
    }


def test_stale_locks_in_mirrored_sub_folders_are_cleared(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = locks.lock_path(out / "caseA" / "s.h5")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "node-17", "pid": 1, "started": time.time(), "run": "old"}))
    old = time.time() - 25 * 3600
    os.utime(lock, (old, old))
    # no run claimed the folder yet (a first run with --clear-stale-locks): nothing in it is judged
    assert locks.clear_stale_locks(out) == ([], []) and lock.exists()
    (out / "run_config.json").mkdir()
    with pytest.raises(InputError, match=r"run_config\.json cannot be read \(not a regular file"):
        locks.clear_stale_locks(out)
    (out / "run_config.json").rmdir()
    (out / "run_config.json").write_text(json.dumps({"mirror_folders": False}))
    assert locks.clear_stale_locks(out) == ([], [])  # flat: sub-folders are not slides' folders
    (out / "run_config.json").write_text(json.dumps({"mirror_folders": True}))
    removed, kept = locks.clear_stale_locks(out)
    assert [p for p, _, _ in removed] == [lock] and kept == [] and not lock.exists()


def test_clearing_stale_locks_never_touches_slides_named_like_locks(drive: Path, tmp_path: Path) -> None:
    for name in (".x.lock.stale-1.tif", ".a.h5.lock.stale-1.tif", f".b.h5.lock.release-{'0' * 32}.tif"):
        shutil.copyfile(drive / "caseA" / "s.tif", drive / "caseA" / name)
    out = tmp_path / "out"
    run([drive], out, dataclasses.replace(MIRROR, qc=True))
    old = time.time() - 3600
    before = sorted(out.rglob("*"))
    for path in before:
        os.utime(path, (old, old), follow_symlinks=False)
    assert locks.clear_stale_locks(out) == ([], [])
    assert sorted(out.rglob("*")) == before


def test_a_symlinked_sub_folder_of_out_that_joins_two_slides_is_refused(drive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "caseB").mkdir(parents=True)
    (out / "caseA").symlink_to("caseB", target_is_directory=True)  # inside --out, but caseA/s is caseB/s
    with pytest.raises(
        InputError, match=r"slides .*caseA/s\.tif and .*caseB/s\.tif would both write .*caseB/s"
    ):
        run([drive], out)
    assert list((out / "caseB").iterdir()) == []  # refused before any work


@pytest.mark.parametrize(
    ("link", "settings"),
    [("slide_states/caseB", MIRROR), ("caseB/s.qc.png", dataclasses.replace(MIRROR, qc=True)),
     ("pt_files/caseB", dataclasses.replace(MIRROR, also_pt=True))],
)  # fmt: skip
def test_every_file_of_a_slide_that_leads_out_is_refused_before_any_work(
    drive: Path, tmp_path: Path, link: str, settings: SlideSettings
) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / link).parent.mkdir(parents=True)
    (out / link).symlink_to(elsewhere / "x")
    with pytest.raises(InputError, match=rf"slide 'caseB/s' would use .*{link}.*through a symlink"):
        run([drive], out, settings)
    assert list(elsewhere.iterdir()) == [] and not (out / "caseA").exists()


def test_a_link_leading_out_refuses_only_the_file_found_through_it(tmp_path: Path) -> None:
    coords, elsewhere = tmp_path / "coords", tmp_path / "elsewhere"
    (coords / "patches" / "caseA").mkdir(parents=True)
    elsewhere.mkdir()
    (coords / "caseA").symlink_to(elsewhere, target_is_directory=True)  # holds no file of the slide
    inside = coords / "patches" / "caseA" / "s_patches.h5"
    inside.touch()
    assert coords_file(coords, "caseA/s") == inside
    (elsewhere / "s.h5").touch()  # now the first place looked in is a file reached through the link
    with pytest.raises(InputError, match="through a symlink"):
        coords_file(coords, "caseA/s")
    with pytest.raises(InputError, match="TRIDENT and CLAM write flat folders"):
        coords_file(coords, "caseB/s")
