"""Many slides -> .h5 files: TRIDENT layout, atomic, resumable, failures isolated, a run summary."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
from slide_helpers import FakeBackend

from virchow_rt.cli import main as cli
from virchow_rt.errors import InputError, OutputError, RandomWeightsWarning
from virchow_rt.slides import SlideSettings, check_complete, process_slides, read_features
from virchow_rt.slides import job as job_module
from virchow_rt.slides import tiles as tiles_module
from virchow_rt.slides.writer import TRIDENT_ATTRS

h5py = pytest.importorskip("h5py")

QUIET = {"log": lambda line: None, "warn": lambda line: None}


def _run(paths, out, settings=None, backend=None, **kw):
    settings = settings or SlideSettings()
    return process_slides([str(p) for p in paths], backend or FakeBackend(), out, settings, **{**QUIET, **kw})


def _this_run(summary):
    """What the run did with each slide given (``slides`` keeps each slide's state: "done" stays done)."""
    return [s["status"] for s in summary["this_run"]]


def _die_holding(out_h5):
    """A run that takes the slide's lock, starts its temporary file and is killed."""
    code = (
        "import os, sys; from pathlib import Path; from virchow_rt.slides import locks; "
        "out = Path(sys.argv[1]); lease, _ = locks.acquire(out, print); "
        "out.with_name(f'.{out.name}.{lease.token}.partial').write_bytes(b'killed'); os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", code, str(out_h5)], check=False)


def test_h5_layout_and_summary(make_slide, tmp_path):
    synth = make_slide()
    out = tmp_path / "out"
    with pytest.warns(RandomWeightsWarning, match="every output is labelled random_weights=true"):
        summary = _run([synth.path], out)
    h5 = out / "slide.h5"
    assert sorted(p.name for p in out.iterdir()) == [
        "run_config.json",
        "slide.h5",
        "slide_states",
        "summary.json",
    ]  # no temp file
    assert [p.name for p in (out / "slide_states").glob("*.json")] == ["slide.json"]
    assert h5.stat().st_mode & 0o044  # readable by the group like any file, not mkstemp's owner-only 0600
    with h5py.File(h5, "r") as f:
        feats, coords = f["features"], f["coords"]
        n = feats.shape[0]
        assert n >= 10 and feats.shape == (n, 48) and feats.dtype == np.float32
        assert coords.shape == (n, 2) and coords.dtype == np.int64
        assert np.isfinite(feats[()]).all()
        assert set(TRIDENT_ATTRS) <= set(coords.attrs)
        assert coords.attrs["patch_size"] == 224 and coords.attrs["patch_size_level0"] == 224
        assert coords.attrs["level0_magnification"] == 20 and coords.attrs["target_magnification"] == 20
        assert coords.attrs["overlap"] == 0 and coords.attrs["name"] == "slide"
        assert (coords.attrs["level0_width"], coords.attrs["level0_height"]) == (1792, 1344)
        root = f.attrs
        assert root["complete"] and root["num_tiles"] == n and root["embedding_dim"] == 48
        assert root["encoder"] == "virchow2g-mini-tiny" and root["pooling"] == "cls_mean"
        assert root["random_weights"] and feats.attrs["random_weights"]
        assert root["model_sha256"].startswith("backend:") and root["reader"] in ("openslide", "tiffslide")
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    record = saved["slides"][0]
    assert record["status"] == "done" and record["tiles"] == n and record["output"] == str(h5)
    assert {"open_s", "mask_s", "read_s", "read_wait_s", "embed_s", "write_s", "total_s"} <= set(
        record["timings"]
    )
    assert saved["totals"] == {**saved["totals"], "done": 1, "failed": 0, "tiles_embedded": n}
    assert saved["model"]["random_weights"] is True and saved["failures"] == []


