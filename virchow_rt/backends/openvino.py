"""OpenVINO backend: the export's fp32 ONNX compiled for the CPU, in bf16 where the CPU has bf16 units.

OpenVINO reads the fp32 ``.onnx`` as it is (uint8 tiles in, float32 embedding out) and picks its own
kernels: with ``INFERENCE_PRECISION_HINT`` bf16 it runs the matmuls on AMX or AVX-512 BF16, which
OpenVINO reports as "BF16" in the CPU's ``OPTIMIZATION_CAPABILITIES``; elsewhere f32. The compile uses
the throughput hint (one stream per core group) and an ``AsyncInferQueue`` of OpenVINO's optimal
number of requests, so :meth:`OpenVinoBackend.pipeline` keeps every stream busy; compiled models are
cached on disk (``CACHE_DIR``), so a second process starts fast.

bf16 is gated like fp16 on a GPU: against the fp32 graph in ONNX Runtime CPU (the runtime the export
checked against the PyTorch reference) on real tissue tiles, min cosine >= the variant's reduced-precision
tolerance (0.999) and 10-NN overlap >= 0.90. The verdict is measured once per model file, OpenVINO
version and CPU, and cached beside the compiled models. A failing gate falls back to f32 with a warning
that names the numbers (``precision="auto"``) or refuses with them (``precision="bf16"``).

Nothing here imports openvino at import time, nor torch ever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.backends.base import Backend
from virchow_rt.backends.capabilities import cpu_model, physical_cores
from virchow_rt.backends.onnxruntime import (
    OnnxRuntimeBackend,
    check_model_file,
    default_cache_dir,
    graph_info,
)
from virchow_rt.compare import Comparison, compare
from virchow_rt.contract import INPUT, OUTPUT, ModelInfo
from virchow_rt.errors import (
    BackendError,
    InputError,
    MissingDependency,
    ModelFileError,
    ParityError,
    VirchowError,
)
from virchow_rt.files import sha256_file
from virchow_rt.registry import Tolerance, get_variant

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
GATE_TILES = 32  # as many real-tissue tiles as the export's parity check
GATE_SEED = 0  # the export's parity tiles (virchow_rt.export.pipeline.PARITY_SEED)
GATE_REFERENCE = "onnxruntime-cpu fp32"
GATE_VERSION = 1  # bump when the gate's tiles, reference or tolerances change: older verdicts are remeasured
#: the 10-NN overlap bf16 must keep (int8's retrieval gate: what MIL pooling and search see)
BF16_MIN_KNN10 = Tolerance().int8_min_knn10
_HINT = {"bf16": "bf16", "fp32": "f32"}  # our precision -> OpenVINO's INFERENCE_PRECISION_HINT


def _ov() -> Any:
    return optional_import("openvino", "to run models with OpenVINO")


def cpu_has_bf16(core: Any = None) -> bool:
    """True when OpenVINO's CPU plugin has bf16 kernels here (AMX or AVX-512 BF16)."""
    core = core if core is not None else _ov().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _text(value: Any) -> str:
    """An OpenVINO rt_info value (an OVAny) as text."""
    return str(value.astype(str)) if hasattr(value, "astype") else str(value)


def bf16_tolerance(variant: str) -> tuple[float, float]:
    """(min cosine, min 10-NN overlap) bf16 must reach: the variant's reduced-precision cosine (fp16's)."""
    try:
        tolerance = get_variant(variant).tolerance
    except VirchowError:  # a graph without metadata: the registry's defaults
        tolerance = Tolerance()
    return tolerance.min_cosine("fp16"), BF16_MIN_KNN10


