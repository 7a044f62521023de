#!/usr/bin/env python
"""The GPU-truth check: one run that proves virchow-rt's GPU half on a real GPU and records what it found.

Steps, each timed and recorded as "ok", "failed" (with the error), "skipped" (with the reason) or
"stopped", never guessed: carried wheels installed offline; virchow-rt and the heavy packages imported
(from outside the tree), with the environment; the ``gpu`` and ``tensorrt`` test tiers (every test's
outcome); pinned and pageable host<->device bandwidth; the NVRTC resize kernel against the CPU
reference; the benchmark of two variants with random weights (PyTorch eager fp32, TRIDENT-style fp16
autocast, the torch-cuda pipeline end to end and compute-only, parity, the matmul peak measured in the
same run, the targets) and how much of the copies the pipeline hides; the whole-slide path (reader
alone, model alone, end to end).

Run it through ``bench/gpu_check.sh``, which puts the tree on ``PYTHONPATH`` and starts the budget's
clock (the budget counts the install and the imports too)::

    bench/gpu_check.sh --out DIR [--budget SECONDS]    on a GPU machine (budget 480 s)
    bench/gpu_check.sh --dry-run --out DIR             the same steps, tiny, on any machine (CI runs it)

Made to survive what a GPU lease does to it: ``gpu_check.json`` and ``gpu_check.md`` are rewritten as
each step starts and ends (they name the step running); every step that imports the heavy packages or
touches the GPU runs in a child process with a time limit (SIGINT first, so pytest writes what it has,
then SIGKILL for the child and every process it started: the step is recorded as "stopped"); no step
starts without its ``min_left`` of the budget; pytest streams each test's id and outcome into
``pytest.log`` as the test ends; the bench and slides children write each row as they measure it (a
JSON-lines file in the scratch folder; a damaged line is skipped and counted), read into
``gpu_check.json`` (``running_so_far``) every WATCH_S (2 s) while they run and once more, kept as the
step's result, when they fail or are stopped (a SIGTERM too); a check killed mid-step (SIGKILL) keeps
the rows read by then, at most 2 s behind. At most 6 files are written into
``--out``: ``gpu_check.json``, ``gpu_check.md``, ``pytest.log``, ``steps.log`` and each variant's
``<variant>.report.json``.

Beside it in ``bench/``: ``gpu_check_children.py`` (child processes: environment, limits, cleanup),
``gpu_check_steps.py`` (the steps run in a child: probe, bandwidth, resize kernel) and
``gpu_check_report.py`` (test outcomes, bench summaries, ``gpu_check.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gpu_check_children import (
    GRACE_S,
    ROOT,
    SoFar,
    StepFailed,
    StepStopped,
    Stopped,
    become_subreaper,
    budget_start,
    child_env,
    last_line,
    run_logged,
    stop_leftovers,
)
from gpu_check_report import (
    bench_so_far,
    hiding,
    kept_words,
    read_test_outcomes,
    render_markdown,
    slides_so_far,
    summarize_report,
    write_whole,
)

STEPS = ROOT / "bench" / "gpu_check_steps.py"
SLIDES = ROOT / "bench" / "slides_throughput.py"
BENCH = ("-m", "virchow_rt", "bench")  # the benchmark's command line after the interpreter
SITE = Path(tempfile.gettempdir()) / "virchow-rt-site"  # where carried wheels are installed
#: rows every variant is benchmarked with (the reference first; see virchow_rt.benchmark.rows)
ROWS = "torch-eager/fp32,torch-eager/fp16-autocast,torch-cuda"


@dataclass(frozen=True)
class Plan:
    """How much the check measures: variants with their batch sizes and tiles per pass, sizes, time."""

    variants: tuple[tuple[str, str, int], ...]  # (variant, comma-separated batch sizes, tiles per pass)
    repeats: int
    warmup: int
    copy_mib: int  # bytes per bandwidth copy
    resize_tiles: int
    slide: tuple[str, str]  # (variant, level-0 WIDTHxHEIGHT): no reader sweep, one timed repeat
    test_timeout_s: int  # per test, where pytest-timeout is installed
    budget_s: float  # the whole check, install and imports included


FULL = Plan(
    variants=(("virchow2", "32,64,128", 512), ("virchow2g-mini", "64,256,512", 4096)),
    repeats=3,
    warmup=2,
    copy_mib=256,
    resize_tiles=256,
    slide=("virchow2g-mini", "8192x6144"),
    test_timeout_s=90,
    budget_s=480,
)
DRY = Plan(
    variants=(("virchow2-tiny", "4,8", 16), ("virchow2g-mini-tiny", "8", 16)),
    repeats=1,
    warmup=1,
    copy_mib=8,
    resize_tiles=8,
    slide=("virchow2g-mini-tiny", "4096x3072"),
    test_timeout_s=60,
    budget_s=600,
)
#: step -> (the most seconds it may take, its min_left: with less of the budget left it is skipped).
#: Estimates until a GPU run has recorded each step's seconds (virchow2's bench: ~110 s expected, the
#: fp32 reference dominating); a bench or slides step stopped at its limit keeps the rows it reached (the
#: tests step, the outcomes), the other steps nothing but their log: generous, so that the steps after
#: them are the ones skipped when the budget runs out.
LIMITS = {
    "install": (60, 20), "environment": (90, 30), "tests": (150, 60), "bandwidth": (30, 20),
    "resize kernel": (45, 20), "bench": (170, 60), "copy hiding": (5, 1), "slides": (120, 45),
}  # fmt: skip
#: the files the check writes into --out (besides one <variant>.report.json per variant)
OUT_FILES = ("gpu_check.json", "gpu_check.md", "pytest.log", "steps.log")


# --- the check ---------------------------------------------------------------------------------------
class Checker:
    """Runs steps within the budget; rewrites ``gpu_check.json`` and ``.md`` as each step starts and ends."""

    def __init__(
        self, out: Path, plan: Plan, *, dry_run: bool, started: float, log: Callable[[str], None]
    ) -> None:
        self.out, self.plan, self.dry_run, self.log = out, plan, dry_run, log
        self.start = started  # the perf_counter() value the budget counts from
        self.steps: dict[str, dict[str, Any]] = {}
        self.running: str | None = None
        self.so_far: Any = None  # what the running step has measured so far (kept if the check is killed)
        self.reading: SoFar | None = None  # how to read it once more (the check stopped by a signal)
        self.finished = False
        self.environment: dict[str, Any] | None = None
        self.gpu = False
        self.blocked: str | None = None  # why no further step can run

    def left(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.start)

    def step(
        self,
        name: str,
        fn: Callable[[float], Any],
        *,
        limits: str | None = None,
        needs_gpu: bool = False,
        unless: str | None = None,
    ) -> Any:
        """Run ``fn(timeout)`` as step ``name`` (limits: LIMITS[limits or name]); returns its result or None.

        Skipped with the reason when an earlier step blocked the rest, ``unless`` says why not, a GPU is
        needed and none is visible, or less than the step's min_left of the budget is left.
        """
        most, least = LIMITS[limits or name]
        reason = self.blocked or unless
        if reason is None and needs_gpu and not self.gpu:
            reason = "no CUDA GPU visible here (a dry run)"
        if reason is None and self.left() < least:
            reason = f"out of the time budget ({self.left():.0f} s left, the step needs at least {least} s)"
        if reason is not None:
            return self._record(name, "skipped", 0.0, reason)
        timeout = min(most, self.left() - GRACE_S)
        self.log(f"== {name} (at most {timeout:.0f} s; {self.left():.0f} s of the budget left)")
        self.running = name
        self.save()
        begun = time.perf_counter()
        try:
            result, status, reason = fn(timeout), "ok", None
        except StepFailed as err:
            status = "stopped" if isinstance(err, StepStopped) else "failed"
            result, reason = err.result, str(err)
        except Exception as err:  # noqa: BLE001 - one failed step must not stop the others; recorded
            detail = "".join(traceback.format_exception(err)[-3:]).strip()
            self.log(detail)
            result, status, reason = None, "failed", f"{type(err).__name__}: {err}"
        self.running, self.so_far, self.reading = None, None, None
        return self._record(name, status, time.perf_counter() - begun, reason, result)

    def _record(self, name: str, status: str, seconds: float, reason: str | None, result: Any = None) -> Any:
        self.steps[name] = {
            "status": status,
            "seconds": round(seconds, 2),
            "reason": reason,
            "result": result,
        }
        self.log(f"{name}: {status}" + (f": {reason}" if reason else f" in {seconds:.1f} s"))
        self.save()
        return result

    def progress(self, found: Any) -> None:
        """The running step has measured ``found`` so far: on disk now, so a killed check still holds it."""
        if found is not None and found != self.so_far:
            self.so_far = found
            self.save()

    def stopped(self, why: str) -> None:
        """The check was stopped (a signal) while ``self.running`` ran: record it, with what it reached."""
        if self.running is not None:
            reason = f"the check was stopped ({why}) during this step"
            found = self.so_far
            if self.reading is not None:  # the child is gone: what it wrote since the last read is final
                found = self.reading()
                reason += f"; {kept_words(found)}"
            self._record(self.running, "stopped", 0.0, reason, found)
            self.running, self.so_far, self.reading = None, None, None

    def result(self) -> dict[str, Any]:
        env = self.environment or {}
        return {
            "kind": "virchow-rt-gpu-check", "dry_run": self.dry_run, "random_weights": True,
            "finished": self.finished, "running": self.running, "running_so_far": self.so_far,
            "machine": env.get("machine"),
            "environment": self.environment, "plan": asdict(self.plan), "budget_s": self.plan.budget_s,
            "duration_s": round(time.perf_counter() - self.start, 1), "steps": self.steps,
        }  # fmt: skip

    def save(self) -> None:
        """``gpu_check.json`` then ``gpu_check.md``, each replaced whole (a kill never leaves half a file)."""
        result = self.result()
        write_whole(self.out / "gpu_check.json", json.dumps(result, indent=1, default=str) + "\n")
        try:
            text = render_markdown(result)
        except Exception as err:  # noqa: BLE001 - the JSON holds everything; say why the summary is short
            text = f"# virchow-rt GPU check\n\nNo summary: {type(err).__name__}: {err}\n"
        write_whole(self.out / "gpu_check.md", text)


def run_gpu_check(out: Path, *, dry_run: bool = False, budget_s: float | None = None) -> dict[str, Any]:
    """Run every step into ``out`` (see the module docstring); returns what ``gpu_check.json`` holds."""
    plan = DRY if dry_run else FULL
    if budget_s is not None:
        plan = replace(plan, budget_s=budget_s)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*OUT_FILES, *(f"{v}.report.json" for v, _, _ in plan.variants)]:
        (out / stale).unlink(missing_ok=True)
    steps_log, py = out / "steps.log", sys.executable

    def log(text: str) -> None:
        print(text, flush=True)
        with steps_log.open("a") as fh:
            fh.write(text + "\n")

    check = Checker(out, plan, dry_run=dry_run, started=budget_start(), log=log)
    become_subreaper()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = child_env()

    def child(
        args: list[str], timeout: float, what: str, log_to: Path = steps_log, so_far: Any = None
    ) -> None:
        """Run a child; with ``so_far``, what it has measured is kept as it runs, fails or is stopped."""
        reading = check.reading = None if so_far is None else SoFar(so_far, log)
        watch = None if reading is None else lambda: check.progress(reading())
        try:
            code = run_logged(args, log_to, timeout, env=env, cwd=scratch, watch=watch)
            if code != 0:
                raise StepFailed(f"{what} exited {code}: {last_line(log_to)} (see {log_to.name})")
        except StepFailed as err:
            if reading is None:
                raise
            found = reading()  # once more: the child is gone, what it wrote is final
            raise type(err)(f"{err}; {kept_words(found)}", found) from None

    def child_step(args: list[str], timeout: float) -> Any:
        result = scratch / f"{args[0]}.json"
        child([py, str(STEPS), *args, "--result", str(result)], timeout, f"gpu_check_steps.py {args[0]}")
        return json.loads(result.read_text())

    def install(timeout: float) -> dict[str, Any]:
        nonlocal env
        shutil.rmtree(SITE, ignore_errors=True)
        wheels = sorted(str(w) for w in (ROOT / ".whl").glob("*.whl"))
        child([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--target", str(SITE), *wheels], timeout, "pip install")  # fmt: skip
        env = child_env(SITE)
        return {"wheels": [Path(w).name for w in wheels], "into": str(SITE)}

    def tests(timeout: float) -> dict[str, Any]:
        xml, log_path = scratch / "junit.xml", out / "pytest.log"
        cmd = [py, "-m", "pytest", "-m", "gpu or tensorrt", "-p", "no:cacheprovider", "-v", "-rA",
               "--continue-on-collection-errors", f"--junitxml={xml}", "tests"]  # fmt: skip
        if timeouts:  # each test's own limit: a hung test fails alone (pytest-timeout, on the GPU image)
            cmd.append(f"--timeout={plan.test_timeout_s}")
        try:
            # a test hung in native CUDA code holding the GIL: its stack is dumped and the run ends
            # (tests/conftest.py's watchdog), with every outcome so far already in pytest.log
            hang = {**(env or os.environ), "VIRCHOW_RT_TEST_HANG_S": str(plan.test_timeout_s + 30)}
            code, stop = run_logged(cmd, log_path, timeout, env=hang, cwd=ROOT), None
        except StepFailed as err:
            code, stop = None, err
        found = {"exit_code": code, "per_test_timeout_s": plan.test_timeout_s if timeouts else None,
                 **read_test_outcomes(xml, log_path)}  # fmt: skip
        if stop is not None:
            raise type(stop)(f"pytest {stop}", found)
        if code not in (0, 5):  # 5: no test selected
            raise StepFailed(f"pytest exited {code}: {found['counts']}", found)
        return found

    def bench(variant: str, batches: str, tiles: int, timeout: float) -> dict[str, Any]:
        folder = scratch / f"bench-{variant}"  # not the variant's name: bench would take it for a folder
        args = [variant, "--random-weights", "--backends", ROWS, "--batch-sizes", batches,
                "--tiles", str(tiles), "--repeats", str(plan.repeats), "--warmup", str(plan.warmup),
                "--out", str(folder)]  # fmt: skip
        so_far = lambda: bench_so_far(variant, folder)  # noqa: E731
        child([py, *BENCH, *args], timeout, f"virchow-rt bench {variant}", so_far=so_far)
        shutil.copy(folder / "report.json", out / f"{variant}.report.json")
        return summarize_report(json.loads((folder / "report.json").read_text()))

    def slides(timeout: float) -> dict[str, Any]:
        variant, size = plan.slide
        folder, parts = scratch / "slides", scratch / "slides-parts.jsonl"
        cmd = [py, str(SLIDES), "--variant", variant, "--size", size, "--repeats", "1", "--no-sweep",
               "--backend", "torch-cuda" if check.gpu else "auto", "--workers", str(os.cpu_count() or 1),
               "--out", str(folder), "--parts", str(parts)]  # fmt: skip
        child(cmd, timeout, "slides_throughput.py", so_far=lambda: slides_so_far(parts))
        report: dict[str, Any] = json.loads((folder / "slides_throughput.json").read_text())
        report.pop("environment", None)  # the check records it once
        return report

    timeouts, readers, probed = False, [], None
    carried = "" if list((ROOT / ".whl").glob("*.whl")) else "no wheels carried in .whl/"
    try:
        check.step("install", install, unless=carried or None)
        probed = check.step("environment", lambda t: child_step(["probe"], t))
        if probed is None:
            check.blocked = "virchow-rt or the environment did not load (see the environment step)"
        else:
            check.environment = probed.pop("environment")
            check.gpu, readers = bool(probed["gpu_visible"]), probed["slide_readers"]
            timeouts = bool(probed["imports"]["pytest_timeout"]["ok"])
            if not dry_run and not check.gpu:
                check.blocked = "no CUDA GPU is visible here; use --dry-run to exercise the check on a CPU"
        check.step("tests", tests)
        rates = check.step(
            "bandwidth", lambda t: child_step(["bandwidth", str(plan.copy_mib)], t), needs_gpu=True
        )
        check.step(
            "resize kernel", lambda t: child_step(["resize", str(plan.resize_tiles)], t), needs_gpu=True
        )
        benches = {
            v: check.step(f"bench {v}", lambda t, v=v, b=b, n=n: bench(v, b, n, t), limits="bench")
            for v, b, n in plan.variants
        }
        check.step("copy hiding", lambda t: hiding(benches, rates), needs_gpu=True)
        no_reader = "neither OpenSlide nor tiffslide imports here (carry their wheels in .whl/)"
        check.step("slides", slides, unless=None if readers else no_reader)
        check.finished = check.blocked is None
    except (Stopped, KeyboardInterrupt) as err:
        check.stopped(type(err).__name__ if isinstance(err, KeyboardInterrupt) else str(err))
    finally:
        stop_leftovers()
        shutil.rmtree(scratch, ignore_errors=True)
        check.save()
    if not dry_run and probed is not None and not check.gpu:
        raise SystemExit(f"gpu_check: {check.blocked}")
    return check.result()


def _stop(signum: int, _frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="at most 6 files are written here")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on any machine; GPU steps skipped")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds from gpu_check.sh's start (default 480; dry 600)"
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    result = run_gpu_check(args.out, dry_run=args.dry_run, budget_s=args.budget)
    failed = [name for name, step in result["steps"].items() if step["status"] in ("failed", "stopped")]
    print(
        f"gpu check: {len(result['steps'])} steps in {result['duration_s']} s of {result['budget_s']} s "
        f"on {result['machine']}; failed: {', '.join(failed) or 'none'}; results in {args.out}/"
    )
    return 1 if failed or not result["finished"] else 0


if __name__ == "__main__":
    sys.exit(main())
