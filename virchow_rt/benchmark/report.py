"""The benchmark's outputs: ``report.json`` (schema below, written atomically) and ``report.md``.

``report.json``::

    {"schema_version": 1, "kind": "virchow-rt-benchmark", "environment": {machine, cpu, gpu, driver, cuda,
     versions, ...}, "variant", "weights": "random"|sha256, "random_weights", "command", "settings",
     "flops_per_tile", "matmul_peaks", "export", "reference", "results": [row, ...], "targets", "duration_s"}

A row: ``backend, precision, device, status ("ok" | "not available" | "not run" | "failed"), reason,
batch_size, tiles_per_s, compute_tiles_per_s, latency_ms {p50, p99, ...}, tflops, peak_fraction,
parity {min_cosine, mean_cosine, p01_cosine, max_abs, rel_l2, knn10_overlap, passed, ...}`` and more;
every measurement of a row whose status is not "ok" is null.

``rows.jsonl`` beside them: each row as soon as it is measured, one JSON line (the same row as in
``results``, before ordering), so a run stopped before its report keeps the rows it reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virchow_rt.benchmark.targets import CONTENDED_CPU_USE, target_lines
from virchow_rt.files import append_json_line, atomic_path, read_json_lines, salvage_json_lines, write_json

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ROWS_JSONL = "rows.jsonl"
TOP_KEYS = ("environment", "variant", "weights", "results", "settings", "command", "matmul_peaks", "targets")
ENV_KEYS = ("machine", "cpu", "gpu", "driver", "cuda", "versions")
ROW_KEYS = (
    "backend",
    "precision",
    "device",
    "status",
    "batch_size",
    "tiles_per_s",
    "compute_tiles_per_s",
    "latency_ms",
    "tflops",
    "peak_fraction",
    "parity",
)
PARITY_KEYS = ("min_cosine", "mean_cosine", "p01_cosine", "max_abs", "rel_l2", "knn10_overlap")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with ``report`` against the schema (empty when it is sound)."""
    problems = [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in report]
    env = report.get("environment", {})
    problems += [f"environment lacks {k!r}" for k in ENV_KEYS if k not in env]
    weights = report.get("weights")
    if not (weights == "random" or (isinstance(weights, str) and len(weights) == 64)):
        problems.append(f"weights must be 'random' or a sha256 hex, got {weights!r}")
    for i, row in enumerate(report.get("results", [])):
        where = f"results[{i}] ({row.get('backend')}/{row.get('precision')} batch {row.get('batch_size')})"
        problems += [f"{where} lacks {k!r}" for k in ROW_KEYS if k not in row]
        if row.get("status") != "ok":
            if not row.get("reason"):
                problems.append(f"{where} is {row.get('status')!r} without a reason")
            continue
        for k in ("tiles_per_s", "tflops"):
            if not (_finite(row.get(k)) and row[k] > 0):
                problems.append(f"{where}: {k} must be a finite positive number, got {row.get(k)!r}")
        latency = row.get("latency_ms") or {}
        for k in ("p50", "p99"):
            if not (_finite(latency.get(k)) and latency[k] > 0):
                problems.append(
                    f"{where}: latency_ms.{k} must be finite and positive, got {latency.get(k)!r}"
                )
        if row.get("compute_tiles_per_s") is None and not row.get("compute_reason"):
            problems.append(f"{where}: compute_tiles_per_s is null without a compute_reason")
        parity = row.get("parity")
        if parity is None:
            if not row.get("parity_reason"):
                problems.append(f"{where}: parity is null without a parity_reason")
            continue
        problems += [f"{where}: parity.{k} is not finite" for k in PARITY_KEYS if not _finite(parity.get(k))]
    return problems


# --- Markdown ------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    return "—" if x is None else f"{x * scale:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _cpu_use(row: dict[str, Any]) -> str:
    use = row.get("cpu_utilization")
    shared = row["device"] == "cpu" and use is not None and use < CONTENDED_CPU_USE
    return _fmt(use, ".0%") + (" (shared)" if shared else "")


