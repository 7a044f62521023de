"""Open the :class:`~virchow_rt.backends.base.Backend` behind one benchmark row, and time its compute alone.

The benchmark talks to every backend through the Backend interface only: the PyTorch reference
(``virchow_rt.backends.torch_reference.TorchBackend``), ONNX Runtime, OpenVINO and TensorRT
(``virchow_rt.backends.open_backend``).
Compute-only timing (device work alone, CUDA events) is :meth:`Backend.time_compute`, which a GPU backend
implements; on a CPU there is no device apart from the host, so the figure is null with a reason.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.backends.engine_cache import rebuild_command
from virchow_rt.benchmark.rows import RowSpec
from virchow_rt.benchmark.timing import LatencyRecorder, Stats
from virchow_rt.contract import Manifest
from virchow_rt.errors import ModelFileError
from virchow_rt.registry import Variant

CPU_COMPUTE_REASON = (
    "CPU run: the host is the device, so there is no compute apart from end to end "
    "(compute-only needs CUDA events on a GPU)"
)
#: torch autocast dtypes a RowSpec precision maps to when TorchBackend does not offer that precision itself
_AUTOCAST = {"bf16-autocast": ("bfloat16", "bf16")}


class AutocastBackend(Backend):
    """An fp32 ``TorchBackend`` run inside ``torch.autocast`` with another dtype (bf16 on a CPU).

    Only used while ``TorchBackend`` has no such precision of its own: autocast is thread-local and
    wraps the whole ``run`` (timm's transform has no matmul, so only the model is affected).
    """

    def __init__(self, inner: Backend, device: str, precision: str) -> None:
        from virchow_rt._deps import optional_import

        self._torch = optional_import("torch", "for the PyTorch reference rows")
        dtype_name, info_precision = _AUTOCAST[precision]
        self._dtype = getattr(self._torch, dtype_name)
        self._device = device
        self.inner = inner
        self.name = f"torch-autocast-{info_precision}"
        self.info = dataclasses.replace(inner.info, precision=info_precision)
        self.max_batch, self.transforms_tiles = inner.max_batch, inner.transforms_tiles

    def run(self, tiles: np.ndarray) -> np.ndarray:
        with self._torch.autocast(device_type=self._device, dtype=self._dtype):
            return self.inner.run(tiles)

    def close(self) -> None:
        self.inner.close()


class TimedBackend(Backend):
    """Pass-through to ``inner`` that records each batch's latency at the backend boundary.

    The Embedder's reader thread takes batches ahead of the backend; wrapping the backend (not the
    Embedder's input) keeps that read-ahead out of the latency: it runs from the moment the backend
    takes a batch to the moment its embeddings come back.
    """

    def __init__(self, inner: Backend, recorder: LatencyRecorder | None = None) -> None:
        self.inner = inner
        self.recorder = recorder or LatencyRecorder()
        self.name, self.info, self.max_batch = inner.name, inner.info, inner.max_batch

    def run(self, tiles: np.ndarray) -> np.ndarray:
        return self.inner.run(tiles)

    def pipeline(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        outputs = self.inner.pipeline(self.recorder.feed(batches))
        try:
            yield from self.recorder.results(outputs)
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()  # stop the inner pipeline early too when our consumer stops

    def close(self) -> None:
        """The benchmark closes the inner backend itself; nothing is owned here."""


def artifact_path(folder: Path, variant: Variant, spec: RowSpec) -> Path:
    """The export file a row runs: ``<variant>.<precision>.onnx`` or ``<variant>.fp16.engine``."""
    suffix = "engine" if spec.kind == "tensorrt" else "onnx"
    return folder / f"{variant.name}.{spec.artifact}.{suffix}"


def export_hint(folder: Path, variant: Variant, spec: RowSpec) -> str:
    """The command that adds a row's missing artifact to ``folder`` (an export keeps the folder's others),
    with the weights its manifest records (or a placeholder where they are not on this machine)."""
    try:
        manifest = Manifest.read(folder)
    except ModelFileError:
        manifest = Manifest(variant=variant.name)
    options = f"--precision {spec.artifact}" + (" --tensorrt" if spec.kind == "tensorrt" else "")
    return rebuild_command(dataclasses.replace(manifest, variant=variant.name), folder, options)


def open_row_backend(
    spec: RowSpec,
    device: str,
    *,
    variant: Variant,
    torch_model: Any = None,
    weights_info: Any = None,
    folder: Path | None = None,
    max_batch: int | None = None,
    workers: int = 0,
) -> Backend:
    """The Backend a row measures: the reference model at a precision, or an exported artifact.

    ``max_batch``: the largest batch a torch-cuda row is sized for. ``workers``: CPU threads for timm's
    transform in the PyTorch rows (TRIDENT's DataLoader workers; 0: inline).
    """
    if spec.kind == "torch-cuda":
        from virchow_rt.backends.torch_cuda import TorchCudaBackend

        # a copy: the backend converts its model to fp16 in place, and the other rows share this one
        model = copy.deepcopy(torch_model)
        return TorchCudaBackend(model, variant, weights_info, compile=spec.compile, max_batch=max_batch)
    if spec.kind == "torch":
        from virchow_rt.backends import torch_reference as reference

        options = {"compile": spec.compile, "device": device, "weights": weights_info, "workers": workers}
        if spec.precision in reference.PRECISIONS:
            return reference.TorchBackend(torch_model, variant, spec.precision, **options)
        inner = reference.TorchBackend(torch_model, variant, "fp32", **options)
        return AutocastBackend(inner, device, spec.precision)
    if folder is None:
        raise ModelFileError(f"row {spec.key} needs an exported model but no export folder was given")
    path = artifact_path(folder, variant, spec)
    if not path.exists():
        raise ModelFileError(
            f"{path} does not exist; add it to the export: `{export_hint(folder, variant, spec)}`"
        )
    from virchow_rt.backends import open_backend

    if spec.kind == "openvino":  # "openvino-bf16" refuses (with the gate's numbers) rather than fall back
        return open_backend(path, backend=f"openvino-{spec.precision}")
    return open_backend(path, backend=spec.backend)


def graph_use(backend: Backend, since: dict[str, int] | None = None) -> dict[str, int] | None:
    """CUDA-graph replays and eager runs of a backend that counts them (:meth:`Backend.graph_use`:
    torch-cuda).

    ``since``: an earlier reading; the runs after it are returned (the slots captured, as now). None for
    a backend that does not count.
    """
    now = backend.graph_use()
    if now is None or since is None:
        return now
    return {**now, "replayed": now["replayed"] - since["replayed"], "eager": now["eager"] - since["eager"]}


def compute_only(
    backend: Backend, batches: Sequence[np.ndarray], device: str, *, repeats: int, warmup: int
) -> tuple[Stats | None, str | None]:
    """Device time per batch (CUDA events, no host copies) or None with the reason.

    :meth:`Backend.time_compute` returns seconds per call, or None where the backend cannot time its
    device work alone; nothing else is guessed from its internals.
    """
    if device != "cuda":
        return None, CPU_COMPUTE_REASON
    samples = backend.time_compute(batches[0], repeats=repeats, warmup=warmup)
    if samples is None:
        return None, f"{backend.name} offers no device-only timing"
    return Stats(tuple(float(s) for s in samples)), None
