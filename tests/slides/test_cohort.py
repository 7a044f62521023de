"""A cohort with its slides overlapped: the same files as one slide after another, failures alone, resumable
after SIGKILL, bounded, and the local slide cache (``--cache-dir``) leaves nothing behind.

Overlap is proved, not timed: the model's first batch waits until the next slide has been prepared, so a
run that did not prepare ahead would never get past it.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from slide_helpers import FakeBackend, crashing_read

from virchow_rt.errors import InputError
from virchow_rt.slides import SlideSettings, process_slides, read_features
from virchow_rt.slides import cache as cache_module
from virchow_rt.slides import tiles as tiles_module
from virchow_rt.slides.cache import SlideCache, slide_files
from virchow_rt.slides.cohort import OrderedLines
from virchow_rt.slides.task import SlideTask
from virchow_rt.slides.writer import check_complete

HERE = Path(__file__).parent
NAMES = ["s0", "s1", "s2", "s3"]
WAIT_S = 60.0  # a bound that only a broken run reaches


class GatedBackend(FakeBackend):
    """The fake model whose first batch waits for ``gate`` (set by the test when the next slide is ready)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate_opened: bool | None = None

    def run(self, tiles: np.ndarray) -> np.ndarray:
        if self.gate_opened is None:
            self.gate_opened = self.gate.wait(WAIT_S)
        return super().run(tiles)


@pytest.fixture
def cohort(make_slide) -> list[Path]:
    """Mixed sizes: two biopsy-sized slides, a larger one, another small one."""
    sizes = [(1792, 1344), (896, 672), (2688, 1792), (1344, 896)]
    patches = [((250, 200, 900, 700), (1230, 760, 450, 430)), ((100, 100, 600, 400),),
               ((150, 100, 2300, 1500),), ((200, 150, 900, 600),)]  # fmt: skip
    return [
        make_slide(f"{name}.tif", w, h, p, seed=i).path
        for i, (name, (w, h), p) in enumerate(zip(NAMES, sizes, patches, strict=True))
    ]


def run(paths, out, backend=None, **settings):
    lines: list[str] = []
    summary = process_slides([str(p) for p in paths], backend or FakeBackend(), out,
                             SlideSettings(batch_size=4, **settings), log=lines.append,
                             warn=lambda line: lines.append(f"WARN {line}"))  # fmt: skip
    return summary, lines


def assert_same(out: Path, want: Path, names: list[str]) -> None:
    for name in names:
        got, ref = read_features(out / f"{name}.h5"), read_features(want / f"{name}.h5")
        np.testing.assert_array_equal(got["coords"], ref["coords"])
        np.testing.assert_array_equal(got["features"], ref["features"])
        if ref.get("regions") is not None:
            np.testing.assert_array_equal(got["regions"]["coords"], ref["regions"]["coords"])
            np.testing.assert_array_equal(got["regions"]["features"], ref["regions"]["features"])


def cut(path: Path) -> None:
    """Truncate a slide after its TIFF header: it cannot be opened ("not a readable slide")."""
    path.write_bytes(path.read_bytes()[:8])


def slide_of(line: str) -> str:
    return line.removeprefix("WARN ").split("] ")[1].split(":")[0]


def gate_on_prepare(monkeypatch, backend: GatedBackend, name: str) -> None:
    """Open the model's gate once slide ``name`` has been prepared (on the preparing thread)."""
    real = SlideTask.prepare

    def prepare(self, read_ahead=True):
        done = real(self, read_ahead)
        if self.path.stem == name:
            backend.gate.set()
        return done

    monkeypatch.setattr(SlideTask, "prepare", prepare)


