"""The GPU-truth check: one run that proves virchow-rt's GPU half on a real GPU and records what it found.

Steps, each timed and recorded as "ok", "failed" (with the error) or "skipped" (with the reason), never
guessed: the environment; the ``gpu`` and ``tensorrt`` test tiers (every test's outcome); the benchmark
of two variants with random weights (PyTorch eager fp32, TRIDENT-style fp16 autocast, the torch-cuda
pipeline end to end and compute-only, parity, the matmul peak measured in the same run, the targets);
pinned and pageable host<->device bandwidth, and how much of the copies the pipeline hides; the NVRTC
resize kernel against the CPU reference; the whole-slide path (reader alone, model alone, end to end).

``dry_run`` runs the same steps with tiny configs and small sizes on any machine (CI does, so a typo
never costs GPU minutes); the GPU-only steps are then skipped with the reason. The bench, the tests
and the slide run are subprocesses (each starts with an empty GPU and a time limit). At most 8 files
are written into ``out``: ``gpu_check.json``, ``gpu_check.md``, ``pytest.log``, ``steps.log`` and
each variant's ``<variant>.report.json`` / ``.report.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.benchmark.environment import collect_environment
from virchow_rt.benchmark.targets import format_target
from virchow_rt.benchmark.timing import Stats, time_calls
from virchow_rt.files import write_json
from virchow_rt.registry import get_variant

#: rows every variant is benchmarked with (the reference first; see virchow_rt.benchmark.rows)
ROWS = "torch-eager/fp32,torch-eager/fp16-autocast,torch-cuda"
#: the source checkout (tests/ and bench/ live there, not in an installed package)
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Plan:
    """How much the check measures: variants with their batch sizes and tiles per pass, sizes, time."""

    variants: tuple[tuple[str, str, int], ...]  # (variant, comma-separated batch sizes, tiles per pass)
    repeats: int
    warmup: int
    copy_mib: int  # bytes per bandwidth copy
    resize_tiles: int
    slide: tuple[str, str, int]  # (variant, level-0 WIDTHxHEIGHT, repeats)
    budget_s: float


FULL = Plan(
    variants=(("virchow2", "32,64,128", 512), ("virchow2g-mini", "64,256,512", 4096)),
    repeats=3,
    warmup=2,
    copy_mib=256,
    resize_tiles=256,
    slide=("virchow2g-mini", "16384x12288", 2),
    budget_s=480,
)
DRY = Plan(
    variants=(("virchow2-tiny", "4,8", 16), ("virchow2g-mini-tiny", "8", 16)),
    repeats=1,
    warmup=1,
    copy_mib=8,
    resize_tiles=8,
    slide=("virchow2g-mini-tiny", "4096x3072", 1),
    budget_s=600,
)
#: a step that needs at least this much of the budget left is skipped below it (seconds)
MIN_LEFT = {"tests": 60, "bench": 60, "slides": 45}


def gpu_visible() -> bool:
    """A CUDA GPU is visible to cuda-python and to torch (the check uses both)."""
    from virchow_rt.backends.cuda import api as cuda

    if cuda.device_count() == 0:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class Checker:
    """Runs steps within a time budget and keeps what each found."""

    def __init__(self, out: Path, plan: Plan, gpu: bool, log: Callable[[str], None]) -> None:
        self.out, self.plan, self.gpu, self.log = out, plan, gpu, log
        self.start = time.perf_counter()
        self.steps: dict[str, dict[str, Any]] = {}

    def left(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.start)

    def step(self, name: str, fn: Callable[[], Any], *, needs_gpu: bool = False, min_left: float = 0) -> Any:
        """Run ``fn`` as step ``name``; its result (or None) is recorded and returned."""
        if needs_gpu and not self.gpu:
            return self._record(name, "skipped", 0.0, reason="no CUDA GPU visible here (a dry run)")
        if self.left() < min_left:
            reason = (
                f"out of the time budget ({self.left():.0f} s left, the step needs about {min_left:.0f} s)"
            )
            return self._record(name, "skipped", 0.0, reason=reason)
        self.log(f"== {name} ({self.left():.0f} s of the budget left)")
        begun = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - one failed step must not stop the others; recorded
            detail = "".join(traceback.format_exception(err)[-3:]).strip()
            self.log(f"{name}: FAILED: {type(err).__name__}: {err}\n{detail}")
            return self._record(
                name, "failed", time.perf_counter() - begun, reason=f"{type(err).__name__}: {err}"
            )
        return self._record(name, "ok", time.perf_counter() - begun, result=result)

    def _record(
        self, name: str, status: str, seconds: float, reason: str | None = None, result: Any = None
    ) -> Any:
        self.steps[name] = {
            "status": status,
            "seconds": round(seconds, 2),
            "reason": reason,
            "result": result,
        }
        if status != "ok":
            self.log(f"{name}: {status}: {reason}")
        return result


def run_logged(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the checkout, appending its output to ``log``; TimeoutExpired after ``timeout`` s."""
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False, cwd=ROOT
        )


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "virchow_rt", *args]


