"""Throughput and embedding parity of every backend against the PyTorch reference (``virchow-rt bench``).

:func:`run_benchmark` measures every backend x precision row this machine has over a batch-size
sweep (end-to-end tiles/s, compute-only on a GPU, latency, peak memory, achieved TFLOP/s against a
matmul peak measured in the same run) and compares each row's embeddings with the fp32 reference on
real tissue tiles; it writes ``report.json``, ``report.md`` and PNG plots, and ``rows.jsonl`` (each row
as it is measured, kept by a run stopped early). Rows this machine cannot run are reported with the
reason, never with numbers.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from virchow_rt.benchmark.backends import artifact_path
from virchow_rt.benchmark.environment import collect_environment, load_average
from virchow_rt.benchmark.report import SCHEMA_VERSION, RowLog, validate_report, write_report
from virchow_rt.benchmark.rows import REFERENCE_KEY, ROWS, Machine, plan, row_stub
from virchow_rt.benchmark.runner import BenchmarkRun, cleanup_export
from virchow_rt.benchmark.source import Settings, reference_weights, resolve_settings, resolve_source
from virchow_rt.benchmark.targets import evaluate_targets, target_lines
from virchow_rt.benchmark.timing import LatencyRecorder, Stats, percentile, time_calls
from virchow_rt.errors import warn_random_weights

#: how the figures were taken, recorded in every report's settings
METHOD = {
    "tile_source": "virchow_rt.tissue.tissue_tiles (scikit-image IHC colon image)",
    "path": "uint8 tiles (N, S, S, 3) already in host memory -> virchow_rt.embed.Embedder.embed "
    "(reader thread + Backend.pipeline) -> float32 embeddings (N, E) on the host",
    "compute_only": "CUDA events around the backend's device work (GPU only; null on a CPU with the reason)",
    "memory": "host peak RSS of the process during warm-up and timed passes (Linux VmHWM reset per row); "
    "GPU: device memory in use (cudaMemGetInfo), sampled",
}


def _weights_facts(run: BenchmarkRun) -> tuple[bool, str | None, str | None]:
    """(random?, sha256, where from) of the weights: the reference model's, else the export manifest's."""
    if run.weights_info is not None:
        return bool(run.weights_info.random), run.weights_info.sha256, run.weights_info.source
    recorded = run.source.manifest.weights if run.source.manifest is not None else None
    if recorded is None:
        return False, None, None
    return recorded.random, recorded.sha256, recorded.source


def _command(
    model: str,
    out: Path,
    weights: str | None,
    random_weights: bool,
    backends: Sequence[str] | None,
    s: Settings,
) -> str:
    parts = ["virchow-rt", "bench", model]
    parts += ["--random-weights"] if random_weights else (["--weights", weights] if weights else [])
    if backends:
        parts += ["--backends", ",".join(backends)]
    parts += [
        "--batch-sizes",
        ",".join(map(str, s.batch_sizes)),
        "--tiles",
        str(s.tiles),
        "--repeats",
        str(s.repeats),
        "--warmup",
        str(s.warmup),
    ]
    parts += ["--out", str(out)]
    return shlex.join(parts)


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {f"{r.backend}/{r.precision}": i for i, r in enumerate(ROWS)}
    status = {"ok": 0, "failed": 1, "not available": 2, "not run": 3}
    return sorted(
        results,
        key=lambda r: (
            status.get(r["status"], 9),
            rank.get(f"{r['backend']}/{r['precision']}", 99),
            r["batch_size"] or 0,
        ),
    )


def _export_section(run: BenchmarkRun) -> dict[str, Any] | None:
    src = run.source
    if src.manifest is None:
        return None
    artifacts = [{**a.describe(), "parity": a.parity_summary} for a in src.manifest.artifacts]
    where = (
        "exported during this run (scratch folder, removed afterwards)"
        if src.exported_here
        else f"export folder {src.folder}"
    )
    return {"source": where, "export_s": src.export_s, "artifacts": artifacts}


def run_benchmark(
    model: str,
    out: str | Path,
    *,
    weights: str | None = None,
    random_weights: bool = False,
    backends: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    tiles: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    seed: int = 0,
    machine_label: str | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Benchmark ``model`` (a variant name, exported on the fly, or an export folder); report into ``out``.

    Returns the report (the content of ``out/report.json``). ``backends``: row names as in
    ``--backends`` (None: every row); ``machine_label`` names the machine in the report.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    machine = Machine.probe()
    source = resolve_source(model)
    settings = resolve_settings(machine.device, source.variant, batch_sizes, tiles, repeats, warmup, seed)
    ref_weights, ref_random = reference_weights(source, weights, random_weights)
    specs, stubs = plan(backends, machine)
    if source.folder is not None:  # a given export: a row whose model it does not hold is not run, not failed
        folder, variant = source.folder, source.variant
        missing = [s for s in specs if s.artifact and not artifact_path(folder, variant, s).exists()]
        specs = [s for s in specs if s not in missing]
        stubs += [row_stub(s, "not available", f"the export {source.folder} has no {s.artifact} model")
                  for s in missing]  # fmt: skip
    if ref_random:
        warn_random_weights(f"benchmarking {source.variant.name} with random weights")
    progress = sys.stderr.isatty() if progress is None else progress
    env = collect_environment()  # before the run: the load average at the start is part of the story
    if machine_label:
        env["machine_detected"], env["machine"] = env["machine"], f"{machine_label} — {env['machine']}"
    row_log = RowLog(out, echo)  # rows.jsonl: each row kept as measured, even if the run is stopped
    run = BenchmarkRun(source, settings, machine, echo, progress, lambda row: row_log(_clean(row)))
    try:
        if source.folder is None and any(s.artifact for s in specs):
            run.export(specs, out, ref_weights, ref_random)
        if any(s.kind in ("torch", "torch-cuda") for s in specs):  # torch-cuda runs the reference's module
            run.build_reference(ref_weights, ref_random)
        run.measure_peaks(specs)
        run.measure_rows(specs)
    finally:
        cleanup_export(run)
    results = _order(run.results + stubs)
    random, sha, weights_source = _weights_facts(run)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "virchow-rt-benchmark",
        "environment": env,
        "device": machine.device,  # "cpu" or "cuda": which targets apply
        "variant": run.variant.name,
        "variant_config": {**dict(run.variant.model_args), "mlp": run.variant.mlp},
        "weights": "random" if random else sha,
        "random_weights": random,
        "weights_source": weights_source,
        "command": _command(model, out, weights, random_weights, backends, settings),
        "settings": {
            "batch_sizes": list(settings.batch_sizes),
            "tiles": settings.tiles,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "seed": settings.seed,
            **METHOD,
        },
        "flops_per_tile": run.flops_per_tile,
        "matmul_peaks": run.peaks,
        "export": _export_section(run),
        "reference": {**run.reference_info, "tiles": run.reference_info.get("tiles", run.tiles_label)},
        "results": results,
    }
    report["targets"] = evaluate_targets(results, machine.device, run.variant.name)
    report["duration_s"] = time.perf_counter() - start
    report["load_average_end"] = load_average()
    report = _clean(report)
    plots = _plots(report, run, out)
    problems = validate_report(report)
    if problems:  # a bug in the benchmark, not the user's: say so loudly, still write what we have
        echo("warning: report schema problems: " + "; ".join(problems))
    write_report(out, report, plots)
    return report


def _plots(report: dict[str, Any], run: BenchmarkRun, out: Path) -> list[str]:
    from virchow_rt.benchmark import plots

    random = " (RANDOM WEIGHTS)" if report["random_weights"] else ""
    title = f"{report['variant']}{random} — {report['environment']['machine']}"
    paths = [plots.plot_throughput(report["results"], out / "throughput.png", title)]
    largest: dict[str, int] = {}
    for key, bs in run.cosines:
        largest[key] = max(bs, largest.get(key, 0))
    cosines = {f"{k}\nbatch {bs}": run.cosines[(k, bs)] for k, bs in largest.items()}
    tolerances = {
        f"{k}\nbatch {bs}": run.variant.tolerance.min_cosine("fp32" if k.endswith("/fp32") else "fp16")
        for k, bs in largest.items()
    }
    if cosines:
        paths.append(plots.plot_parity(cosines, tolerances, out / "parity.png", title))
    return [str(p) for p in paths]


def print_summary(report: dict[str, Any], out: Path, echo: Callable[[str], None] = print) -> None:
    """The lines a user reads at the end: best rows, missing rows, targets, where the files are."""
    echo("")
    echo(
        f"{report['variant']} on {report['environment']['machine']}"
        + (" — RANDOM WEIGHTS" if report["random_weights"] else "")
    )
    for r in report["results"]:
        if r["status"] != "ok":
            echo(f"  {r['backend'] + '/' + r['precision']:<32} {r['reason']}")
    echo("targets:")
    for line in target_lines(report["targets"], report["device"]):
        echo(f"  {line}")
    echo(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")


def run_cli(args: argparse.Namespace) -> int:
    """``virchow-rt bench``: run the benchmark from parsed arguments; returns the exit code (0: it ran)."""
    report = run_benchmark(
        args.model,
        args.out,
        weights=args.weights,
        random_weights=args.random_weights,
        backends=args.backends,
        batch_sizes=args.batch_sizes,
        tiles=args.tiles,
        repeats=args.repeats,
        warmup=args.warmup,
        machine_label=args.machine,
    )
    print_summary(report, Path(args.out))
    return 0


__all__ = [
    "REFERENCE_KEY",
    "LatencyRecorder",
    "Settings",
    "Stats",
    "percentile",
    "print_summary",
    "run_benchmark",
    "run_cli",
    "time_calls",
    "validate_report",
]
