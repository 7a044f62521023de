"""The GPU check's own logic on the CPU: test outcomes, step bookkeeping, child processes, the summary.

The check lives in ``bench/`` (it runs pytest on ``tests/``, so it never ships in the wheel). The whole
script runs in CI as the GPU machine runs it (``.ci/run``: a fresh copy of the tree, an interpreter
without the project, ``--dry-run``), and is killed there once mid-run to prove what it keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402 - a bench script, importable once bench/ is on the path
from gpu_check import DRY, Checker  # noqa: E402
from gpu_check_children import SoFar, StepFailed  # noqa: E402
from gpu_check_report import (  # noqa: E402
    copy_hiding,
    junit_outcomes,
    log_outcomes,
    read_test_outcomes,
    render_markdown,
)


def _subreaper() -> int:
    """This process's PR_GET_CHILD_SUBREAPER (Linux; -1 where prctl is not there)."""
    flag = ctypes.c_int(-1)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(37, ctypes.byref(flag), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    return flag.value


@pytest.fixture(autouse=True, scope="module")
def _pytest_stays_what_it_was() -> Iterator[None]:
    """No test here may make pytest's process a child subreaper (the check does so to its own process)."""
    before = _subreaper()
    yield
    assert _subreaper() == before, "a test ran the GPU check's subreaper in pytest's own process"


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.export.test_torch_cuda_gpu" name="test_matches_the_fp32_reference" time="1.2"/>
<testcase classname="tests.trt.test_cuda_gpu" name="test_graph_capture_replays_the_work" time="0.1">
  <failure message="AssertionError: graphs differ&#10;second line">trace</failure></testcase>
<testcase classname="tests.trt.test_trt_engine_real" name="test_open_backend_runs_engines" time="0">
  <skipped type="pytest.skip" message="TensorRT is not installed">skip</skipped></testcase>
<testcase classname="tests.runtime.test_x" name="test_y" time="0"><error message="fixture broke"/></testcase>
</testsuite></testsuites>
"""
# what `pytest -v -rA` wrote before it was killed: the last test never ended
VERBOSE_LOG = """\
collecting ... collected 40 items / 36 selected
tests/export/test_torch_cuda_gpu.py::test_matches_the_fp32_reference PASSED   [  2%]
tests/export/test_torch_cuda_gpu.py::test_gpu_arrays[a b] SKIPPED (cupy (is) missing) [  5%]
tests/trt/test_cuda_gpu.py::test_graph_capture_replays_the_work FAILED    [  8%]
tests/trt/test_cuda_gpu.py::test_streams PASSED                           [ 11%]
tests/trt/test_cuda_gpu.py::test_streams ERROR                            [ 11%]
tests/bench/test_x.py:12: UserWarning: not a result
PASSED tests/export/test_torch_cuda_gpu.py::test_matches_the_fp32_reference
tests/benchmark/test_bench_gpu.py::test_bench_tiny_torch_rows_on_the_gpu \n"""


def test_junit_outcomes_keep_every_test_and_its_first_message_line(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(JUNIT)
    cases = junit_outcomes(tmp_path / "j.xml")
    assert cases is not None
    assert [c["outcome"] for c in cases] == ["passed", "failed", "skipped", "error"]
    assert cases[0]["test"] == "tests/export/test_torch_cuda_gpu.py::test_matches_the_fp32_reference"
    assert cases[1]["message"] == "AssertionError: graphs differ" and cases[0]["message"] is None
    assert junit_outcomes(tmp_path / "none.xml") is None  # pytest was killed before writing it


def test_the_verbose_log_names_every_test_started_with_its_outcome() -> None:
    got = {c["test"].split("::")[1]: (c["outcome"], c["message"]) for c in log_outcomes(VERBOSE_LOG)}
    assert got == {
        "test_matches_the_fp32_reference": ("passed", None),
        "test_gpu_arrays[a b]": ("skipped", "cupy (is) missing"),
        "test_graph_capture_replays_the_work": ("failed", None),
        "test_streams": ("error", None),  # passed, then its teardown failed
        "test_bench_tiny_torch_rows_on_the_gpu": ("unfinished", None),  # running when pytest died
    }


def test_outcomes_come_from_the_xml_when_there_is_one_else_from_the_log(tmp_path: Path) -> None:
    (tmp_path / "pytest.log").write_text(VERBOSE_LOG)
    from_log = read_test_outcomes(tmp_path / "junit.xml", tmp_path / "pytest.log")
    assert from_log["source"] == "log" and from_log["counts"]["unfinished"] == 1
    (tmp_path / "junit.xml").write_text(JUNIT)
    from_xml = read_test_outcomes(tmp_path / "junit.xml", tmp_path / "pytest.log")
    assert from_xml["source"] == "junit" and from_xml["counts"] == {
        "passed": 1, "failed": 1, "skipped": 1, "error": 1
    }  # fmt: skip


def test_copy_hiding_is_bounded_by_what_end_to_end_adds_to_compute() -> None:
    tile, emb = 224 * 224 * 3, 2560 * 4
    row = {"batch_size": 64, "tiles_per_s": 1000.0, "compute_tiles_per_s": 1000.0}
    assert copy_hiding(row, tile, emb, 50.0, 50.0)["hidden_fraction_at_least"] == 1.0  # all hidden
    copy_ms = (64 * tile + 64 * emb) / 50e9 * 1e3
    slower = {**row, "tiles_per_s": 64 / (0.064 + copy_ms / 2e3)}  # half a batch's copies in view
    got = copy_hiding(slower, tile, emb, 50.0, 50.0)
    assert got["copy_ms_if_serial"] == pytest.approx(copy_ms)
    assert got["hidden_fraction_at_least"] == pytest.approx(0.5)
    serial = {**row, "tiles_per_s": 10.0}  # far slower than compute + copies: nothing provably hidden
    assert copy_hiding(serial, tile, emb, 50.0, 50.0)["hidden_fraction_at_least"] == 0.0


def test_checker_keeps_every_step_on_disk_as_it_starts_and_ends(tmp_path: Path) -> None:
    said: list[str] = []
    check = Checker(tmp_path, DRY, dry_run=True, started=gpu_check.time.perf_counter(), log=said.append)
    on_disk = lambda: json.loads((tmp_path / "gpu_check.json").read_text())  # noqa: E731

    def fine(timeout: float) -> dict[str, float]:
        assert on_disk()["running"] == "environment"  # a kill now still says which step was running
        return {"timeout": timeout}

    assert check.step("environment", fine) == {"timeout": 90}  # LIMITS: at most 90 s
    assert on_disk()["steps"]["environment"]["status"] == "ok" and on_disk()["running"] is None

    def broken(timeout: float) -> None:
        raise ValueError("bad tile")

    check.step("tests", broken)
    check.step("slides", lambda t: (_ for _ in ()).throw(StepFailed("stopped", {"tiles": 3})))
    check.step("bandwidth", lambda t: 1, needs_gpu=True)
    check.step("install", lambda t: 1, unless="no wheels carried in .whl/")
    check.start -= DRY.budget_s - 25  # 25 s left: the bench needs 60
    check.step("bench x", lambda t: 1, limits="bench")
    steps = on_disk()["steps"]
    assert steps["tests"]["status"] == "failed" and steps["tests"]["reason"] == "ValueError: bad tile"
    assert steps["slides"]["reason"] == "stopped" and steps["slides"]["result"] == {"tiles": 3}
    assert steps["bandwidth"]["status"] == "skipped" and "no CUDA GPU" in steps["bandwidth"]["reason"]
    assert steps["install"]["reason"] == "no wheels carried in .whl/"
    assert steps["bench x"]["status"] == "skipped" and "25 s left" in steps["bench x"]["reason"]
    assert "| tests | failed |" in (tmp_path / "gpu_check.md").read_text()
    assert any("tests: failed: ValueError: bad tile" in line for line in said)


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_child_past_its_limit_gets_sigint_then_sigkill_with_all_it_started(tmp_path: Path) -> None:
    cmd = _script(
        tmp_path,
        """
        import signal, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("grandchild", grandchild.pid, flush=True)
        signal.signal(signal.SIGINT, lambda *_: print("SIGINT: writing what I have", flush=True))
        while True:
            time.sleep(0.05)  # ignores SIGINT beyond saying so: SIGKILL must follow
    """,
    )
    log = tmp_path / "child.log"
    # in a process of its own: run_logged ends by killing every process below its own (pytest's must not)
    check = f"""
        import sys, pathlib
        sys.path.insert(0, {str(BENCH)!r})
        import gpu_check_children as children
        children.GRACE_S = 1.0
        log = pathlib.Path({str(log)!r})
        try:
            children.run_logged({cmd!r}, log, 2.0, env=children.child_env(), cwd=log.parent)
        except children.StepFailed as err:
            print("RAISED", type(err).__name__, err, flush=True)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(check)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RAISED StepStopped stopped at its time limit of 2 s"
    text = log.read_text()
    assert "SIGINT: writing what I have" in text
    pid = int(text.split("grandchild ")[1].split()[0])
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone (or a zombie)


def test_results_so_far_that_cannot_be_read_keep_the_last_reading_and_say_so_once() -> None:
    readings: list = [None, {"measured": ["1 row"]}, ValueError("line 2: not JSON"), OSError("gone")]
    said: list[str] = []

    def read() -> dict | None:
        got = readings.pop(0)
        if isinstance(got, Exception):
            raise got
        return got

    so_far = SoFar(read, said.append)
    assert [so_far(), so_far(), so_far(), so_far()] == [None, *[{"measured": ["1 row"]}] * 3]
    (once,) = said  # not at every reading that fails
    assert once.endswith("keeping those read before: ValueError: line 2: not JSON)")


def test_processes_a_step_leaves_running_are_killed(tmp_path: Path) -> None:
    # in a process of its own: the check adopts orphans (a subreaper), which pytest's process must not
    leaver = _script(
        tmp_path,
        """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=False)
        print("left", p.pid, flush=True)
    """,
    )
    check = f"""
        import sys, pathlib
        sys.path.insert(0, {str(BENCH)!r})
        import gpu_check_children as children
        assert children.become_subreaper()
        log = pathlib.Path({str(tmp_path / "leaver.log")!r})
        code = children.run_logged({leaver!r}, log, 30, env=children.child_env(), cwd=log.parent)
        pid = int(log.read_text().split("left ")[1].split()[0])
        print(code, pid in children.descendants(children.os.getpid()), flush=True)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(check)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "False"]
    assert "(killed 1 processes it left running)" in (tmp_path / "leaver.log").read_text()


def _fake_steps(tmp_path: Path, probe: str) -> Path:
    """A stand-in for bench/gpu_check_steps.py whose probe writes ``probe`` (JSON) or fails."""
    path = tmp_path / "steps.py"
    path.write_text(
        textwrap.dedent(f"""
        import pathlib, sys
        if {probe!r} == "fail":
            raise ModuleNotFoundError("No module named 'virchow_rt'")
        pathlib.Path(sys.argv[sys.argv.index("--result") + 1]).write_text({probe!r})
    """)
    )
    return path


def _check_command(tmp_path: Path, probe: str, *, dry_run: bool = True, setup: str = "") -> list[str]:
    """A process that runs ``run_gpu_check`` into tmp_path/out with the probe ``probe`` and ``setup`` done,
    printing "RESULT" and {"result": what it returned} or {"exit": the SystemExit's message}.

    In a process of its own, as gpu_check.sh runs it: the check makes its process a child subreaper and
    kills every process below it when it ends, which pytest's own process must not be."""
    out = tmp_path / "out"
    driver = f"""
        import json, pathlib, sys
        sys.path.insert(0, {str(BENCH)!r})
        import gpu_check, gpu_check_children
        gpu_check.STEPS = pathlib.Path({str(_fake_steps(tmp_path, probe))!r})
        {setup}
        try:
            result = gpu_check.run_gpu_check(pathlib.Path({str(out)!r}), dry_run={dry_run})
            print("RESULT", json.dumps({{"result": result}}, default=str))
        except SystemExit as err:
            print("RESULT", json.dumps({{"exit": str(err)}}))
    """
    return [sys.executable, "-c", textwrap.dedent(driver)]


def _check_in_a_process(tmp_path: Path, probe: str, *, dry_run: bool = True, setup: str = "") -> dict:
    done = subprocess.run(_check_command(tmp_path, probe, dry_run=dry_run, setup=setup), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def test_a_project_that_does_not_import_still_leaves_its_results(tmp_path: Path) -> None:
    steps = _check_in_a_process(tmp_path, "fail")["result"]["steps"]
    assert steps["environment"]["status"] == "failed"
    assert "No module named 'virchow_rt'" in steps["environment"]["reason"]
    assert all(s["status"] == "skipped" and "did not load" in s["reason"] for n, s in steps.items()
               if n not in ("install", "environment"))  # fmt: skip
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["steps"] == steps and not saved["finished"]
    assert len(list((tmp_path / "out").iterdir())) <= 6  # the device returns at most 8 files


PROBE = {"imports": {"pytest_timeout": {"ok": False}}, "gpu_visible": False, "slide_readers": ["tiffslide"],
         "environment": {"machine": "2-core CPU, no GPU"}}  # fmt: skip


def test_a_full_check_refuses_a_machine_without_a_gpu(tmp_path: Path) -> None:
    refused = _check_in_a_process(tmp_path, json.dumps(PROBE), dry_run=False)["exit"]
    assert "no CUDA GPU" in refused and "--dry-run" in refused
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["machine"] == "2-core CPU, no GPU" and saved["steps"]["tests"]["status"] == "skipped"


def _row(batch: int) -> dict:
    return {"backend": "torch-eager", "precision": "fp32", "status": "ok", "batch_size": batch,
            "tiles_per_s": 100.0 * batch, "parity": {"min_cosine": 1.0, "passed": True}}  # fmt: skip


#: what each stand-in child measures (rows.jsonl lines, or --parts lines; a string: a damaged line) before
#: it hangs or exits
MEASURED = {
    "virchow2-tiny": [_row(4), '{"backend": "torch-', _row(8)],  # then hangs: stopped at its limit
    "virchow2g-mini-tiny": [_row(8)],  # then exits 1: failed
    "slides": [
        {"variant": "v", "tiles": 12},
        {"reader": {"tiles_per_s": 50.0}},
        {"reader_scaling": None},
        {"model": {"tiles_per_s": 20.0}},
    ],  # then hangs  # fmt: skip
}


def _measuring_child(tmp_path: Path, measured: dict) -> str:
    """A stand-in for ``virchow-rt bench`` and slides_throughput.py: writes its lines of ``measured``, then
    ``<what>.measured`` beside itself, then waits for a signal (virchow2g-mini-tiny: exits 1 at once)."""
    path = tmp_path / "measure.py"
    path.write_text(f"""
import json, pathlib, signal, sys
args = sys.argv[1:]
if "--parts" in args:
    what, into = "slides", pathlib.Path(args[args.index("--parts") + 1])
else:
    what, into = args[0], pathlib.Path(args[args.index("--out") + 1]) / "rows.jsonl"
    into.parent.mkdir(parents=True, exist_ok=True)
for line in {measured!r}[what]:
    with into.open("a") as fh:
        fh.write((line if isinstance(line, str) else json.dumps(line)) + "\\n")
pathlib.Path(__file__).with_name(what + ".measured").touch()
if what == "virchow2g-mini-tiny":
    sys.exit("broke after its first row")
signal.pause()  # until it is stopped at its limit: SIGINT ends it
""")
    return str(path)


def test_a_step_stopped_at_its_limit_keeps_the_rows_it_measured(tmp_path: Path) -> None:
    # each stand-in writes its rows at once, then waits (or exits): its limit of 4 s is startup's margin
    setup = f"""
        gpu_check.SLIDES = {_measuring_child(tmp_path, MEASURED)!r}
        gpu_check.BENCH = (gpu_check.SLIDES,)
        gpu_check.LIMITS.update(tests=(1, 10**6), bench=(4, 1), slides=(4, 1))  # tests: skipped
        gpu_check_children.GRACE_S, gpu_check_children.WATCH_S = 1.0, 0.2
    """
    result = _check_in_a_process(tmp_path, json.dumps(PROBE), setup=setup)["result"]
    steps = result["steps"]
    stopped, failed, slides = (
        steps["bench virchow2-tiny"],
        steps["bench virchow2g-mini-tiny"],
        steps["slides"],
    )
    assert stopped["status"] == "stopped"
    assert stopped["reason"] == "stopped at its time limit of 4 s; kept what it measured: 2 rows"
    assert [(r["key"], r["batch_size"], r["tiles_per_s"]) for r in stopped["result"]["rows"]] == [
        ("torch-eager/fp32", 4, 400.0), ("torch-eager/fp32", 8, 800.0)
    ]  # fmt: skip
    assert stopped["result"]["complete"] is False and stopped["result"]["targets"] == []
    assert stopped["result"]["skipped_lines"] == 1  # the damaged line between the two rows
    assert failed["status"] == "failed" and "exited 1: broke after its first row" in failed["reason"]
    assert failed["reason"].endswith("kept what it measured: 1 row") and len(failed["result"]["rows"]) == 1
    assert slides["status"] == "stopped" and slides["reason"].endswith("kept what it measured: reader, model")
    assert slides["result"]["model"] == {"tiles_per_s": 20.0} and slides["result"]["tiles"] == 12
    out = tmp_path / "out"
    assert json.loads((out / "gpu_check.json").read_text())["steps"] == steps
    md = (out / "gpu_check.md").read_text()
    assert "## bench virchow2-tiny (not finished: 2 rows)" in md and "| torch-eager/fp32 | 8 | 800 |" in md
    assert "## slides (not finished: reader, model)" in md
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "steps.log"]


def test_markdown_names_the_machine_failures_and_targets() -> None:
    bench = {
        "rows": [
            {"key": "torch-cuda/fp16", "status": "ok", "batch_size": 64, "tiles_per_s": 1500.0,
             "compute_tiles_per_s": 1600.0, "peak_fraction": 0.4, "compute_peak_fraction": 0.45,
             "min_cosine": 0.9995, "parity_passed": True, "reason": None,
             "cuda_graphs": {"replayed": 30, "eager": 0}},
            {"key": "tensorrt/fp16", "status": "not available", "batch_size": None, "reason": "no TensorRT"},
        ],
        "targets": [{"line": "[MET] torch-cuda end to end vs its compute-only: 93.8%"}],
    }  # fmt: skip
    tests = {"counts": {"passed": 1, "failed": 1}, "source": "log", "tests": [
        {"test": "tests/a.py::test_ok", "outcome": "passed", "message": None},
        {"test": "tests/b.py::test_bad", "outcome": "failed", "message": "AssertionError: off"}]}  # fmt: skip
    result = {
        "dry_run": False, "machine": "16-core CPU, 1x NVIDIA H200", "duration_s": 400.0, "budget_s": 480,
        "finished": False, "running": "slides", "environment": {"driver": "580.159.03", "cuda": "13.0"},
        "steps": {
            "tests": {"status": "ok", "seconds": 90, "reason": None, "result": tests},
            "bench virchow2": {"status": "ok", "seconds": 120, "reason": None, "result": bench},
            "slides": {"status": "failed", "seconds": 3, "reason": "RuntimeError: no reader", "result": None},
        },
    }  # fmt: skip
    md = render_markdown(result)
    assert "NVIDIA H200" in md and "580.159.03" in md and "RANDOM WEIGHTS" in md
    assert "400.0 s of a 480 s budget, NOT FINISHED (running: slides)" in md
    assert "| slides | failed | 3 | RuntimeError: no reader |" in md
    assert (
        "- FAILED `tests/b.py::test_bad`: AssertionError: off" in md
        and "- PASSED `tests/a.py::test_ok`" in md
    )
    assert "| torch-cuda/fp16 (graphs: 30 replayed, 0 eager) | 64 | 1,500 | 1,600 | 45.0% | 0.999500 |" in md
    assert "| tensorrt/fp16 |  | not available: no TensorRT |" in md and "[MET] torch-cuda" in md


def test_the_environment_names_what_a_first_gpu_run_failure_is_attributed_by() -> None:
    from virchow_rt.benchmark.environment import collect_environment

    versions = collect_environment()["versions"]  # None where not installed, never left out
    assert {"cuda-core", "cupy-cuda13x", "cupy-cuda12x", "nvidia-cuda-nvrtc", "torch"} <= set(versions)
    assert versions["numpy"]


def test_a_check_killed_mid_bench_keeps_the_rows_measured_so_far(tmp_path: Path) -> None:
    setup = f"""
        gpu_check.BENCH = ({_measuring_child(tmp_path, MEASURED)!r},)
        gpu_check.LIMITS.update(tests=(1, 10**6), bench=(300, 1))  # tests: skipped; the bench hangs
        gpu_check_children.WATCH_S = 0.2
    """
    saved = tmp_path / "out" / "gpu_check.json"

    def rows_so_far() -> int:
        found = json.loads(saved.read_text()).get("running_so_far") if saved.exists() else None
        return len(found["rows"]) if found else 0

    run = subprocess.Popen(_check_command(tmp_path, json.dumps(PROBE), setup=setup),
                           stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while rows_so_far() < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polls the check's own file: the rows are there as soon as it has read them
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the whole check, as a device machine taking it back does
        run.wait()
    result = json.loads(saved.read_text())
    assert result["running"] == "bench virchow2-tiny" and not result["finished"]
    assert [r["batch_size"] for r in result["running_so_far"]["rows"]] == [4, 8]
    assert "## bench virchow2-tiny (not finished: 2 rows)" in (tmp_path / "out" / "gpu_check.md").read_text()


@pytest.mark.parametrize(
    ("parts", "kept"),
    [
        ([{"variant": "v", "tiles": 12}], "nothing measured"),
        ([{"variant": "v", "tiles": 12}, {"reader": {"tiles_per_s": 50.0}}], "kept what it measured: reader"),
    ],
)
def test_a_check_stopped_by_sigterm_keeps_what_the_step_wrote_since_it_was_last_read(
    tmp_path: Path, parts: list, kept: str
) -> None:
    # never read while it runs (WATCH_S): only a last reading when the check is stopped can hold the parts
    setup = f"""
        import signal
        signal.signal(signal.SIGTERM, gpu_check._stop)  # as main() does
        gpu_check.SLIDES = {_measuring_child(tmp_path, {"slides": parts})!r}
        gpu_check.LIMITS.update(tests=(1, 10**6), bench=(1, 10**6), slides=(300, 1))  # only slides runs
        gpu_check_children.WATCH_S = 10**6
    """
    run = subprocess.Popen(_check_command(tmp_path, json.dumps(PROBE), setup=setup), stdout=subprocess.PIPE,
                           text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        wrote = tmp_path / "slides.measured"
        while not wrote.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polls the stand-in's own file: it has written its parts
        run.send_signal(signal.SIGTERM)  # the check alone, as a lease ending may
        stdout, _ = run.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what the check left running: nothing, normally
            os.killpg(run.pid, signal.SIGKILL)
    slides = json.loads(stdout.split("RESULT ", 1)[1])["result"]["steps"]["slides"]
    assert slides["status"] == "stopped"
    assert slides["reason"] == f"the check was stopped (SIGTERM) during this step; {kept}"
    assert slides["result"]["tiles"] == 12 and slides["result"]["complete"] is False
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert f"## slides (not finished: {kept.removeprefix('kept what it measured: ')})" in md