class OpenVinoBackend(Backend):
    """Runs an exported fp32 ``.onnx`` (uint8 tiles -> float32 embedding) with OpenVINO on the CPU.

    ``precision``: "auto" (bf16 where the CPU has bf16 units and the gate passes, else fp32, with a
    warning naming the numbers when the gate failed), "bf16" (refuses without bf16 units or a passed
    gate) or "fp32". ``threads``: CPU threads in all (default: physical cores). ``requests``: async
    requests in flight (default: OpenVINO's optimal number). ``cache_dir``: compiled models and gate
    verdicts (default :func:`~virchow_rt.backends.onnxruntime.default_cache_dir`).
    ``gate_tiles``: real-tissue tiles the bf16 gate measures when no verdict is cached.

    :attr:`parity` is the bf16 gate's :class:`~virchow_rt.compare.Comparison` (None when bf16 was not
    considered); :attr:`gate` says where it came from ("measured", "cached") or why there is none.
    """

    path: Path  # always a file here

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        precision: str = "auto",
        *,
        threads: int | None = None,
        requests: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        gate_tiles: int = GATE_TILES,
    ) -> None:
        if precision not in PRECISIONS:
            raise InputError(f"unknown OpenVINO precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if gate_tiles < 2:
            raise InputError(f"gate_tiles is {gate_tiles}; the bf16 gate needs at least 2 tiles (default 32)")
        self.path = Path(model_path)
        check_model_file(self.path)
        self._sha256: str | None = None
        ov = _ov()
        self._ov_version = ov.get_version()
        self._cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._threads = int(threads or physical_cores())
        self._core = ov.Core()
        self._core.set_property({"CACHE_DIR": str(self._cache / "openvino")})
        model = self._read(self._core)
        info = self._read_info(model)
        if info.precision not in ("fp32", "unknown"):
            raise ModelFileError(
                f"{self.path.name} is a {info.precision} graph; the OpenVINO backend compiles the fp32 ONNX "
                "and chooses bf16 or fp32 itself: pass the export's <variant>.fp32.onnx (or its folder)"
            )
        if requests is not None and requests < 1:
            raise InputError(f"requests is {requests}; use at least 1 (default: OpenVINO's optimal number)")
        self._requests = requests
        self._queues: list[list[Any]] = []  # idle sets of infer requests of the compiled model, reused
        self._lock = threading.Lock()
        self._compiled: Any = None
        self.name = "openvino-cpu"
        self.info = info
        self.parity: Comparison | None = None
        self.gate = "not considered (fp32 asked for)" if precision == "fp32" else ""
        chosen = "fp32" if precision == "fp32" else self._choose_bf16(model, info, precision, gate_tiles)
        if chosen == "fp32":
            self._queues = []  # the gate's queues ran the bf16 compile
            self._compiled = self._compile(model, "fp32")
        self.precision = chosen
        self.info = dataclasses.replace(info, precision=chosen)
        self.name = f"openvino-cpu-{chosen}"
        #: async requests in flight (OpenVINO's optimal number for the throughput hint unless given)
        self.requests = self._request_count(self._compiled)
        #: per stream a batch of 8 keeps the activations in cache (as ONNX Runtime's CPU plateau)
        self.preferred_batch: int | None = 8
        #: what the compile chose, for reports (the benchmark records it as the row's backend details)
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")  # an element type: "bf16", "f32"
        self.optimization: dict[str, Any] = {
            "inference_precision": hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint),
            "streams": int(self._compiled.get_property("NUM_STREAMS")),
            "requests": self.requests,
            "bf16_gate": self.gate,
            "bf16_parity": str(self.parity) if self.parity is not None else None,
            "openvino": self._ov_version,
        }

    # --- loading -----------------------------------------------------------------------------
    def _read(self, core: Any) -> Any:
        try:
            return core.read_model(str(self.path))
        except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFileError(
                f"OpenVINO cannot read {self.path} ({self.path.stat().st_size} bytes) as an ONNX model: it "
                f"is truncated, corrupt or not ONNX ({first}); re-export it with `virchow-rt export VARIANT "
                "--out DIR`"
            ) from err

    def _read_info(self, model: Any) -> ModelInfo:
        inputs = {i.get_any_name(): i for i in model.inputs}
        outputs = {o.get_any_name(): o for o in model.outputs}
        tiles = inputs.get(INPUT)
        rank = tiles.get_partial_shape().rank if tiles is not None else None
        rank_ok = rank is not None and rank.is_static and rank.get_length() == 4
        if not rank_ok or tiles.get_element_type().get_type_name() != "u8" or OUTPUT not in outputs:
            found = ", ".join(
                f"{name} {i.get_element_type()} {i.get_partial_shape()}" for name, i in inputs.items()
            )
            raise ModelFileError(
                f"{self.path} is not a virchow-rt export: expected input '{INPUT}' uint8 (batch, S, S, 3) "
                f"and output '{OUTPUT}', found inputs [{found}] and outputs {sorted(outputs)}"
            )
        # ONNX Runtime's metadata_props arrive as the rt_info section "framework"
        framework = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        meta = {str(k): _text(v) for k, v in dict(framework).items()}

        def dims(port: Any) -> list[Any]:
            return [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]

        return graph_info(meta, dims(tiles), dims(outputs[OUTPUT]), self.path)

    @property
    def model_sha256(self) -> str:
        """Hex SHA-256 of the ``.onnx`` file (computed once)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def _compile(self, model: Any, precision: str) -> Any:
        config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "INFERENCE_NUM_THREADS": self._threads,
        }
        try:
            return self._core.compile_model(model, "CPU", config)
        except Exception as err:  # noqa: BLE001 - OpenVINO's compile errors become one BackendError
            raise BackendError(
                f"OpenVINO could not compile {self.path.name} for the CPU in {precision} ({err}); "
                "use --backend onnxruntime-cpu"
            ) from err

    # --- the bf16 gate -----------------------------------------------------------------------
    def _choose_bf16(self, model: Any, info: ModelInfo, precision: str, gate_tiles: int) -> str:
        """The precision to run: bf16 when the CPU has bf16 units and the gate passed (compiled here),
        else fp32 (``precision`` "auto") or an error that says why (``precision`` "bf16")."""
        if not cpu_has_bf16(self._core):
            self.gate = f"not considered: this CPU ({cpu_model()}) has no bf16 units (AMX / AVX-512 BF16)"
            if precision == "bf16":
                raise BackendError(f"bf16 asked for, but {self.gate[len('not considered: ') :]}; use fp32")
            return "fp32"
        verdict = self._cached_verdict(*bf16_tolerance(info.variant), gate_tiles)
        if verdict is None:
            self._compiled = self._compile(model, "bf16")
            try:
                verdict = self._measure(info, gate_tiles)
            except MissingDependency as err:  # scikit-image (the tissue tiles): bf16 cannot be checked here
                self._compiled, self.gate = None, f"not measured: {err}"
                if precision == "bf16":
                    raise
                warnings.warn(f"OpenVINO bf16 of {self.path.name} is not run unchecked: {err}", stacklevel=3)
                return "fp32"
            self.gate = "measured"
        else:
            self.gate = "cached"
        self.parity = verdict
        if verdict:
            if self._compiled is None:
                self._compiled = self._compile(model, "bf16")
            return "bf16"
        self._compiled = None
        message = f"OpenVINO bf16 of {self.path.name} failed its parity gate ({GATE_REFERENCE}): {verdict}"
        if precision == "bf16":
            raise ParityError(f"{message}; run it in fp32 (--backend openvino-fp32 or onnxruntime-cpu)")
        warnings.warn(f"{message}; running fp32 instead", stacklevel=3)
        return "fp32"

    def _verdict_file(self) -> Path:
        data = self.path.with_name(self.path.name + ".data")
        # external data enters the key by size and mtime (hashing GBs costs seconds), as ONNX Runtime's cache
        stamp = f"-{data.stat().st_size}-{data.stat().st_mtime_ns}" if data.exists() else ""
        cpu = "".join(c if c.isalnum() else "_" for c in cpu_model())[:40]
        key = f"{self.model_sha256[:32]}{stamp}-ov{self._ov_version.split('-')[0]}-{cpu}-g{GATE_VERSION}"
        return self._cache / "openvino-gate" / f"{key}.json"

    def _cached_verdict(self, min_cosine: float, min_knn10: float, tiles: int) -> Comparison | None:
        """The cached measurement, judged by today's tolerances (None: not measured yet)."""
        path = self._verdict_file()
        try:
            entry = json.loads(path.read_text())
            fields = {f.name for f in dataclasses.fields(Comparison)}
            measured = {k: v for k, v in entry["comparison"].items() if k in fields}
            numbers = [v for k, v in measured.items() if k not in ("all_finite", "knn10_tolerance")]
            if not all(type(v) in (int, float) and math.isfinite(v) for v in numbers):
                raise ValueError("its figures are not all finite numbers")
            if measured.get("n", 0) < tiles:  # fewer tiles than asked for: not this gate
                return None
            return Comparison(**{**measured, "tolerance": min_cosine, "knn10_tolerance": min_knn10})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged entry is measured again
            log.warning("ignoring the unreadable bf16 gate verdict %s (%s)", path, err)
            return None

    def _measure(self, info: ModelInfo, n: int) -> Comparison:
        """Run ``n`` real tissue tiles in bf16 here and in fp32 ONNX Runtime; compare; cache the verdict."""
        from virchow_rt.tissue import tissue_tiles

        tiles = tissue_tiles(n, info.tile_size, seed=GATE_SEED)
        batches = [tiles[i : i + 8] for i in range(0, n, 8)]
        with OnnxRuntimeBackend(self.path, "cpu", optimize=False, threads=self._threads) as reference:
            expected = np.concatenate([reference.run(b) for b in batches])
        got = np.concatenate(list(self._submit(batches)))
        min_cosine, min_knn10 = bf16_tolerance(info.variant)
        result = compare(got, expected, min_cosine, min_knn10)
        record = {
            "model": self.path.name,
            "precision": "bf16",
            "reference": GATE_REFERENCE,
            "tiles": f"virchow_rt.tissue.tissue_tiles({n}, {info.tile_size}, seed={GATE_SEED})",
            "openvino": self._ov_version,
            "cpu": cpu_model(),
            "comparison": result.to_dict(),
            "summary": str(result),
        }
        path = self._verdict_file()
        try:  # written whole, then renamed: a reader never sees half a verdict
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(record, indent=1))
            os.replace(partial, path)
        except OSError as err:  # a read-only cache costs a remeasure next time, nothing else
            log.warning("could not cache the bf16 gate verdict in %s (%s)", path, err)
        log.info("OpenVINO bf16 gate for %s: %s", self.path.name, result)
        return result

    # --- running -----------------------------------------------------------------------------
    #: the same checks and messages as ONNX Runtime: uint8 (B, S, S, 3) host tiles, GPU arrays refused
    check_tiles = OnnxRuntimeBackend.check_tiles

    def run(self, tiles: Any) -> np.ndarray:
        """Embed one batch: numpy uint8 (B, S, S, 3) -> (B, E) float32, split over the async requests."""
        tiles = self.check_tiles(tiles)
        step = -(-len(tiles) // self.requests)  # ceil: one piece per request, every stream busy
        pieces = [tiles[i : i + step] for i in range(0, len(tiles), step)]
        return np.concatenate(list(self._submit(pieces)))

    def pipeline(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Embed batches in order with up to :attr:`requests` of them in flight (one per stream)."""
        return self._submit(self.check_tiles(b) for b in batches)

    def _submit(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Start each batch on the next request, round robin; yield the outputs in submission order.

        No Python callback runs on OpenVINO's threads: a callback needs the GIL, and a compiled model
        destroyed from Python (holding the GIL) joins those threads, which deadlocked (seen here, in
        ``CPUStreamsExecutor``'s destructor). Each request is waited for from this thread instead;
        ``wait`` releases the GIL."""
        compiled = self._compiled
        if compiled is None:
            raise BackendError(f"{self.name} backend for {self.path} is closed; open a new one")
        with self._lock:
            requests = self._queues.pop() if self._queues else self._new_queue(compiled)
        pending: list[Any] = []  # requests started and not yet read, oldest first
        clean = False
        try:
            for k, batch in enumerate(batches):
                if len(pending) == len(requests):  # every request busy: read the oldest, requests[k % n]
                    yield self._output(pending.pop(0))
                request = requests[k % len(requests)]
                request.start_async({INPUT: batch}, share_inputs=False)  # copies: the caller may reuse it
                pending.append(request)
            while pending:
                yield self._output(pending.pop(0))
            clean = True
        except VirchowError:
            raise
        except Exception as err:  # noqa: BLE001 - OpenVINO's runtime errors become one BackendError
            raise BackendError(f"{self.name} failed on {self.path.name}: {err}") from err
        finally:
            for request in pending:  # also when the consumer stopped early: no request outlives its inputs
                with contextlib.suppress(Exception):  # its error, rethrown by every wait, is told already
                    request.wait()
            if clean:
                with self._lock:
                    self._queues.append(requests)

    @staticmethod
    def _output(request: Any) -> np.ndarray:
        request.wait()
        return request.get_tensor(OUTPUT).data.astype(np.float32, copy=True)  # (B, E)

    def _request_count(self, compiled: Any) -> int:
        return int(self._requests or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def _new_queue(self, compiled: Any) -> list[Any]:
        return [compiled.create_infer_request() for _ in range(self._request_count(compiled))]

    def close(self) -> None:
        self._compiled = None
        self._queues = []