# --- the steps -----------------------------------------------------------------------------------
def junit_outcomes(xml_path: Path) -> list[dict[str, Any]]:
    """Every test case of a pytest JUnit XML file: id, outcome (passed/failed/error/skipped), message."""
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (found.get("message") or found.text or "").strip().splitlines()[0][:300] or None
                break
        module = case.get("classname", "").replace(".", "/")
        cases.append({"test": f"{module}.py::{case.get('name')}", "outcome": outcome, "message": message})
    return cases


def gpu_tests(out: Path, scratch: Path, timeout: float) -> dict[str, Any]:
    """``pytest -m "gpu or tensorrt"``: every test's outcome; the log goes to ``out/pytest.log``."""
    xml_path = scratch / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-p", "no:cacheprovider", "-q", "-rA",
           f"--junitxml={xml_path}", "tests"]  # fmt: skip
    proc = run_logged(cmd, out / "pytest.log", timeout)
    cases = junit_outcomes(xml_path)
    counts = Counter(c["outcome"] for c in cases)
    return {"exit_code": proc.returncode, "counts": dict(counts), "tests": cases}


def bench_variant(
    variant: str, batches: str, tiles: int, plan: Plan, out: Path, scratch: Path, timeout: float
) -> dict[str, Any]:
    """``virchow-rt bench VARIANT --random-weights`` with the check's rows; report copied to ``out``."""
    folder = scratch / variant
    args = ["bench", variant, "--random-weights", "--backends", ROWS, "--batch-sizes", batches,
            "--tiles", str(tiles), "--repeats", str(plan.repeats), "--warmup", str(plan.warmup),
            "--out", str(folder)]  # fmt: skip
    proc = run_logged(cli(*args), out / "steps.log", timeout)
    if proc.returncode != 0 or not (folder / "report.json").exists():
        raise RuntimeError(f"virchow-rt bench {variant} exited {proc.returncode}; see steps.log")
    shutil.copy(folder / "report.json", out / f"{variant}.report.json")
    shutil.copy(folder / "report.md", out / f"{variant}.report.md")
    return summarize_report(json.loads((folder / "report.json").read_text()))


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """The rows and targets of a benchmark report, as the check's summary keeps them."""
    rows = []
    for r in report["results"]:
        parity = r.get("parity") or {}
        rows.append({
            "key": f"{r['backend']}/{r['precision']}", "status": r["status"],
            "batch_size": r.get("batch_size"),
            "tiles_per_s": r.get("tiles_per_s"), "compute_tiles_per_s": r.get("compute_tiles_per_s"),
            "peak_fraction": r.get("peak_fraction"), "compute_peak_fraction": r.get("compute_peak_fraction"),
            "min_cosine": parity.get("min_cosine"), "parity_passed": parity.get("passed"),
            "reason": r.get("reason"),
        })  # fmt: skip
    targets = [t for t in report.get("targets", []) if t["device"] == "cuda"]
    return {
        "variant": report["variant"],
        "random_weights": report["random_weights"],
        "matmul_peaks": {k: v.get("tflops") for k, v in (report.get("matmul_peaks") or {}).items()},
        "rows": rows,
        "targets": [{**t, "line": format_target(t)} for t in targets],
    }


