"""What the GPU check keeps of its steps, and ``gpu_check.md``: test outcomes, bench rows, copy hiding.

Plain Python (no numpy, no torch) so that ``bench/gpu_check.py`` can always write its results, whatever
failed to import. The bench summaries import virchow-rt's plain modules (targets, registry) lazily.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

#: pytest -v's outcome words -> the outcome the check records
_OUTCOMES = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
             "XFAIL": "xfailed", "XPASS": "xpassed"}  # fmt: skip
# `tests/a.py::test_b[x y] PASSED (reason) [ 12%]`, as `pytest -v` prints it when a test ends; a test
# still running (or whose process died) shows as its id alone
_VERBOSE = re.compile(
    r"^(?P<test>tests/\S*?\.py::\S.*?)"  # the test's id
    r"(?: (?P<word>[A-Z]+)(?: \((?P<reason>.*)\))?)?"  # its outcome, and a skip's reason
    r"(?:\s+\[\s*\d+%\])?\s*$"  # progress
)


# --- test outcomes ---------------------------------------------------------------------------------
def junit_outcomes(xml_path: Path) -> list[dict[str, Any]] | None:
    """Every test case of a pytest JUnit XML file (id, outcome, message); None when there is no such file.

    pytest writes the file only when it ends by itself (or on SIGINT): after a SIGKILL or a crash there
    is none, and the log is read instead (:func:`log_outcomes`).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                text = (found.get("message") or found.text or "").strip()
                message = text.splitlines()[0][:300] if text else None
                break
        module = case.get("classname", "").replace(".", "/")
        cases.append({"test": f"{module}.py::{case.get('name')}", "outcome": outcome, "message": message})
    return cases


def log_outcomes(text: str) -> list[dict[str, Any]]:
    """Every test ``pytest -v`` started in ``text``, with its outcome ("unfinished": it never ended).

    A test reported twice (passed, then an error in its teardown) keeps the worse outcome.
    """
    found: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        match = _VERBOSE.match(line)
        if not match:
            continue
        test, word = match["test"], match["word"]
        outcome = _OUTCOMES.get(word or "")
        if outcome is None:
            if word is not None:  # some other capitalised word: not a result line
                continue
            found.setdefault(test, {"test": test, "outcome": "unfinished", "message": None})
            continue
        known = found.get(test)
        if known and known["outcome"] in ("failed", "error") and outcome != "error":
            continue
        found[test] = {"test": test, "outcome": outcome, "message": match["reason"]}
    return list(found.values())


def read_test_outcomes(xml_path: Path, log_path: Path) -> dict[str, Any]:
    """The tests' outcomes from the JUnit XML when pytest wrote one, else from its ``-v`` log."""
    cases = junit_outcomes(xml_path)
    source = "junit"
    if cases is None:
        source = "log"
        cases = log_outcomes(log_path.read_text(errors="replace")) if log_path.exists() else []
    return {"source": source, "counts": dict(Counter(c["outcome"] for c in cases)), "tests": cases}


# --- benchmark summaries ---------------------------------------------------------------------------
def summarize_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the check's summary keeps of each benchmark row."""
    rows = []
    for r in results:
        parity = r.get("parity") or {}
        rows.append({
            "key": f"{r['backend']}/{r['precision']}", "status": r["status"],
            "batch_size": r.get("batch_size"),
            "tiles_per_s": r.get("tiles_per_s"), "compute_tiles_per_s": r.get("compute_tiles_per_s"),
            "peak_fraction": r.get("peak_fraction"), "compute_peak_fraction": r.get("compute_peak_fraction"),
            "min_cosine": parity.get("min_cosine"), "parity_passed": parity.get("passed"),
            "cuda_graphs": r.get("cuda_graphs"), "reason": r.get("reason"),
        })  # fmt: skip
    return rows


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """The rows and targets of a benchmark report, as the check's summary keeps them."""
    from virchow_rt.benchmark.targets import format_target

    targets = [t for t in report.get("targets", []) if t["device"] == "cuda"]
    return {
        "variant": report["variant"],
        "random_weights": report["random_weights"],
        "complete": True,
        "matmul_peaks": {k: v.get("tflops") for k, v in (report.get("matmul_peaks") or {}).items()},
        "rows": summarize_rows(report["results"]),
        "targets": [{**t, "line": format_target(t)} for t in targets],
    }


def bench_so_far(variant: str, folder: Path) -> dict[str, Any] | None:
    """The rows ``virchow-rt bench --random-weights --out folder`` has measured so far (its ``rows.jsonl``),
    summarized as a report's are, without targets (they need every row); None: no row yet. Damaged lines
    are skipped and counted (``skipped_lines``), never the reason to lose the rows around them."""
    from virchow_rt.benchmark.report import salvage_rows

    rows, skipped = salvage_rows(folder)
    if not rows:
        return None
    measured = f"{len(rows)} row" + ("s" if len(rows) != 1 else "")
    return {"variant": variant, "random_weights": True, "complete": False, "measured": [measured],
            "skipped_lines": skipped, "matmul_peaks": {}, "rows": summarize_rows(rows),
            "targets": []}  # fmt: skip


#: the measurements of bench/slides_throughput.py, in the order it takes them
SLIDES_PARTS = ("reader", "reader_scaling", "model", "end_to_end")


