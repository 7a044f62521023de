"""PNG plots of a benchmark (matplotlib, Agg: no display needed).

``throughput.png``: end-to-end tiles/s against batch size, one line per backend/precision.
``parity.png``: per-tile cosine distance to the fp32 reference (1 - cosine, log scale), one box per
backend/precision at its largest batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.benchmark.targets import CONTENDED_CPU_USE
from virchow_rt.files import atomic_path

#: smallest 1 - cosine drawn: float64 rounding of identical embeddings gives 0, which a log axis cannot show
COSINE_DISTANCE_FLOOR = 1e-12


def _shared(row: dict[str, Any]) -> bool:
    use = row.get("cpu_utilization")
    return row["device"] == "cpu" and use is not None and use < CONTENDED_CPU_USE


def _pyplot() -> Any:
    matplotlib = optional_import("matplotlib", "to draw the benchmark plots")
    matplotlib.use("Agg", force=True)
    return optional_import("matplotlib.pyplot", "to draw the benchmark plots")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_throughput(results: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """End-to-end tiles/s (median, with the min–max of the passes as error bars) against batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["status"] == "ok":
            series.setdefault(f"{r['backend']} {r['precision']}", []).append(r)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        y = np.array([r["tiles_per_s"] for r in rows])
        lo = np.array([r.get("tiles_per_s_min", r["tiles_per_s"]) for r in rows])
        hi = np.array([r.get("tiles_per_s_max", r["tiles_per_s"]) for r in rows])
        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=label)
        shared = [(b, v) for b, v, r in zip(x, y, rows, strict=True) if _shared(r)]
        if shared:  # ringed: other processes took cores from this point, it understates the machine
            ax.scatter(*zip(*shared, strict=True), s=160, facecolors="none", edgecolors="black", zorder=3)
    sizes = sorted({r["batch_size"] for rows in series.values() for r in rows})
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sizes, [str(b) for b in sizes])  # plain batch sizes, not powers of two
        ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("tiles/s, end to end (host uint8 -> host embeddings)")
    note = (
        "median of the timed passes; bars: fastest and slowest pass; rings: CPU shared with other processes"
    )
    ax.set_title(f"{title}\n{note}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_parity(
    cosines: Mapping[str, np.ndarray], tolerances: Mapping[str, float], path: str | Path, title: str
) -> Path:
    """Box plot of 1 - cosine per backend/precision (log scale) with each row's tolerance drawn as a tick."""
    plt = _pyplot()
    labels = list(cosines)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels) + 2), 4.5))
    data = [np.maximum(1.0 - np.asarray(cosines[k], dtype=np.float64), COSINE_DISTANCE_FLOOR) for k in labels]
    if data:
        ax.boxplot(data, whis=(0, 100), showfliers=False)
        for i, (k, d) in enumerate(zip(labels, data, strict=True), start=1):
            jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(d))
            ax.scatter(i + jitter, d, s=6, alpha=0.5)
            ax.hlines(1.0 - tolerances[k], i - 0.4, i + 0.4, colors="red", linestyles="dashed")
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"1 - cosine to the fp32 reference (floor {COSINE_DISTANCE_FLOOR:g})")
    ax.set_title(title + "\nred dashes: tolerance (must stay below)", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