@pytest.mark.parametrize("regions", [None, (10, 20)])
def test_overlapped_runs_write_what_sequential_runs_write(cohort, tmp_path, monkeypatch, regions):
    want, lines_one = run(cohort, tmp_path / "sequential", prefetch_slides=0, regions=regions)
    assert [s["status"] for s in want["slides"]] == ["done"] * 4

    live, most = set(), [0]
    real_prepare, real_close = SlideTask.prepare, SlideTask.close

    def prepare(self, read_ahead=True):  # slides in flight: prepared and not yet closed
        live.add(self.path.stem)
        most[0] = max(most[0], len(live))
        return real_prepare(self, read_ahead)

    def close(self):
        live.discard(self.path.stem)
        real_close(self)

    monkeypatch.setattr(SlideTask, "close", close)
    monkeypatch.setattr(SlideTask, "prepare", prepare)
    backend = GatedBackend()
    gate_on_prepare(monkeypatch, backend, "s1")  # s0's first batch waits until s1 is prepared
    (tmp_path / "overlapped").mkdir()
    (tmp_path / "overlapped" / "s1.h5").write_bytes(b"damaged")  # s1's prepare says it redoes it
    got, lines_two = run(cohort, tmp_path / "overlapped", backend, prefetch_slides=1, regions=regions)
    assert backend.gate_opened, "slide s1 was not prepared while s0 was in the model"
    assert [s["status"] for s in got["slides"]] == ["done"] * 4
    assert_same(tmp_path / "overlapped", tmp_path / "sequential", NAMES)
    for a, b in zip(want["slides"], got["slides"], strict=True):
        assert (a["tiles"], a["embedded_tiles"], a["regions"]) == (
            b["tiles"],
            b["embedded_tiles"],
            b["regions"],
        )
        assert b["timings"]["total_s"] > 0 and b["tiles_per_s"] > 0
    # each slide's lines in slide order, as a sequential run prints them (s1's "redoing", said while s0 was
    # in the model, after s0's last line); at most 3 slides in flight
    assert [slide_of(line) for line in lines_one] == [f"{name}.tif" for name in NAMES]
    assert [slide_of(line) for line in lines_two] == ["s0.tif", "s1.tif", "s1.tif", "s2.tif", "s3.tif"]
    assert "redoing, s1.h5" in lines_two[1]
    assert 2 <= most[0] <= 3
    assert not list((tmp_path / "overlapped").glob(".*"))  # no lock or temporary file left


def test_a_corrupt_slide_next_to_good_ones_fails_alone(cohort, tmp_path, monkeypatch):
    """s1 is truncated (fails when opened); s2 has a tile that cannot be read (fails while it is read ahead,
    with s0 in the model): each fails alone, once, and the good slides equal a clean run's."""
    run([cohort[0], cohort[3]], tmp_path / "clean", prefetch_slides=0)
    cut(cohort[1])
    real = tiles_module.read_tile
    failed = threading.Event()

    def flaky(slide, x, y, size0, level, out_size, *fill):
        if slide.path.stem == "s2":
            failed.set()
            raise InputError(f"slide {slide.path.name}: corrupt JPEG tile")
        return real(slide, x, y, size0, level, out_size, *fill)

    monkeypatch.setattr(tiles_module, "PROCESSES_BY_DEFAULT", False)  # patched in this process only
    monkeypatch.setattr(tiles_module, "read_tile", flaky)
    backend = GatedBackend()
    backend.gate = failed  # s0's first batch waits until s2 has failed reading ahead
    out = tmp_path / "out"
    summary, lines = run(cohort, out, backend, prefetch_slides=2)
    assert backend.gate_opened
    assert [s["status"] for s in summary["slides"]] == ["done", "failed", "failed", "done"]
    reasons = {s["name"]: s["reason"] for s in summary["failures"]}
    assert "not a readable slide" in reasons["s1"] and "corrupt JPEG tile" in reasons["s2"]
    assert [slide_of(line) for line in lines if "FAILED" in line] == ["s1.tif", "s2.tif"]
    assert_same(out, tmp_path / "clean", ["s0", "s3"])
    states = sorted(p.stem for p in (out / "slide_states").glob("*.json"))
    assert states == NAMES
    assert sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s3.h5"] and not list(out.glob(".*"))