def bandwidth(mib: int, repeats: int = 5) -> dict[str, Any]:
    """Host<->device copy rates: pinned (async on a stream, CUDA events) and pageable (synchronous)."""
    from virchow_rt.backends.cuda import api as cuda

    nbytes = mib << 20
    rt = cuda.cudart()
    pageable = np.ones(nbytes, np.uint8)
    with cuda.PinnedBuffer(nbytes) as host, cuda.DeviceBuffer(nbytes) as dev, cuda.Stream() as stream:
        timer = cuda.EventTimer(stream)

        def timed(kind: str) -> Stats:
            dst, src = (dev.ptr, host.ptr) if kind == "h2d" else (host.ptr, dev.ptr)
            samples = [
                timer.measure(lambda: cuda.copy_async(dst, src, nbytes, kind, stream))
                for _ in range(repeats + 1)
            ]
            return Stats(tuple(samples[1:]))

        h2d, d2h = timed("h2d"), timed("d2h")
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        copy = lambda: cuda.check(rt.cudaMemcpy(dev.ptr, pageable.ctypes.data, nbytes, kind), "cudaMemcpy")  # noqa: E731
        paged = time_calls(copy, repeats=repeats, warmup=1)
    rates = {"pinned_h2d_gb_s": h2d, "pinned_d2h_gb_s": d2h, "pageable_h2d_gb_s": paged}
    return {"bytes": nbytes, **{name: nbytes / stats.median / 1e9 for name, stats in rates.items()}}


def copy_hiding(
    row: dict[str, Any], tile_bytes: int, out_bytes: int, h2d_gb_s: float, d2h_gb_s: float
) -> dict[str, Any]:
    """How much of a batch's copies the pipeline hid, from a bench row's end-to-end and compute-only rates.

    A batch's copies would take ``copy_s`` at the measured pinned bandwidths; what end to end spends
    beyond compute-only (``exposed_s``: copies not hidden, and any other host work) bounds the copy time
    left in view, so ``hidden_fraction`` is a lower bound.
    """
    b = row["batch_size"]
    e2e_s, compute_s = b / row["tiles_per_s"], b / row["compute_tiles_per_s"]
    copy_s = b * tile_bytes / (h2d_gb_s * 1e9) + b * out_bytes / (d2h_gb_s * 1e9)
    exposed_s = max(0.0, e2e_s - compute_s)
    hidden = min(1.0, max(0.0, 1.0 - exposed_s / copy_s))
    return {"batch_size": b, "end_to_end_ms": e2e_s * 1e3, "compute_ms": compute_s * 1e3,
            "copy_ms_if_serial": copy_s * 1e3, "exposed_ms": exposed_s * 1e3,
            "hidden_fraction_at_least": hidden}  # fmt: skip


