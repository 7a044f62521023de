"""One benchmark run: export the model when needed, then time and check every row.

For each available backend/precision row and each batch size: warm-up batches (the first one timed
apart: it holds compilation / engine build; then at least one per pipeline slot), then timed passes of
the same real-tissue tiles through the Embedder, end to end (uint8 tiles on the host -> embeddings on
the host). The embeddings of the last pass are compared with the fp32 PyTorch reference's on the same
tiles. The torch-cuda rows open their backend per batch size, so that each replays CUDA graphs (full
batches only), and record how many timed batches did (``cuda_graphs``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.benchmark import roofline
from virchow_rt.benchmark.backends import TimedBackend, compute_only, graph_use, open_row_backend
from virchow_rt.benchmark.memory import PeakMemory
from virchow_rt.benchmark.rows import REFERENCE_KEY, Machine, RowSpec, row_stub
from virchow_rt.benchmark.source import Settings, Source
from virchow_rt.benchmark.timing import Stats, split_batches, time_calls
from virchow_rt.compare import compare, cosine_rows
from virchow_rt.errors import ParityError
from virchow_rt.tissue import tissue_tiles

Echo = Callable[[str], None]
EXPORT_PARITY_TILES = 16


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class BenchmarkRun:
    """State of one run; :meth:`measure_rows` fills :attr:`results` (report rows) and :attr:`cosines`."""

    def __init__(
        self,
        source: Source,
        settings: Settings,
        machine: Machine,
        echo: Echo,
        progress: bool,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.source = source
        self.on_row = on_row  # told each row as it is measured (rows.jsonl: a stopped run keeps them)
        self.settings = settings
        self.machine = machine
        self.echo = echo
        self.progress = progress
        self.variant = source.variant
        self.flops_per_tile = self.variant.flops_per_tile()
        self.results: list[dict[str, Any]] = []
        self.cosines: dict[tuple[str, int], np.ndarray] = {}
        self.reference: np.ndarray | None = None
        self.reference_info: dict[str, Any] = {"key": REFERENCE_KEY}
        self.peaks: dict[str, dict[str, Any]] = {}
        self.torch_model: Any = None
        self.weights_info: Any = None
        self.export_failure: str | None = None
        n_max = max(settings.tiles_for(b) for b in settings.batch_sizes)
        size = self.variant.preprocess.size
        self.tiles = tissue_tiles(n_max, size, seed=settings.seed)
        call = f"virchow_rt.tissue.tissue_tiles({n_max}, {size}, seed={settings.seed})"
        self.tiles_label = f"{n_max} real-tissue tiles: {call}"

    # -- preparation --
    def export(self, specs: Sequence[RowSpec], out: Path, weights: str | None, random_weights: bool) -> Path:
        """Export the variant for the artifact rows into a scratch folder under ``out``; returns it."""
        from virchow_rt.export.pipeline import export_model

        precisions = sorted({s.artifact for s in specs if s.artifact}, key=("fp32", "fp16", "int8").index)
        tensorrt = any(s.kind == "tensorrt" for s in specs)
        folder = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
        self.echo(
            f"exporting {self.variant.name} ({', '.join(precisions)}{', TensorRT' if tensorrt else ''}) ..."
        )
        start = time.perf_counter()
        # the export checks its own parity (on 16 tiles here: the bench measures every row's anyway)
        kwargs = dict(
            weights=weights,
            random_weights=random_weights,
            max_batch=max(self.settings.batch_sizes),
            parity_tiles=EXPORT_PARITY_TILES,
        )
        try:
            manifest = export_model(
                self.variant.name, folder, precisions=precisions, tensorrt=tensorrt, **kwargs
            )
        except ParityError as err:
            if precisions == ["fp32"]:
                raise
            # keep benchmarking what did pass: the fp16 rows are reported as failed with the export's verdict
            self.echo(f"warning: {err}; benchmarking the fp32 export only")
            self.export_failure = str(err)
            manifest = export_model(self.variant.name, folder, precisions=["fp32"], **kwargs)
        self.source.export_s = time.perf_counter() - start
        self.source.folder, self.source.manifest, self.source.exported_here = folder, manifest, True
        return folder

    def build_reference(self, weights: str | None, random_weights: bool) -> None:
        from virchow_rt.model.vit import build_model

        start = time.perf_counter()
        self.torch_model, self.variant, self.weights_info = build_model(self.variant, weights, random_weights)
        self.reference_info["build_s"] = time.perf_counter() - start

    def measure_peaks(self, specs: Sequence[RowSpec]) -> None:
        keys = {roofline.peak_key(s.resolve_device(self.machine.has_cuda), s.precision) for s in specs}
        self.echo(f"measuring the matmul peak ({', '.join(sorted(keys))}) ...")
        self.peaks = roofline.measure_peaks(keys)

    # -- rows --
    def measure_rows(self, specs: Sequence[RowSpec]) -> None:
        from virchow_rt._deps import optional_import

        tqdm = optional_import("tqdm", "to show benchmark progress").tqdm
        total = len(specs) * len(self.settings.batch_sizes)
        with tqdm(total=total, disable=not self.progress, unit="row", desc="bench") as bar:
            for spec in specs:
                self._measure_spec(spec, bar)

    def _add(self, row: dict[str, Any]) -> None:
        self.results.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def _log(self, bar: Any, text: str) -> None:
        if self.progress:
            bar.write(text)
        else:
            self.echo(text)

    def _measure_spec(self, spec: RowSpec, bar: Any) -> None:
        device = spec.resolve_device(self.machine.has_cuda)
        sizes = list(self.settings.batch_sizes)
        if spec.key == REFERENCE_KEY:
            # the pass with the most tiles first: its embeddings are the reference for every row
            sizes.sort(key=lambda b: -self.settings.tiles_for(b))
        if self.export_failure and spec.artifact == "fp16":
            self._give_up(
                spec, device, f"export refused the fp16 graph: {self.export_failure}", bar, len(sizes)
            )
            return
        # the torch-cuda pipeline replays CUDA graphs for full batches only (max_batch rows): opened per
        # batch size, every one of its rows runs graphs, as its label says
        groups = [[b] for b in sizes] if spec.kind == "torch-cuda" else [sizes]
        for i, group in enumerate(groups):
            if not self._measure_group(spec, device, group, bar):
                bar.update(sum(len(g) for g in groups[i + 1 :]))  # what kept it from opening holds for all
                return

    def _measure_group(self, spec: RowSpec, device: str, sizes: list[int], bar: Any) -> bool:
        """Open the row's backend for ``sizes`` (its max batch: the largest) and measure each; False when
        it could not be opened (recorded)."""
        bar.set_postfix_str(spec.key)
        try:
            start = time.perf_counter()
            backend = open_row_backend(
                spec,
                device,
                variant=self.variant,
                torch_model=self.torch_model,
                weights_info=self.weights_info,
                folder=self.source.folder,
                max_batch=max(sizes),
                workers=usable_cores() if device == "cuda" else 0,
            )
            setup_s = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - one broken backend must not stop the others; recorded
            self._give_up(spec, device, f"could not open: {type(err).__name__}: {err}", bar, len(sizes))
            return False
        if spec.kind == "onnx" and backend.name != spec.backend:
            # ONNX Runtime falls back to a lesser provider silently; its figures would wear the wrong label
            backend.close()
            reason = f"ONNX Runtime put the session on {backend.name}, not {spec.backend} (provider failed)"
            self._give_up(spec, device, reason, bar, len(sizes))
            return False
        with backend:
            for batch_size in sizes:
                bar.set_postfix_str(f"{spec.key} batch {batch_size}")
                row = self._measure_one(spec, backend, device, batch_size, setup_s)
                self._add(row)
                self._log(bar, _summary_line(row))
                bar.update()
        return True

    def _give_up(self, spec: RowSpec, device: str, reason: str, bar: Any, rows: int) -> None:
        self._add(row_stub(spec, "failed", reason, device))
        self._log(bar, f"{spec.key}: FAILED: {reason}")
        bar.update(rows)

    def _measure_one(
        self, spec: RowSpec, backend: Backend, device: str, batch_size: int, setup_s: float
    ) -> dict:
        if backend.max_batch is not None and batch_size > backend.max_batch:
            reason = (
                f"batch size {batch_size} is above this backend's max batch {backend.max_batch} "
                "(re-export with --max-batch)"
            )
            return {
                **row_stub(spec, "not available", f"not available with this export: {reason}", device),
                "batch_size": batch_size,
            }
        try:
            return self._time_row(spec, backend, device, batch_size, setup_s)
        except Exception as err:  # noqa: BLE001 - recorded in the report as a failed row, the run goes on
            return {
                **row_stub(spec, "failed", f"{type(err).__name__}: {err}", device),
                "batch_size": batch_size,
            }

    def _time_row(
        self, spec: RowSpec, backend: Backend, device: str, batch_size: int, setup_s: float
    ) -> dict:
        from virchow_rt.embed import Embedder

        s = self.settings
        n = s.tiles_for(batch_size)
        tiles = self.tiles[:n]  # (n, S, S, 3) uint8, already in host memory
        timed = TimedBackend(backend)
        embedder = Embedder(timed, batch_size=batch_size)  # the path users run: reader thread + pipeline
        totals, latencies = [], []
        with PeakMemory(gpu=device == "cuda") as memory:
            # the first call holds compilation / engine building: timed apart, never in the figures
            first = time_calls(lambda: backend.run(tiles[:batch_size]), repeats=1, warmup=0)
            # a pipelined backend takes its slots in turn from the first in every pass: warm them all up
            # here (torch-cuda captures a slot's CUDA graph on its first full batch), never in a timed pass
            warm = max(s.warmup - 1, backend.slots)
            for _ in backend.pipeline(tiles[:batch_size] for _ in range(warm)):
                pass
            graphs_before = graph_use(backend)
            cpu_start = os.times()
            for _ in range(s.repeats):
                timed.recorder.reset()
                start = time.perf_counter()
                embeddings = embedder.embed(tiles)  # (n, E) float32
                totals.append(time.perf_counter() - start)
                latencies += timed.recorder.latencies_s
            cpu_end = os.times()
        graphs = graph_use(backend, since=graphs_before)
        pass_s = Stats(tuple(totals))
        # CPU time this process got over what the usable cores could give: well below 1 on a CPU run
        # means other processes took the cores (or the backend left them idle)
        cpu_s = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
        cpu_utilization = cpu_s / (sum(totals) * usable_cores())
        latency = Stats(tuple(latencies))
        batches = split_batches(tiles, batch_size)
        compute, compute_reason = compute_only(
            backend, batches, device, repeats=s.repeats * 4, warmup=s.warmup
        )
        tiles_per_s = n / pass_s.median
        compute_tiles_per_s = batch_size / compute.median if compute else None
        peak = self.peaks.get(roofline.peak_key(device, spec.precision), {})
        tflops = roofline.achieved_tflops(self.flops_per_tile, tiles_per_s)
        compute_tflops = roofline.achieved_tflops(self.flops_per_tile, compute_tiles_per_s)
        peak_tflops = peak.get("tflops")
        latency_ms = {
            k: v for k, v in latency.to_dict(1e3).items() if k != "samples"
        }  # every batch: too long
        row: dict[str, Any] = {
            "backend": spec.backend,
            "precision": spec.precision,
            "device": device,
            "status": "ok",
            "reason": None,
            "backend_name": backend.name,
            "batch_size": batch_size,
            "tiles": n,
            "repeats": s.repeats,
            "warmup_batches": s.warmup,
            "tiles_per_s": tiles_per_s,
            "tiles_per_s_min": n / pass_s.max,
            "tiles_per_s_max": n / pass_s.min,
            "pass_s": pass_s.to_dict(),
            "compute_tiles_per_s": compute_tiles_per_s,
            "compute_reason": compute_reason,
            "compute_ms": compute.to_dict(1e3) if compute else None,
            "latency_ms": latency_ms,
            "first_call_s": first.median,
            "setup_s": setup_s,
            "peak_memory": memory.to_dict(),
            "cpu_utilization": cpu_utilization,
            "tflops": tflops,
            "compute_tflops": compute_tflops,
            "peak": peak.get("key"),
            "peak_fraction": tflops / peak_tflops if tflops and peak_tflops else None,
            "compute_peak_fraction": compute_tflops / peak_tflops if compute_tflops and peak_tflops else None,
            "artifact": self._artifact(spec),
            # what the backend did to the graph (ONNX Runtime's CPU attention fusion, for instance)
            "backend_details": backend.optimization,
            # torch-cuda: batches of the timed passes that replayed a CUDA graph and that ran eager
            "cuda_graphs": graphs,
            "note": spec.note or None,
        }
        row.update(self._parity(spec, batch_size, embeddings))
        return row

    def _artifact(self, spec: RowSpec) -> dict[str, Any] | None:
        if not spec.artifact or self.source.manifest is None:
            return None
        suffix = ".engine" if spec.kind == "tensorrt" else ".onnx"
        for a in self.source.manifest.artifacts:
            if a.precision == spec.artifact and a.path.endswith(suffix):
                return a.describe()
        return None

    def _parity(self, spec: RowSpec, batch_size: int, embeddings: np.ndarray) -> dict[str, Any]:
        if spec.key == REFERENCE_KEY and self.reference is None:
            self.reference = embeddings
            self.reference_info.update(batch_size=batch_size, tiles=self.tiles_label)
        if self.reference is None:
            return {"parity": None, "parity_reason": f"no {REFERENCE_KEY} reference could be run"}
        reference = self.reference[: len(embeddings)]
        tolerances = self.variant.tolerance
        precision = spec.parity_precision
        result = compare(
            embeddings, reference, tolerances.min_cosine(precision), tolerances.min_knn10(precision)
        )
        self.cosines[(spec.key, batch_size)] = cosine_rows(embeddings, reference)
        parity = {
            **result.to_dict(),
            "reference": REFERENCE_KEY,
            "tiles": len(embeddings),
            "summary": str(result),
        }
        return {"parity": parity, "parity_reason": None}


def _summary_line(row: dict[str, Any]) -> str:
    head = f"{row['backend'] + '/' + row['precision']:<32} batch {row['batch_size']!s:>4}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row['reason']}"
    parity = row.get("parity")
    cos = (
        f"min cos {parity['min_cosine']:.6f} {'PASS' if parity['passed'] else 'FAIL'}"
        if parity
        else "no parity"
    )
    return (
        f"{head}: {row['tiles_per_s']:9.2f} tiles/s  p50 {row['latency_ms']['p50']:8.1f} ms  "
        f"p99 {row['latency_ms']['p99']:8.1f} ms  {row['tflops']:.3f} TFLOP/s  {cos}"
    )


def cleanup_export(run: BenchmarkRun) -> None:
    """Remove the scratch export made by this run (the report keeps its manifest's facts)."""
    if run.source.exported_here and run.source.folder is not None:
        shutil.rmtree(run.source.folder, ignore_errors=True)