class FileGate:
    """A gate that opens once ``path`` exists (written by another process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def test_a_slide_that_kills_its_reading_process_fails_alone(cohort, tmp_path, monkeypatch):
    """Slides read at once share the reading processes: the one whose tiles kill a worker fails, the slide
    in the model whose tiles were lost with that worker reads them again and is done."""
    run([cohort[0], cohort[2]], tmp_path / "clean", prefetch_slides=0)
    crash = cohort[1].rename(cohort[1].with_name("crash1.tif"))
    monkeypatch.setattr(tiles_module, "_read_in_process", crashing_read)  # pickled by name for the workers
    backend = GatedBackend()
    backend.gate = FileGate(crash.with_suffix(".crashed"))  # s0's first batch waits until crash1 killed one
    out = tmp_path / "out"
    summary, lines = run([cohort[0], crash, cohort[2]], out, backend, workers=2, read_processes=True)
    assert backend.gate_opened
    assert [s["status"] for s in summary["slides"]] == ["done", "failed", "done"], lines
    assert "crash1.tif: a tile-reading process died" in summary["slides"][1]["reason"]
    assert_same(out, tmp_path / "clean", ["s0", "s2"])
    assert not list(out.glob(".*"))


SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from slide_helpers import FakeBackend, crashing_read
    from virchow_rt.cli.main import build_parser
    from virchow_rt.cli.slides import run_cli

    class Slow(FakeBackend):  # a batch takes 0.2 s: the run is mid-slide for a while
        def run(self, tiles):
            time.sleep(0.2)
            return super().run(tiles)

    args = build_parser().parse_args(["slides", *sys.argv[3:], "--model", "fake", "--out", sys.argv[2],
                                      "--batch", "4", "--workers", "1"])
    args.model = Slow()
    try:
        code = run_cli(args)
    except KeyboardInterrupt as err:
        print("INTERRUPTED:", err, flush=True)
        code = 130
    sys.exit(code)
    """
)


def start(out: Path, *args: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", SCRIPT, str(HERE), str(out), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(what: str, condition, run: subprocess.Popen[str]) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if run.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run ended or took too long before {what}: {run.communicate()[0]}")
        time.sleep(0.02)


def mid_cohort(out: Path) -> bool:
    """s0 is complete and a later slide is being written."""
    return (out / "s0.h5").exists() and bool(list(out.glob(".s[1-3].h5.*.partial")))


def test_sigkill_mid_cohort_then_a_rerun_gives_the_uninterrupted_result(cohort, tmp_path):
    run(cohort, tmp_path / "uninterrupted", prefetch_slides=0)
    out = tmp_path / "out"
    killed = start(out, *cohort)
    wait_for("the second slide", lambda: mid_cohort(out), killed)
    killed.kill()
    killed.wait()
    for h5 in out.glob("*.h5"):  # whatever looks like an output is a complete one
        assert check_complete(h5, {}) is None
    assert len(list(out.glob(".*.h5.lock"))) >= 1  # the killed run's locks are left behind
    summary, _ = run(cohort, out, prefetch_slides=1)
    # s0 was kept ("skipped" where the kill came between its rename and its state file)
    assert {s["status"] for s in summary["slides"]} <= {"done", "skipped"}
    assert summary["this_run"][0]["status"] == "skipped"
    assert_same(out, tmp_path / "uninterrupted", NAMES)
    assert not list(out.glob(".*"))  # the killed run's locks and temporary files are gone


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_cache_reads_copies_and_leaves_nothing_behind(cohort, tmp_path, monkeypatch):
    want, _ = run(cohort, tmp_path / "in-place")
    cache = tmp_path / "scratch"
    cache.mkdir()
    (cache / "someone-elses.txt").write_text("kept")
    opened: list[Path] = []
    copied: list[Path] = []
    real_open, real_copy = SlideTask._open, cache_module._copy_file

    def open_spy(self, read_ahead):
        opened.append(self.read_from)
        real_open(self, read_ahead)

    def copy_spy(src, dst, stop):
        copied.append(src)
        real_copy(src, dst, stop)

    monkeypatch.setattr(SlideTask, "_open", open_spy)
    monkeypatch.setattr(cache_module, "_copy_file", copy_spy)
    out = tmp_path / "out"
    summary, lines = run(cohort, out, cache_dir=str(cache))
    assert [s["status"] for s in summary["slides"]] == ["done"] * 4 and not any("WARN" in x for x in lines)
    assert all(cache in p.parents and p.name == f"{n}.tif" for p, n in zip(opened, NAMES, strict=True))
    assert_same(out, tmp_path / "in-place", NAMES)
    assert read_features(out / "s0.h5")["attrs"]["slide_path"] == str(cohort[0])  # the slide, not its copy
    assert listing(cache) == ["someone-elses.txt"]

    assert sorted(p.name for p in copied) == [f"{n}.tif" for n in NAMES]

    copied.clear()  # a rerun copies nothing it will skip
    summary, _ = run(cohort, out, cache_dir=str(cache))
    assert [s["status"] for s in summary["this_run"]] == ["skipped"] * 4 and copied == []
    assert listing(cache) == ["someone-elses.txt"]

    fresh = tmp_path / "made" / "by-the-run"  # folders the run makes go too, also when a slide fails
    cut(cohort[1])
    summary, _ = run(cohort, tmp_path / "out2", cache_dir=str(fresh))
    assert [s["status"] for s in summary["slides"]] == ["done", "failed", "done", "done"]
    assert not (tmp_path / "made").exists()