def resize_check(n: int, size_in: int = 448, size: int = 224, repeats: int = 5) -> dict[str, Any]:
    """The NVRTC resize kernel vs the CPU reference on ``n`` tissue tiles of ``size_in`` px: pixels, time."""
    from virchow_rt.backends.cuda import api as cuda
    from virchow_rt.kernels.cuda_resize import CudaResizer
    from virchow_rt.kernels.resize import resize_tiles
    from virchow_rt.tissue import tissue_tiles

    tiles = tissue_tiles(n, size_in, seed=11)  # (n, 448, 448, 3): 40x tiles
    want = resize_tiles(tiles, size)
    cpu = time_calls(lambda: resize_tiles(tiles, size), repeats=repeats, warmup=0)
    with CudaResizer(size) as resizer, cuda.Stream() as stream:
        got = resizer(tiles)
        host = time_calls(lambda: resizer(tiles), repeats=repeats, warmup=1)
        with cuda.DeviceBuffer(tiles.nbytes) as src, cuda.DeviceBuffer(want.nbytes) as dst:
            cuda.copy_async(src.ptr, tiles.ctypes.data, tiles.nbytes, "h2d", stream)
            stream.synchronize()
            timer = cuda.EventTimer(stream)
            run = lambda: resizer.resize_device(src.ptr, n, size_in, size_in, dst.ptr, stream)  # noqa: E731
            device = Stats(tuple(timer.measure(run) for _ in range(repeats + 1))[1:])
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {
        "tiles": n, "from_px": size_in, "to_px": size, "max_abs_diff": int(diff.max()),
        "equal_pixels": float((diff == 0).mean()),
        "cpu_tiles_per_s": n / cpu.median, "gpu_host_to_host_tiles_per_s": n / host.median,
        "gpu_device_only_tiles_per_s": n / device.median,
    }  # fmt: skip


def slides_run(plan: Plan, backend: str, out: Path, scratch: Path, timeout: float) -> dict[str, Any]:
    """``bench/slides_throughput.py`` on a synthetic slide with every core reading."""
    variant, size, repeats = plan.slide
    folder = scratch / "slides"
    script = ROOT / "bench" / "slides_throughput.py"
    cmd = [sys.executable, str(script), "--variant", variant, "--size", size, "--repeats", str(repeats),
           "--backend", backend, "--workers", str(os.cpu_count() or 1), "--out", str(folder)]  # fmt: skip
    proc = run_logged(cmd, out / "steps.log", timeout)
    result = folder / "slides_throughput.json"
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"slides_throughput.py exited {proc.returncode}; see steps.log")
    report: dict[str, Any] = json.loads(result.read_text())
    report.pop("environment", None)  # the check records it once
    return report


# --- the whole check -------------------------------------------------------------------------------
def run_gpu_check(out: Path, *, dry_run: bool = False, budget_s: float | None = None) -> dict[str, Any]:
    """Run every step into ``out`` (see the module docstring); returns what ``gpu_check.json`` holds."""
    plan = DRY if dry_run else FULL
    if budget_s is not None:
        plan = Plan(**{**plan.__dict__, "budget_s": budget_s})
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_visible()
    if not dry_run and not gpu:
        raise SystemExit(
            "gpu_check: no CUDA GPU is visible here; use --dry-run to exercise the script on a CPU"
        )
    steps_log = out / "steps.log"

    def log(text: str) -> None:
        print(text, flush=True)
        with steps_log.open("a") as fh:
            fh.write(text + "\n")

    check = Checker(out, plan, gpu, log)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        env = check.step("environment", collect_environment)
        check.step(
            "tests", lambda: gpu_tests(out, scratch, max(check.left() - 300, 60)), min_left=MIN_LEFT["tests"]
        )
        benches: dict[str, Any] = {}
        for variant, batches, tiles in plan.variants:

            def bench(v: str = variant, b: str = batches, t: int = tiles) -> dict[str, Any]:
                return bench_variant(v, b, t, plan, out, scratch, max(check.left() - 60, 30))

            benches[variant] = check.step(
                f"bench {variant}",
                bench,
                min_left=MIN_LEFT["bench"],
            )
        rates = check.step("bandwidth", lambda: bandwidth(plan.copy_mib), needs_gpu=True)
        check.step("copy hiding", lambda: hiding(benches, rates), needs_gpu=True)
        check.step("resize kernel", lambda: resize_check(plan.resize_tiles), needs_gpu=True)
        backend = "torch-cuda" if gpu else "auto"
        check.step(
            "slides",
            lambda: slides_run(plan, backend, out, scratch, max(check.left(), 30)),
            min_left=MIN_LEFT["slides"],
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "kind": "virchow-rt-gpu-check",
        "dry_run": dry_run,
        "random_weights": True,
        "machine": (env or {}).get("machine"),
        "environment": env,
        "plan": plan.__dict__,
        "duration_s": round(time.perf_counter() - check.start, 1),
        "steps": check.steps,
    }
    write_json(out / "gpu_check.json", result)
    (out / "gpu_check.md").write_text(render_markdown(result))
    return result