def _throughput_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        if r["status"] != "ok":
            continue
        spread = (
            f"{_fmt(r['tiles_per_s'])} ({_fmt(r.get('tiles_per_s_min'))}–{_fmt(r.get('tiles_per_s_max'))})"
        )
        mem = r.get("peak_memory") or {}
        memory = _fmt(mem.get("host_peak_mb"), ".0f")
        if mem.get("gpu_peak_mb") is not None:
            memory += f" / GPU {mem['gpu_peak_mb']:.0f}"
        out.append(
            [
                f"`{r['backend']}`",
                r["precision"],
                r["device"],
                str(r["batch_size"]),
                spread,
                _fmt(r["compute_tiles_per_s"]),
                f"{_fmt(r['latency_ms']['p50'], '.1f')} / {_fmt(r['latency_ms']['p99'], '.1f')}"
                f" ({r['latency_ms'].get('n', '?')})",
                memory,
                _fmt(r["tflops"], ".3f"),
                _fmt(r["peak_fraction"], ".1%"),
                _cpu_use(r),
                f"{_fmt(r.get('setup_s'), '.2f')} / {_fmt(r.get('first_call_s'), '.2f')}",
            ]
        )
    return out


def _parity_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        if r["status"] != "ok":
            continue
        p = r.get("parity")
        if p is None:
            out.append(
                [f"`{r['backend']}`", r["precision"], str(r["batch_size"])] + ["—"] * 6 + [r["parity_reason"]]
            )
            continue
        verdict = ("PASS" if p["passed"] else "FAIL") + f" (≥ {p['tolerance']})"
        out.append(
            [
                f"`{r['backend']}`",
                r["precision"],
                str(r["batch_size"]),
                f"{p['min_cosine']:.7f}",
                f"{p['mean_cosine']:.7f}",
                f"{p['p01_cosine']:.7f}",
                f"{p['max_abs']:.3g}",
                f"{p['rel_l2']:.3g}",
                f"{p['knn10_overlap']:.3f}",
                verdict,
            ]
        )
    return out


def _load_text(report: dict[str, Any]) -> str:
    env = report["environment"]
    if not env.get("load_average"):
        return "unknown"
    text = " / ".join(f"{x:g}" for x in env["load_average"]) + " (1/5/15 min)"
    if report.get("load_average_end"):
        text += ", at the end " + " / ".join(f"{x:g}" for x in report["load_average_end"])
    return text