def test_a_copy_that_fails_or_does_not_fit_is_read_in_place_with_one_warning(cohort, tmp_path, monkeypatch):
    run(cohort, tmp_path / "in-place")
    small = min(p.stat().st_size for p in cohort)
    summary, lines = run(cohort, tmp_path / "small", cache_dir=str(tmp_path / "c1"), cache_size=small - 1)
    warnings = [line for line in lines if line.startswith("WARN")]
    assert len(warnings) == 1 and "larger" in warnings[0] and "--cache-size" in warnings[0], lines
    assert_same(tmp_path / "small", tmp_path / "in-place", NAMES)

    def full(src, dst, stop):
        Path(dst).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_copy_file", full)
    summary, lines = run(cohort, tmp_path / "full", cache_dir=str(tmp_path / "c2"))
    warnings = [line for line in lines if line.startswith("WARN")]
    assert len(warnings) == 1 and "ran out of space" in warnings[0], lines
    assert [s["status"] for s in summary["slides"]] == ["done"] * 4
    assert_same(tmp_path / "full", tmp_path / "in-place", NAMES)
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_ctrl_c_leaves_no_copy_lock_or_temporary_file(cohort, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    stopped = start(out, *cohort, "--cache-dir", cache)
    wait_for("the second slide", lambda: mid_cohort(out), stopped)
    stopped.send_signal(signal.SIGINT)
    log = stopped.communicate(timeout=WAIT_S)[0]
    assert stopped.returncode == 130 and "rerun the same command to resume" in log, log
    assert not cache.exists()  # made by the run, emptied and removed on the way out
    assert not list(out.glob(".*"))
    summary = json.loads((out / "summary.json").read_text())
    statuses = [s["status"] for s in summary["this_run"]]
    assert statuses[0] == "done" and "interrupted" in statuses, statuses
    assert {s["status"] for s in summary["slides"]} <= {"done", "interrupted", "not started"}


def test_multi_file_formats_are_copied_whole(tmp_path):
    mrxs = tmp_path / "net" / "a.mrxs"
    (mrxs.parent / "a").mkdir(parents=True)
    mrxs.write_bytes(b"index")
    for name in ("Slidedat.ini", "Data0000.dat"):
        (mrxs.parent / "a" / name).write_bytes(name.encode())
    series = tmp_path / "net" / "case7"
    series.mkdir()
    for name in ("L0.dcm", "L1.DCM", "notes.txt"):
        (series / name).write_bytes(name.encode())
    vms = tmp_path / "net" / "h.vms"
    vms.write_text(
        "[Virtual Microscope Specimen]\nImageFile=h.jpg\nMapFile=h_map.jpg\nImageFile(1)=../x.jpg\n"
    )
    for name in ("h.jpg", "h_map.jpg"):
        (vms.parent / name).write_bytes(b"jpeg")
    (tmp_path / "x.jpg").write_bytes(b"outside its folder: never copied")

    assert sorted(str(rel) for _, rel in slide_files(mrxs)[0]) == [
        "a.mrxs",
        "a/Data0000.dat",
        "a/Slidedat.ini",
    ]
    files, read = slide_files(series / "L0.dcm")
    assert (
        sorted(str(rel) for _, rel in files) == ["case7/L0.dcm", "case7/L1.DCM"]
        and str(read) == "case7/L0.dcm"
    )
    assert sorted(str(rel) for _, rel in slide_files(vms)[0]) == ["h.jpg", "h.vms", "h_map.jpg"]

    paths = [mrxs, series / "L0.dcm", vms]
    with SlideCache(tmp_path / "cache", paths, ahead=3) as cache:
        copies = [cache.local(p, pytest.fail) for p in paths]
        assert all(c is not None for c in copies)
        assert (copies[0].parent / "a" / "Data0000.dat").read_bytes() == b"Data0000.dat"
        assert copies[1].name == "L0.dcm" and (copies[1].parent / "L1.DCM").exists()
        assert (copies[2].parent / "h_map.jpg").exists() and not (copies[2].parent.parent / "x.jpg").exists()
        cache.release(mrxs)
        assert not copies[0].exists() and copies[1].exists()
    assert not (tmp_path / "cache").exists()
    assert listing(tmp_path / "net")  # the sources are untouched
    assert (mrxs.parent / "a" / "Data0000.dat").exists() and (series / "notes.txt").exists()


@pytest.mark.parametrize(("cpus", "processes", "threads"), [(1, 1, 1), (2, 2, 2), (16, 15, 8), (64, 63, 8)])
def test_reading_workers_follow_the_usable_cpus(monkeypatch, cpus, processes, threads):
    monkeypatch.setattr(tiles_module.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert tiles_module.default_workers(processes=True) == processes
    assert tiles_module.default_workers(processes=False) == threads


def test_lines_of_a_later_slide_wait_for_the_slides_before_it():
    out: list[str] = []
    lines = OrderedLines(out.append, lambda line: out.append(f"! {line}"))
    log1, warn1 = lines.channel(1)
    log0, _ = lines.channel(0)
    log2, _ = lines.channel(2)
    warn1("s1 opened")
    log2("s2 opened")
    log3, _ = lines.channel(3)
    log3("s3 opened")
    log0("s0 done")
    assert out == ["s0 done"]
    lines.done(0)
    assert out == ["s0 done", "! s1 opened"]
    log1("s1 done")
    lines.done(1)
    assert out == ["s0 done", "! s1 opened", "s1 done", "s2 opened"]
    log2("s2 stopped")
    lines.close()  # s3's turn never came: its lines are dropped, as the slide is "not started"
    log3("s3 more")
    assert out == ["s0 done", "! s1 opened", "s1 done", "s2 opened", "s2 stopped"]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--cache-size", "0"], "argument --cache-size: --cache-size '0' must be above 0, e.g. 20G"),
        (["--cache-size", "20G"], "--cache-size needs --cache-dir"),
        (["--prefetch-slides", "99"], "--prefetch-slides 99: give 0 (one slide after another) to 8"),
        (["--ray", "--cache-dir", "scratch"], "--cache-dir is not used by Ray workers"),
        (["--cache-dir", __file__], "is a file; give a folder"),
    ],
)
def test_bad_cohort_flags_are_one_line_errors(tmp_path, capsys, flags, says):
    from virchow_rt.cli import main as cli

    argv = ["slides", str(tmp_path / "x.tif"), "--model", "m", "--out", str(tmp_path / "out"), *flags]
    if flags[:2] == ["--cache-size", "0"]:  # refused by the parser itself
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        assert stopped.value.code == 2
    else:
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