def slides_so_far(parts: Path) -> dict[str, Any] | None:
    """The report bench/slides_throughput.py has so far: its ``--parts`` lines merged (damaged lines
    skipped and counted in ``skipped_lines``); None: no line."""
    from virchow_rt.files import salvage_json_lines

    lines, bad = salvage_json_lines(parts)
    if not lines:
        return None
    report: dict[str, Any] = {"complete": False}
    for part in lines:
        if isinstance(part, dict):
            report.update(part)
    report["measured"] = [k for k in SLIDES_PARTS if report.get(k)]
    report["skipped_lines"] = len(bad) + sum(not isinstance(part, dict) for part in lines)
    return report


def measured_words(found: Any) -> str:
    """What a step's results so far hold, in words ("2 rows", "reader, model"; "nothing measured")."""
    measured = found.get("measured") if isinstance(found, dict) else None
    return ", ".join(measured) if measured else "nothing measured"


def kept_words(found: Any) -> str:
    """How a failed or stopped step's reason ends: what it kept of what it measured."""
    words = measured_words(found)
    return words if words == "nothing measured" else f"kept what it measured: {words}"


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


def hiding(benches: dict[str, Any], rates: dict[str, Any] | None) -> dict[str, Any]:
    """Copy hiding of the torch-cuda pipeline at its fastest batch, per benchmarked variant."""
    from virchow_rt.registry import get_variant

    if rates is None:
        raise RuntimeError("no bandwidth was measured")
    found = {}
    for variant, summary in benches.items():
        rows = [
            r
            for r in (summary or {}).get("rows", [])
            if r["key"] == "torch-cuda/fp16" and r["status"] == "ok" and r["compute_tiles_per_s"]
        ]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["tiles_per_s"])
        v = get_variant(variant)
        tile, emb = v.preprocess.size**2 * 3, v.embedding_dim() * 4
        found[variant] = copy_hiding(best, tile, emb, rates["pinned_h2d_gb_s"], rates["pinned_d2h_gb_s"])
    if not found:
        raise RuntimeError("no torch-cuda row with a compute-only figure was measured")
    return found


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path``, replacing it whole (a kill never leaves half a file)."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    os.replace(part, path)


# --- the summary a person reads --------------------------------------------------------------------
def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _graphs(row: dict[str, Any]) -> str:
    used = row.get("cuda_graphs")
    if not used:
        return ""
    return f" (graphs: {used.get('replayed', 0)} replayed, {used.get('eager', 0)} eager)"


def render_markdown(result: dict[str, Any]) -> str:
    """``gpu_check.md``: machine, steps, tests, benchmark rows and targets, copies, resize, slides."""
    steps = result["steps"]
    env = result.get("environment") or {}
    state = "finished" if result.get("finished") else f"NOT FINISHED (running: {result.get('running')})"
    lines = [
        "# virchow-rt GPU check" + (" (DRY RUN: tiny configs, CPU)" if result["dry_run"] else ""),
        "",
        f"Machine: **{result.get('machine')}**; driver {env.get('driver')}, CUDA {env.get('cuda')}; "
        f"{result['duration_s']} s of a {result.get('budget_s')} s budget, {state}. "
        "**RANDOM WEIGHTS** everywhere: throughput is real, embeddings are not.",
        "",
        "| step | status | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {s['status']} | {s['seconds']} | {s['reason'] or ''} |" for name, s in steps.items()
    ]
    tests = (steps.get("tests") or {}).get("result")
    if tests:
        lines += ["", f'## Tests (`pytest -m "gpu or tensorrt"`, from the {tests.get("source", "junit")}): '
                  f'{tests["counts"]}', ""]  # fmt: skip
        for c in tests["tests"]:
            note = f": {c['message']}" if c["message"] and c["outcome"] != "passed" else ""
            lines.append(f"- {c['outcome'].upper()} `{c['test']}`{note}")
    # what each step found; the running step's results so far too (a check killed mid-step keeps them)
    found = {name: s["result"] for name, s in steps.items() if s["result"]}
    if result.get("running") and result.get("running_so_far"):
        found[result["running"]] = result["running_so_far"]

    def title(name: str) -> str:
        partial = found[name].get("complete") is False if isinstance(found[name], dict) else False
        return f"## {name}" + (f" (not finished: {measured_words(found[name])})" if partial else "")

    for name, bench in found.items():
        if not name.startswith("bench "):
            continue
        header = "| row | batch | tiles/s end to end | compute-only | peak | min cosine |"
        lines += ["", title(name), "", header,
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in bench["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['key']} | {r['batch_size'] or ''} | {r['status']}: {r['reason']} | | | |")
                continue
            peak = r["compute_peak_fraction"] or r["peak_fraction"]
            rates = f"{_num(r['tiles_per_s'])} | {_num(r['compute_tiles_per_s'])}"
            lines.append(
                f"| {r['key']}{_graphs(r)} | {r['batch_size']} | {rates} | {_num(peak, '{:.1%}')} "
                f"| {_num(r['min_cosine'], '{:.6f}')} |"
            )
        lines += ["", *[f"- {t['line']}" for t in bench["targets"]]]
    for name in ("bandwidth", "copy hiding", "resize kernel", "slides"):
        if found.get(name):
            lines += ["", title(name), "", "```json",
                      json.dumps(found[name], indent=1, default=str)[:3000], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"