def _header(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    random = report["weights"] == "random"
    lines = [f"# virchow-rt benchmark: {report['variant']}" + (" (RANDOM WEIGHTS)" if random else ""), ""]
    if random:
        lines += [
            "> **RANDOM WEIGHTS.** The model was built with random weights (`--random-weights`):",
            "> throughput is representative of the architecture, the embeddings themselves mean nothing.",
            "> Parity compares each backend with the PyTorch fp32 reference on the *same* random weights.",
            "",
        ]
    cpu = env["cpu"]
    ident = ", ".join(
        f"{k} {cpu[key]}"
        for k, key in (("vendor", "vendor"), ("family", "family"), ("model", "model_id"))
        if cpu.get(key)
    )
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    gpu = f"{env['gpu']}, driver {env['driver']}, CUDA {env['cuda']}" if env["gpu"] else "none"
    return lines + [
        f"- **Machine:** {env['machine']}",
        f"- **CPU:** `{cpu['model']}` from /proc/cpuinfo ({ident}; {cpu['usable_cpus']} usable cores, "
        f"{_fmt(cpu.get('memory_gb'), '.0f')} GB RAM{', virtual machine' if cpu.get('hypervisor') else ''}; "
        f"flags: {', '.join(cpu['flags']) or 'none'})",
        f"- **Load average:** {_load_text(report)}; other processes on the same cores lower every figure",
        f"- **GPU:** {gpu}",
        f"- **Weights:** {'RANDOM' if random else report['weights']} ({report.get('weights_source', '')})",
        f"- **Reproduce:** `{report['command']}`",
        f"- **Date:** {env.get('date')}, commit {env.get('git_commit') or 'unknown'}, "
        f"took {report['duration_s']:.0f} s",
        f"- **Software:** Python {env['python']}, {versions}",
    ]


def _method(report: dict[str, Any]) -> list[str]:
    settings = report["settings"]
    lines = [
        "## How it was measured",
        "",
        f"- Tiles: {settings['tiles']} per timed pass (rounded up to whole batches), real tissue from "
        f"`{settings['tile_source']}`; batch sizes {', '.join(map(str, settings['batch_sizes']))}; "
        f"{settings['warmup']} warm-up batch(es) (the first call timed apart: compilation and engine builds "
        f"happen there), then {settings['repeats']} timed passes per row.",
        f"- End to end: {settings['path']}. tiles/s is the median pass (slowest–fastest pass in brackets).",
        "- Latency: per batch, from the moment the backend takes the batch to the moment its embeddings are "
        "back on the host; p50 / p99 over every batch of every timed pass.",
        f"- Compute-only: {settings['compute_only']}.",
        "- CPU use: CPU time of this process during the timed passes over (wall time x usable cores); "
        f"a CPU row below {CONTENDED_CPU_USE:.0%} is marked (shared): other processes took cores from it, "
        "so its figures understate the machine.",
        f"- FLOPs per tile: {report['flops_per_tile'] / 1e9:.2f} GFLOP (from the variant's shapes). "
        "TFLOP/s = FLOPs per tile x tiles/s; % peak = that over the matmul peak measured in this run:",
    ]
    for key, peak in report["matmul_peaks"].items():
        libs = ", ".join(f"{k} {v['tflops']:.3f} at {v['size']}²" for k, v in peak["by_library"].items())
        lines.append(f"  - `{key}`: {_fmt(peak['tflops'], '.3f')} TFLOP/s, best of: {libs or peak['reason']}")
    return lines + [f"- Peak memory: {settings['memory']}."]


def _missing(results: list[dict[str, Any]]) -> list[str]:
    lines, seen = [], set()
    for r in results:
        if r["status"] == "ok":
            continue
        label = f"`{r['backend']}/{r['precision']}`" + (
            f" batch {r['batch_size']}" if r["batch_size"] else ""
        )
        if label not in seen:
            seen.add(label)
            lines.append(f"- {label}: {r['reason']}")
    return ["", "## Rows without measurements", "", *lines] if lines else []


def _export(report: dict[str, Any]) -> list[str]:
    export = report.get("export") or {}
    lines = []
    if export.get("artifacts"):
        took = export.get("export_s")
        timing = (
            "an existing export" if took is None else f"the export and its own parity check took {took:.1f} s"
        )
        lines += [
            "",
            "## Export / build",
            "",
            f"{export['source']}; {timing}.",
            "",
        ]
        rows = [
            [
                f"`{a['path']}`",
                a.get("format") or "?",
                a.get("precision") or "?",
                _fmt(a.get("size_bytes"), ".1f", 1e-6, " MB"),
                ", ".join(f"{k} {v:.1f} s" for k, v in (a.get("seconds") or {}).items()) or "—",
                a.get("parity") or "—",
            ]
            for a in export["artifacts"]
        ]
        lines += _table(["artifact", "format", "precision", "size", "time", "export's parity check"], rows)
    build_s = report.get("reference", {}).get("build_s")
    if build_s is not None:
        lines += ["", f"PyTorch reference model build (weights loaded or drawn): {build_s:.1f} s."]
    return lines


def render_markdown(report: dict[str, Any], plots: list[str] | None = None) -> str:
    """The report a person reads: machine, command, tables, rows not run and why, targets, plots."""
    lines = [*_header(report), "", *_method(report), "", "## Throughput", ""]
    header = ["backend", "precision", "device", "batch", "tiles/s (min–max)", "compute-only tiles/s"]
    header += [
        "latency p50 / p99 ms (batches)",
        "peak RSS MB",
        "TFLOP/s",
        "% peak",
        "CPU use",
        "open / 1st call s",
    ]
    lines += _table(header, _throughput_rows(report["results"]))
    ref = report["reference"]
    lines += [
        "",
        f"## Parity against `{ref['key']}` at batch {ref.get('batch_size', '?')} ({ref['tiles']})",
        "",
    ]
    header = ["backend", "precision", "batch", "min cos", "mean cos", "p01 cos", "max abs", "rel L2", "10-NN"]
    lines += _table([*header, "parity"], _parity_rows(report["results"]))
    lines += _missing(report["results"])
    device = report.get("device") or ("cuda" if report["environment"].get("gpu") else "cpu")
    lines += ["", "## Targets", ""] + [f"- {line}" for line in target_lines(report["targets"], device)]
    lines += _export(report)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path, report: dict[str, Any], plots: list[str] | None = None
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / REPORT_JSON, out_dir / REPORT_MD
    write_json(json_path, report)
    with atomic_path(md_path) as tmp:
        tmp.write_text(render_markdown(report, plots))
    return json_path, md_path


def start_rows(out_dir: str | Path) -> Path:
    """``out_dir/rows.jsonl`` emptied for this run's rows (a previous run's are not this run's).

    A previous run's ``report.json`` beside it stays until this run writes its own at the end (a run that
    fails or is stopped before then leaves it: its ``command`` and ``environment`` say which run it was).
    """
    path = Path(out_dir) / ROWS_JSONL
    path.write_text("")
    return path


class RowLog:
    """Keeps each measured row in ``out_dir/rows.jsonl`` as it is measured (a stopped run keeps them).

    The file is a convenience beside the report: when it cannot be written (a full disk, a read-only
    folder) ``warn`` is told once, in one line, no later row is appended (the file keeps the rows before,
    in order) and the run goes on to write its report.
    """

    def __init__(self, out_dir: str | Path, warn: Callable[[str], None]) -> None:
        self.path, self.warn, self.failed = Path(out_dir) / ROWS_JSONL, warn, False
        self._try(start_rows, out_dir)

    def __call__(self, row: dict[str, Any]) -> None:
        if not self.failed:
            self._try(append_row, self.path.parent, row)

    def _try(self, write: Callable[..., Any], *args: Any) -> None:
        try:
            write(*args)
        except OSError as err:
            self.failed = True
            self.warn(
                f"warning: cannot write {self.path} ({err}); measuring on, the rows go to the report only"
            )


def append_row(out_dir: str | Path, row: dict[str, Any]) -> None:
    """One measured row (JSON-safe) appended to ``out_dir/rows.jsonl``."""
    append_json_line(Path(out_dir) / ROWS_JSONL, row)


def _is_row(row: Any) -> bool:
    return isinstance(row, dict) and {"backend", "precision", "status"} <= set(row)


def read_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows ``out_dir/rows.jsonl`` holds, in the order they were measured (none without the file)."""
    rows = read_json_lines(Path(out_dir) / ROWS_JSONL)
    bad = [r for r in rows if not _is_row(r)]
    if bad:
        where = Path(out_dir) / ROWS_JSONL
        raise ValueError(f"{where}: {len(bad)} lines are not benchmark rows, such as {bad[0]!r:.200}")
    return rows


def salvage_rows(out_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows ``out_dir/rows.jsonl`` holds so far, and how many damaged lines (or non-rows) were skipped."""
    found, bad = salvage_json_lines(Path(out_dir) / ROWS_JSONL)
    rows = [r for r in found if _is_row(r)]
    return rows, len(bad) + len(found) - len(rows)