def hiding(benches: dict[str, Any], rates: dict[str, Any] | None) -> dict[str, Any]:
    """Copy hiding of the torch-cuda pipeline at its fastest batch, per benchmarked variant."""
    if rates is None:
        raise RuntimeError("no bandwidth was measured")
    found = {}
    for variant, summary in benches.items():
        rows = [
            r
            for r in (summary or {}).get("rows", [])
            if r["key"] == "torch-cuda/fp16" and r["status"] == "ok"
        ]
        rows = [r for r in rows if r["compute_tiles_per_s"]]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["tiles_per_s"])
        v = get_variant(variant)
        tile, emb = v.preprocess.size**2 * 3, v.embedding_dim() * 4
        found[variant] = copy_hiding(best, tile, emb, rates["pinned_h2d_gb_s"], rates["pinned_d2h_gb_s"])
    if not found:
        raise RuntimeError("no torch-cuda row with a compute-only figure was measured")
    return found


# --- the summary a person reads --------------------------------------------------------------------
def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def render_markdown(result: dict[str, Any]) -> str:
    """``gpu_check.md``: machine, steps, tests, benchmark rows and targets, copies, resize, slides."""
    steps = result["steps"]
    env = result.get("environment") or {}
    lines = [
        "# virchow-rt GPU check" + (" (DRY RUN: tiny configs, CPU)" if result["dry_run"] else ""),
        "",
        f"Machine: **{result.get('machine')}**; driver {env.get('driver')}, CUDA {env.get('cuda')}; "
        f"{result['duration_s']} s. **RANDOM WEIGHTS** everywhere: throughput is real, embeddings are not.",
        "",
        "| step | status | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {s['status']} | {s['seconds']} | {s['reason'] or ''} |" for name, s in steps.items()
    ]
    tests = (steps.get("tests") or {}).get("result")
    if tests:
        lines += ["", f'## Tests (`pytest -m "gpu or tensorrt"`): {tests["counts"]}', ""]
        for c in tests["tests"]:
            note = f": {c['message']}" if c["message"] and c["outcome"] != "passed" else ""
            lines.append(f"- {c['outcome'].upper()} `{c['test']}`{note}")
    for name, s in steps.items():
        if not name.startswith("bench ") or not s["result"]:
            continue
        bench = s["result"]
        header = "| row | batch | tiles/s end to end | compute-only | peak | min cosine |"
        lines += ["", f"## {name}", "", header,
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in bench["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['key']} | {r['batch_size'] or ''} | {r['status']}: {r['reason']} | | | |")
                continue
            peak = r["compute_peak_fraction"] or r["peak_fraction"]
            rates = f"{_num(r['tiles_per_s'])} | {_num(r['compute_tiles_per_s'])}"
            lines.append(
                f"| {r['key']} | {r['batch_size']} | {rates} | {_num(peak, '{:.1%}')} "
                f"| {_num(r['min_cosine'], '{:.6f}')} |"
            )
        lines += ["", *[f"- {t['line']}" for t in bench["targets"]]]
    for name in ("bandwidth", "copy hiding", "resize kernel", "slides"):
        s = steps.get(name) or {}
        if s.get("result"):
            lines += [
                "",
                f"## {name}",
                "",
                "```json",
                json.dumps(s["result"], indent=1, default=str)[:3000],
                "```",
            ]
    return "\n".join(lines) + "\n"