def test_rerun_skips_complete_and_redoes_damaged(make_slide, tmp_path):
    a, b, c = (make_slide(name) for name in ("a.tif", "b.tif", "c.tif"))
    out = tmp_path / "out"
    _run([a.path, b.path, c.path], out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    expected = read_features(out / "b.h5")

    summary = _run([a.path, b.path, c.path], out)  # nothing changed: a no-op
    assert _this_run(summary) == ["skipped"] * 3
    assert [s["status"] for s in summary["slides"]] == ["done"] * 3  # what the first run did is kept
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == mtimes
    assert summary["slides"][1]["tiles"] == len(expected["features"])

    (out / "a.h5").write_bytes((out / "a.h5").read_bytes()[:2000])  # truncated (a crash while copying)
    with h5py.File(out / "b.h5", "r+") as f:
        del f.attrs["complete"]  # interrupted before completion
    _die_holding(out / "c.h5")
    assert len(list(out.glob(".c.h5.*.partial"))) == 1
    assert check_complete(out / "a.h5", {}) is not None
    summary = _run([a.path, b.path, c.path], out)
    status = {s["name"]: (s["status"], s["redone_because"]) for s in summary["slides"]}
    assert status["a"][0] == "done" and status["a"][1].startswith("a.h5 cannot be opened")
    assert status["b"] == ("done", "b.h5 not marked complete (an interrupted run)")
    assert status["c"] == ("done", None) and _this_run(summary) == ["done", "done", "skipped"]
    assert (out / "c.h5").stat().st_mtime_ns == mtimes["c.h5"]
    assert not list(out.glob("*.partial"))
    redone = read_features(out / "b.h5")
    np.testing.assert_array_equal(redone["coords"], expected["coords"])
    np.testing.assert_allclose(redone["features"], expected["features"], atol=1e-5)


def test_changed_settings_or_model_redo(make_slide, tmp_path):
    synth = make_slide()
    out = tmp_path / "out"
    _run([synth.path], out)
    # another pooling or model in the same folder would mix dimensions: refused, both named
    with pytest.raises(
        OutputError, match="another configuration \\(pooling 'cls_mean' -> 'cls'; embedding_dim"
    ):
        _run([synth.path], out, SlideSettings(pooling="cls"))
    with pytest.raises(OutputError, match="model_sha256 'backend:"):
        _run([synth.path], out, backend=FakeBackend(width=8))
    assert read_features(out / "slide.h5")["features"].shape[1] == 48  # untouched
    summary = _run([synth.path], tmp_path / "cls", SlideSettings(pooling="cls"))  # its own folder
    assert summary["slides"][0]["status"] == "done"
    assert read_features(tmp_path / "cls" / "slide.h5")["features"].shape[1] == 24
    runs = _run([synth.path], out)  # summary.json accumulates across runs of the folder
    assert runs["runs"] == 2 and _this_run(runs) == ["skipped"] and runs["slides"][0]["status"] == "done"


def test_bad_slide_is_reported_and_the_others_finish(make_slide, tmp_path, monkeypatch, capsys):
    good = make_slide("good.tif")
    bad = make_slide("bad.tif")
    data = bad.path.read_bytes()
    bad.path.write_bytes(data[: len(data) // 2])  # truncated mid-file
    nompp = make_slide("nompp.tif", 512, 512, ((0, 0, 448, 448),), mpp=None)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"stand-in model file: only its hash is used here")

    @contextlib.contextmanager
    def fake_open(model_path, backend="auto"):
        assert str(model_path) == str(model) and backend == "auto"
        yield FakeBackend()

    monkeypatch.setattr(job_module, "opened_backend", fake_open)
    out = tmp_path / "out"
    argv = [
        "slides",
        str(bad.path),
        str(good.path),
        str(nompp.path),
        "--model",
        str(model),
        "--out",
        str(out),
    ]
    with pytest.warns(RandomWeightsWarning):
        assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "bad.tif: FAILED" in captured.err
    assert sum("bad.tif" in line for line in captured.err.splitlines()) == 1  # once, as it happens
    assert "1 done, 0 skipped (complete), 2 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [
        "good.h5",
        "run_config.json",
        "slide_states",
        "summary.json",
    ]  # no bad ones
    summary = json.loads((out / "summary.json").read_text())
    failures = {f["name"]: f["reason"] for f in summary["failures"]}
    assert set(failures) == {"bad", "nompp"}
    assert "bad.tif" in failures["bad"] and "corrupt" in failures["bad"]
    assert "--slide-mpp" in failures["nompp"]
    assert summary["model"]["sha256"] != "" and summary["model"]["file"] == str(model)
    good_mtime = (out / "good.h5").stat().st_mtime_ns

    # the same run again: the good slide is skipped, the bad ones fail again; --slide-mpp rescues one
    assert cli.main([*argv, "--slide-mpp", "0.5"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert _this_run(summary) == ["failed", "skipped", "done"]
    assert [s["status"] for s in summary["slides"]] == ["failed", "done", "done"]
    assert (out / "good.h5").stat().st_mtime_ns == good_mtime


def test_settings_are_checked_before_any_slide(make_slide, tmp_path):
    synth = make_slide()
    with pytest.raises(InputError, match="--mpp 0.5 .20x. is not one of the --regions"):
        _run([synth.path], tmp_path / "out", SlideSettings(regions=(5, 10)))
    with pytest.raises(InputError, match="whole multiple"):
        _run([synth.path], tmp_path / "out", SlideSettings(regions=(5, 15, 20)))
    with pytest.raises(InputError, match="pooling"):
        _run([synth.path], tmp_path / "out", SlideSettings(pooling="mean"))
    assert not (tmp_path / "out").exists()


def test_empty_slide_writes_a_complete_empty_file(make_slide, tmp_path):
    glass = make_slide("glass.tif", 896, 672, ())
    out = tmp_path / "out"
    summary = _run([glass.path], out)
    assert summary["slides"][0]["status"] == "done" and summary["slides"][0]["tiles"] == 0
    data = read_features(out / "glass.h5")
    assert data["features"].shape == (0, 48) and data["coords"].shape == (0, 2)
    assert _this_run(_run([glass.path], out)) == ["skipped"]


def test_summary_reports_throughput(make_slide, tmp_path):
    summary = _run([make_slide().path], tmp_path / "out", SlideSettings(workers=2, batch_size=8))
    totals = summary["totals"]
    assert totals["tiles_per_s"] > 0 and totals["read_s"] > 0 and totals["embed_s"] > 0
    assert summary["settings"]["workers"] == 2 and summary["settings"]["batch_size"] == 8


@pytest.mark.parametrize("regions", [None, (5, 10, 20)])
def test_unreadable_tile_skip_errors(make_slide, tmp_path, monkeypatch, regions):
    synth = make_slide("regions.tif", 2688, 1792, ((150, 100, 2300, 1500),))
    real = tiles_module.read_tile
    bad = (1120, 448)  # a 20x tile inside region (896, 0)

    def flaky(slide, x, y, size0, level, out_size, *fill):
        if (x, y, size0) == (*bad, 224):
            raise InputError(f"slide {slide.path.name}: corrupt JPEG tile")
        return real(slide, x, y, size0, level, out_size, *fill)

    monkeypatch.setattr(tiles_module, "PROCESSES_BY_DEFAULT", False)  # patched in this process only
    monkeypatch.setattr(tiles_module, "read_tile", flaky)
    out = tmp_path / "out"
    summary = _run([synth.path], out, SlideSettings(regions=regions))
    assert summary["slides"][0]["status"] == "failed" and "(1120, 448)" in summary["slides"][0]["reason"]
    assert not (out / "regions.h5").exists()

    summary = _run([synth.path], out, SlideSettings(regions=regions, skip_errors=True))
    record = summary["slides"][0]
    reads = 2 if regions else 1  # the tile is read for the grid and again for its region
    assert record["status"] == "done" and record["skipped_tiles"] == reads
    assert (
        record["skipped_tile_errors"]
        == [{"x": 1120, "y": 448, "reason": "slide regions.tif: corrupt JPEG tile"}] * reads
    )
    data = read_features(out / "regions.h5")
    assert data["attrs"]["skipped_tiles"] == reads and tuple(bad) not in {tuple(c) for c in data["coords"]}
    if regions:  # the region holding the bad tile is left out whole
        assert data["regions"]["features"].shape[0] == 5
        assert (896, 0) not in {tuple(c) for c in data["regions"]["coords"][:, 0]}


def test_another_slide_of_the_same_name_or_another_slide_mpp_is_redone(make_slide, tmp_path):
    out = tmp_path / "out"
    first = make_slide()
    assert _run([first.path], out)["slides"][0]["status"] == "done"
    other = make_slide("slide.tif", 896, 672, ((0, 0, 672, 448),))  # same name, another slide
    record = _run([other.path], out)["slides"][0]
    assert record["status"] == "done" and "slide_size_bytes" in record["redone_because"]
    assert read_features(out / "slide.h5")["attrs"]["level0_width"] == 896

    nompp = make_slide("nompp.tif", 512, 512, ((0, 0, 448, 448),), mpp=None)
    assert _run([nompp.path], out, SlideSettings(slide_mpp=0.5))["slides"][0]["tiles"] == 4
    record = _run([nompp.path], out, SlideSettings(slide_mpp=0.25))["slides"][0]
    assert record["status"] == "done" and record["tiles"] == 1
    assert record["redone_because"] == "nompp.h5 was made with --slide-mpp 0.5, this run uses 0.25"
    assert _this_run(_run([nompp.path], out, SlideSettings(slide_mpp=0.25))) == ["skipped"]
    assert _this_run(_run([nompp.path], out)) == ["skipped"]  # the slide records none: keep it


def test_an_mpp_finer_than_the_scan_is_warned_about(make_slide, tmp_path):
    slide = make_slide()  # scanned at 0.5 µm/px
    said = []
    summary = process_slides([slide.path], FakeBackend(), tmp_path / "out", SlideSettings(mpp=0.25),
                             log=lambda s: None, warn=said.append)  # fmt: skip
    assert any("--mpp 0.25 is finer than the scan (0.5 µm/px): tiles are upsampled 2x" in s for s in said)
    assert summary["slides"][0]["warnings"] and summary["slides"][0]["status"] == "done"
    quiet = []
    process_slides([slide.path], FakeBackend(), tmp_path / "out2", SlideSettings(mpp=0.5), log=lambda s: None,
                   warn=quiet.append)  # fmt: skip
    assert not [s for s in quiet if "finer than the scan" in s]


def test_slides_in_sub_folders_need_recursive(make_slide, tmp_path):
    from virchow_rt.errors import InputError
    from virchow_rt.slides import find_slides

    cohort = tmp_path / "gdc"
    for case in ("case1", "case2"):
        (cohort / case).mkdir(parents=True)
        (cohort / case / f"{case}.tif").write_bytes(make_slide().path.read_bytes())
    with pytest.raises(InputError, match="no slides found.*pass --recursive"):
        find_slides([cohort])
    assert [p.name for p in find_slides([cohort], recursive=True)] == ["case1.tif", "case2.tif"]
    summary = process_slides([cohort], FakeBackend(), tmp_path / "out", SlideSettings(recursive=True),
                             log=lambda s: None)  # fmt: skip
    assert [s["status"] for s in summary["slides"]] == ["done", "done"]


def test_also_pt_writes_clam_pt_files(make_slide, tmp_path):
    torch = pytest.importorskip("torch")
    slide = make_slide()
    out = tmp_path / "out"
    _run([slide.path], out)  # .h5 only
    assert not (out / "pt_files").exists()
    summary = _run([slide.path], out, SlideSettings(also_pt=True))  # the .h5 is complete: no model run
    assert _this_run(summary) == ["skipped"]
    features = torch.load(out / "pt_files" / "slide.pt", weights_only=True)  # as CLAM loads it
    assert features.dtype == torch.float32
    np.testing.assert_array_equal(features.numpy(), read_features(out / "slide.h5")["features"])


def test_progress_inside_a_slide(make_slide, tmp_path, capsys):
    slide = make_slide()
    _run([slide.path], tmp_path / "out", SlideSettings(progress=True))
    err = capsys.readouterr().err
    import re

    assert re.search(r"slide: .*\d+/\d+ \[.*tile/s\]", err), err  # tiles done / total, rate (and ETA)
    _run([slide.path], tmp_path / "quiet", SlideSettings(progress=False))
    assert "tile/s" not in capsys.readouterr().err


def test_qc_picture_shows_the_tiling(make_slide, tmp_path):
    from PIL import Image

    from virchow_rt.slides.mask import QC_MAX_SIDE

    slide = make_slide()
    out = tmp_path / "out"
    summary = _run([slide.path], out, SlideSettings(qc=True))
    picture = np.asarray(Image.open(out / "slide.qc.png").convert("RGB"))  # a palette PNG
    assert summary["slides"][0]["status"] == "done" and picture.ndim == 3 and picture.shape[2] == 3
    assert max(picture.shape[:2]) <= QC_MAX_SIDE
    blue = ((picture[..., 2] > 200) & (picture[..., 0] < 60)).sum()
    green = ((picture[..., 1] == 200) & (picture[..., 0] == 0)).sum()
    assert blue > 100 and green > 100  # the kept tiles' frames and the tissue outline are drawn
    assert not list(out.glob(".*"))  # written atomically


def test_redo_reasons_show_stored_values_plainly(make_slide, tmp_path):
    from virchow_rt.slides.writer import check_complete

    _run([make_slide().path], tmp_path / "out")
    reason = check_complete(tmp_path / "out" / "slide.h5", {"patch_size": 256, "pooling": "cls"})
    assert reason == "was made with patch_size 224, this run uses 256"  # not np.int64(224)
