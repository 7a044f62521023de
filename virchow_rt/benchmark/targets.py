"""Performance targets from the benchmark issue, as data, checked against a run's rows.

A target applies to one kind of machine (CPU-only or GPU) and was set for one variant; on other
machines it is reported as not applicable, never guessed. "Best path" everywhere means the fastest
end-to-end row (any batch size) whose parity passed: a fast wrong answer does not count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from virchow_rt.benchmark.rows import REFERENCE_KEY

Rows = Sequence[dict[str, Any]]
#: below this share of the usable cores, a CPU row shared them with other processes (flagged, never hidden)
CONTENDED_CPU_USE = 0.85
Measure = Callable[[Rows], tuple[float | None, str]]
TORCH_CUDA = "torch-cuda"  # the torch-cuda rows (plain and compiled): backends whose name starts with it


def _key(row: dict[str, Any]) -> str:
    return f"{row['backend']}/{row['precision']}"


def _ok(rows: Rows) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and r.get("tiles_per_s") is not None]


def _passed(row: dict[str, Any]) -> bool:
    return bool(row.get("parity") and row["parity"].get("passed"))


def _fastest(
    rows: Rows, keys: set[str] | None = None, exclude: set[str] | None = None
) -> dict[str, Any] | None:
    pool = [r for r in _ok(rows) if (keys is None or _key(r) in keys) and _key(r) not in (exclude or set())]
    return max(pool, key=lambda r: r["tiles_per_s"], default=None)


def _best_path(rows: Rows, exclude: set[str] | None = None, family: str = "") -> dict[str, Any] | None:
    """The fastest row with parity passed, of the backends whose name starts with ``family`` ("": all)."""
    return _fastest([r for r in rows if _passed(r) and r["backend"].startswith(family)], exclude=exclude)


def _describe(row: dict[str, Any]) -> str:
    use = row.get("cpu_utilization")
    shared = row.get("device") == "cpu" and use is not None and use < CONTENDED_CPU_USE
    flag = f" (shared CPU: {use:.0%} of the cores)" if shared else ""
    return f"{_key(row)} at batch {row['batch_size']}: {row['tiles_per_s']:.3g} tiles/s{flag}"


def _none_passed(family: str) -> str:
    return f"no {family} row with parity passed" if family else "no row with parity passed"


def _speedup_over(baseline_key: str, family: str = "") -> Measure:
    def measure(rows: Rows) -> tuple[float | None, str]:
        base = _fastest(rows, keys={baseline_key})
        best = _best_path(rows, exclude={baseline_key}, family=family)
        if base is None or best is None:
            missing = baseline_key if base is None else f"a {family or 'faster'} path with parity passed"
            return None, f"no measured row for {missing}"
        return best["tiles_per_s"] / base["tiles_per_s"], f"{_describe(best)} vs {_describe(base)}"

    return measure


def _peak_fraction(family: str = "") -> Measure:
    def measure(rows: Rows) -> tuple[float | None, str]:
        best = _best_path(rows, family=family)
        if best is None:
            return None, _none_passed(family)
        value = best.get("compute_peak_fraction") or best.get("peak_fraction")
        which = "compute-only" if best.get("compute_peak_fraction") else "end-to-end"
        if value is None:
            return None, f"{_describe(best)}: no matmul peak measured"
        return value, f"{_describe(best)}, {which} vs the {best.get('peak')} matmul peak"

    return measure


def _e2e_vs_compute(family: str = "") -> Measure:
    def measure(rows: Rows) -> tuple[float | None, str]:
        best = _best_path(rows, family=family)
        if best is None:
            return None, _none_passed(family)
        if not best.get("compute_tiles_per_s"):
            return None, f"{_describe(best)}: no compute-only figure ({best.get('compute_reason')})"
        return best["tiles_per_s"] / best["compute_tiles_per_s"], (
            f"{_describe(best)} end to end vs {best['compute_tiles_per_s']:.3g} tiles/s compute-only"
        )

    return measure


def _throughput(family: str) -> Measure:
    def measure(rows: Rows) -> tuple[float | None, str]:
        best = _best_path(rows, family=family)
        if best is None:
            return None, _none_passed(family)
        return best["tiles_per_s"], f"{_describe(best)}, end to end from uint8 host tiles"

    return measure


#: PyTorch's best CPU paths: a comparison with "the best PyTorch path" needs one of them measured, unless
#: this CPU cannot run them (no bf16 units): then eager fp32 is the best PyTorch can do here
BEST_TORCH_CPU = frozenset({"torch-eager/bf16-autocast", "torch-compile/bf16-autocast"})


def _int8_over_pytorch(rows: Rows) -> tuple[float | None, str]:
    int8 = _fastest([r for r in rows if _passed(r) and r["precision"] == "int8"])
    torch_rows = [r for r in rows if _passed(r) and r["backend"].startswith("torch-")]
    best_torch = _fastest(torch_rows)
    if int8 is None or best_torch is None:
        missing = "an int8 row" if int8 is None else "a PyTorch row"
        return None, f"no measured {missing} with parity passed"
    best_measured = BEST_TORCH_CPU & {_key(r) for r in _ok(torch_rows)}
    cannot_run = any(_key(r) in BEST_TORCH_CPU and r.get("status") == "not available" for r in rows)
    if not best_measured and not cannot_run:
        measured = ", ".join(sorted({_key(r) for r in _ok(torch_rows)}))
        return None, (
            f"only {measured} measured, not PyTorch's best CPU path; add --backends "
            + ",".join(sorted(BEST_TORCH_CPU))
        )
    return int8["tiles_per_s"] / best_torch["tiles_per_s"], f"{_describe(int8)} vs {_describe(best_torch)}"


def _fp16_parity(rows: Rows) -> tuple[float | None, str]:
    pool = [r for r in _ok(rows) if r["precision"] not in ("fp32", "int8") and r.get("parity")]
    if not pool:
        return None, "no reduced-precision row with parity"
    worst = min(pool, key=lambda r: r["parity"]["min_cosine"])
    return worst["parity"]["min_cosine"], f"worst: {_key(worst)} at batch {worst['batch_size']}"


@dataclass(frozen=True)
class Target:
    """One goal: ``measure(rows)`` gives (value, detail); met when value >= ``threshold``."""

    name: str
    device: str  # "cpu" (CPU-only machine) or "cuda" (GPU machine)
    set_for: str  # variant the goal was set for
    threshold: float
    unit: str
    measure: Measure

    def evaluate(self, rows: Rows, device: str, variant: str) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.name,
            "device": self.device,
            "set_for": self.set_for,
            "threshold": self.threshold,
            "unit": self.unit,
        }
        if device != self.device:
            return {
                **result,
                "value": None,
                "met": None,
                "detail": f"not applicable on a {device.upper()} run",
            }
        value, detail = self.measure(rows)
        if variant != self.set_for:
            detail += f" (target set for {self.set_for}, this run is {variant})"
        return {
            **result,
            "value": value,
            "met": None if value is None else bool(value >= self.threshold),
            "detail": detail,
        }


TARGETS: tuple[Target, ...] = (
    Target(
        "best CPU path vs PyTorch eager fp32, end to end",
        "cpu",
        "virchow2g-mini",
        1.3,
        "x",
        _speedup_over(REFERENCE_KEY),
    ),
    Target(
        "int8 vs the best PyTorch path (eager fp32, bf16 autocast, compiled bf16), end to end",
        "cpu",
        "virchow2g-mini",
        1.3,
        "x",
        _int8_over_pytorch,
    ),
    Target(
        "best path vs PyTorch fp16 autocast eager",
        "cuda",
        "virchow2",
        2.0,
        "x",
        _speedup_over("torch-eager/fp16-autocast"),
    ),
    Target("fraction of the measured matmul peak", "cuda", "virchow2", 0.60, "fraction", _peak_fraction()),
    Target("end to end vs compute-only", "cuda", "virchow2", 0.90, "fraction", _e2e_vs_compute()),
    Target("fp16 parity, min cosine", "cuda", "virchow2", 0.999, "cosine", _fp16_parity),
    # the CUDA pipeline with torch's kernels (the GPU-truth issue): what a GPU here can prove without TensorRT
    Target(
        "torch-cuda pipeline vs TRIDENT-style fp16 autocast, end to end",
        "cuda",
        "virchow2",
        2.0,
        "x",
        _speedup_over("torch-eager/fp16-autocast", family="torch-cuda"),
    ),
    Target(
        "torch-cuda end to end vs its compute-only",
        "cuda",
        "virchow2",
        0.90,
        "fraction",
        _e2e_vs_compute(TORCH_CUDA),
    ),
    Target(
        "torch-cuda fraction of the measured matmul peak",
        "cuda",
        "virchow2",
        0.60,
        "fraction",
        _peak_fraction(TORCH_CUDA),
    ),
    Target(
        "torch-cuda tiles/s end to end", "cuda", "virchow2g-mini", 10_000, "tiles/s", _throughput(TORCH_CUDA)
    ),
)


def evaluate_targets(rows: Rows, device: str, variant: str) -> list[dict[str, Any]]:
    """Every target's verdict for this run (``met`` None when not applicable or not measurable)."""
    return [t.evaluate(rows, device, variant) for t in TARGETS]


def _show(value: float, unit: str) -> str:
    if unit == "cosine":
        return f"{value:.6f}"
    if unit == "fraction":
        return f"{value:.1%}"
    if unit == "tiles/s":
        return f"{value:,.0f} tiles/s"
    return f"{value:.3g}x"


def format_target(result: dict[str, Any]) -> str:
    """One printable line: name, measured value vs threshold, met / not met."""
    value, unit = result["value"], result["unit"]
    if result["met"] is None:
        verdict = "n/a" if value is None and "not applicable" in result["detail"] else "NOT MEASURED"
    else:
        verdict = "MET" if result["met"] else "NOT MET"
    shown = "—" if value is None else _show(value, unit)
    goal = f">= {_show(result['threshold'], unit)}"
    where = f"{result['device'].upper()}, set for {result['set_for']}"
    return f"[{verdict}] {result['name']} ({where}): {shown} (goal {goal}) — {result['detail']}"


def target_lines(targets: Sequence[dict[str, Any]], device: str) -> list[str]:
    """The verdict of every target for this kind of machine, then one line counting the other kind's
    (a CPU run lists no GPU goal as "[n/a]" one by one)."""
    lines = [format_target(t) for t in targets if t["device"] == device]
    others = [t for t in targets if t["device"] != device]
    if others:
        kind = others[0]["device"].upper()
        lines.append(f"({len(others)} {kind} targets apply to another kind of machine)")
    return lines
