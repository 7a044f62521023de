"""ONNX Runtime backend: TensorRT EP / CUDA EP where available, else a tuned CPU session.

CPU tuning, measured on the 2-core AMD EPYC (Zen 5, AVX-512) build machine with the full-size
virchow2g-mini fp32 export (random weights): 64 tiles per run, 4 interleaved runs per setting, tiles/s
best / median (load average ~2.0, i.e. only the run itself; the machine is shared, so other runs
swung by +-30 %). MatMul is ~79 % of the time, so most graph rewrites move little.

* graph optimization level, batch 32: DISABLE_ALL 18.7 / 17.4, BASIC 18.7 / 17.3, EXTENDED 21.7 / 19.7,
  ALL 20.7 / 19.2 -> ALL (EXTENDED and ALL are within the noise; ALL also lays out the patch Conv).
* ``onnxruntime.transformers.optimizer.optimize_model(model_type="vit")``: fuses 24 SkipLayerNormalization
  and 12 BiasGelu but 0 Attention (its BERT matcher wants three q/k/v MatMuls, timm packs one qkv):
  18.3 / 17.4, slower than ORT's own level-ALL fusions; on top of the attention fusion below it also
  lost (20.2 / 18.8 vs 22.8 / 19.7). Not used.
* packed qkv -> ``com.microsoft.Attention`` (``ort_fusion``): 22.8 / 19.7 vs 20.7 / 19.2
  at batch 32, and +7 % at every batch size (batch 8: 24.4 vs 22.8; CPU time 81.5 vs 90.0 ms/tile).
  Kept: CPU fp32 only, made once into a cache folder keyed by the model's sha256, and used only when it
  matches the original graph (min cosine >= 0.99999).
* batch size (fused): 1: 24.1, 2: 24.4, 4: 24.4, 8: 24.7, 16: 22.7, 32: 20.8, 64: 19.4 tiles/s (best).
  Smaller batches keep the activations in cache; the plateau is 2-8, so the CPU session prefers 8
  (:attr:`OnnxRuntimeBackend.preferred_batch`), +27 % over the variant's GPU batch of 64.
* intra-op threads = physical cores: 1 thread 11.3, 2 threads 22.8 tiles/s; inter-op 1, sequential.
* memory arena + memory patterns off: 13.6 vs 22.8 tiles/s -> on (ORT's default). Thread spinning off:
  21.2 / 20.5 vs 22.8 / 19.7, a wash -> ORT's default (on), ``spinning=False`` to change it.

GPU sessions (CUDA and TensorRT EPs) run every batch through an I/O binding: host tiles are bound with
``bind_cpu_input``, a caller's GPU arrays (``__cuda_array_interface__`` or DLPack: torch, CuPy, JAX) by
their device pointer, read in place with no host round trip; the embedding is bound on the GPU and
copied out once. ``io_binding=True`` runs a CPU session the same way (binding host memory by pointer),
which is how the binding code is tested without a GPU. Not run on a GPU yet (no GPU was lent).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import is_importable, optional_import
from virchow_rt.backends.base import Backend
from virchow_rt.backends.capabilities import physical_cores
from virchow_rt.backends.cuda.device_arrays import DeviceArray, as_device_array, as_host_array
from virchow_rt.backends.ort_fusion import FUSION_VERSION, build_entry, evict, read_result
from virchow_rt.contract import INPUT, MANIFEST_NAME, OUTPUT, Artifact, Manifest, ModelInfo, check_tile_array
from virchow_rt.errors import BackendError, InputError, ModelFileError, VirchowError
from virchow_rt.files import sha256_file
from virchow_rt.registry import BatchProfile

log = logging.getLogger(__name__)

PROVIDERS = {  # ORT execution provider -> backend name
    "TensorrtExecutionProvider": "onnxruntime-tensorrt",
    "CUDAExecutionProvider": "onnxruntime-cuda",
    "CPUExecutionProvider": "onnxruntime-cpu",
}
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
CPU = ["CPUExecutionProvider"]
CPU_BATCH = 8  # the CPU throughput plateau is batch 2-8 (module doc); GPUs use the variant's batch
_REEXPORT = "re-export it with `virchow-rt export VARIANT --out DIR` (or copy the file again)"


def default_cache_dir() -> Path:
    """``$VIRCHOW_RT_CACHE``, else ``$XDG_CACHE_HOME/virchow-rt``, else ``~/.cache/virchow-rt``."""
    if os.environ.get("VIRCHOW_RT_CACHE"):
        return Path(os.environ["VIRCHOW_RT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "virchow-rt"


def _ort() -> Any:
    return optional_import("onnxruntime", "to run ONNX models")


def check_model_file(path: Path) -> None:
    """Missing, empty or non-file model paths fail here with a message naming the path and the fix."""
    if not path.exists():
        raise ModelFileError(
            f"model file {path} does not exist; export one with `virchow-rt export VARIANT --out DIR`"
        )
    if not path.is_file():
        raise ModelFileError(f"model path {path} is not a file; pass the .onnx file (or its export folder)")
    if path.stat().st_size == 0:
        raise ModelFileError(f"model file {path} is empty (0 bytes, truncated); {_REEXPORT}")


def session_options(ort: Any, threads: int | None = None, spinning: bool = True) -> Any:
    """CPU-tuned session options (see the module doc for the measurements behind them)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of big GEMMs: nothing to run in parallel
    so.intra_op_num_threads = int(threads or physical_cores())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _providers(ort: Any, choice: str, cache: Path, profile: tuple[int, int, int], size: int) -> list[Any]:
    """The ORT provider list for ``choice`` ("auto", "cpu", "cuda", "tensorrt"), best first, CPU last."""
    if choice not in PROVIDER_CHOICES:
        raise InputError(
            f"unknown ONNX Runtime provider choice {choice!r}; use one of {', '.join(PROVIDER_CHOICES)}"
        )
    available = ort.get_available_providers()
    wanted = {
        "auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
        "cpu": [],
        "cuda": ["CUDAExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    }[choice]
    if wanted and choice != "auto" and wanted[0] not in available:
        raise BackendError(
            f"ONNX Runtime provider {wanted[0]} is not available (onnxruntime here has "
            f"{', '.join(available)}); install onnxruntime-gpu with CUDA/TensorRT, or use "
            "--backend onnxruntime-cpu"
        )
    chosen: list[Any] = [p for p in wanted if p in available]
    if chosen and chosen[0] == "TensorrtExecutionProvider":
        engines = cache / "ort-trt"
        engines.mkdir(parents=True, exist_ok=True)

        def shape(batch: int) -> str:
            return f"{INPUT}:{batch}x{size}x{size}x3"

        # engines are built once per model and profile, then reused from the cache folder
        chosen[0] = (
            "TensorrtExecutionProvider",
            {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(engines),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(engines),
                "trt_profile_min_shapes": shape(profile[0]),
                "trt_profile_opt_shapes": shape(profile[1]),
                "trt_profile_max_shapes": shape(profile[2]),
            },
        )
    return [*chosen, *CPU]


def _manifest(path: Path) -> tuple[Manifest | None, Artifact | None]:
    """(manifest, this file's entry) from the manifest.json beside ``path``; None for what is not there."""
    if not (path.parent / MANIFEST_NAME).exists():
        return None, None
    try:
        manifest = Manifest.read(path)
    except ModelFileError:
        return None, None
    return manifest, manifest.artifact_for(path)


def _read_info(session: Any, path: Path) -> ModelInfo:
    """ModelInfo from the ONNX metadata_props, else the manifest beside the file, else the graph's shapes."""
    outputs = session.get_outputs()
    out_dims = next((o.shape for o in outputs if o.name == OUTPUT), outputs[0].shape)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return graph_info(meta, list(session.get_inputs()[0].shape), list(out_dims), path)


def graph_info(meta: dict[str, str], dims: list[Any], out_dims: list[Any], path: Path) -> ModelInfo:
    """:meth:`ModelInfo.from_onnx` of a graph (ONNX Runtime's or OpenVINO's view of it): its metadata_props
    ``meta``, else the manifest beside ``path``, else the shapes of the tiles input ``dims`` and embedding
    output ``out_dims`` (ints, or names for dynamic axes)."""
    graph_size = dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None
    graph_dim = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else None
    manifest, artifact = _manifest(path) if "virchow_rt.variant" not in meta else (None, None)
    return ModelInfo.from_onnx(meta, graph_size, graph_dim, manifest, artifact)


class OnnxRuntimeBackend(Backend):
    """Runs an exported ``.onnx`` (uint8 tiles -> float32 embedding) with ONNX Runtime.

    ``providers``: "auto" (TensorRT EP, CUDA EP, else CPU), "cpu", "cuda" or "tensorrt". ``threads``:
    intra-op threads (default: physical cores). ``optimize``: on CPU, run an fp32 model through
    :func:`fuse_attention` once and reuse the checked, cached copy from ``cache_dir``. ``io_binding``:
    run batches through an I/O binding (default: on for GPU sessions, off on the CPU; module doc).
    """

    path: Path  # always a file here

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        providers: str = "auto",
        *,
        threads: int | None = None,
        optimize: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        spinning: bool = True,
        io_binding: bool | None = None,
    ) -> None:
        self.path = Path(model_path)
        check_model_file(self.path)
        ort = _ort()
        self._ort = ort
        self._cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._options = session_options(ort, threads, spinning)
        self._sha256: str | None = None
        #: what the CPU optimization did: {"fused_attention": n, "cache": path} or {"skipped": reason}
        self.optimization: dict[str, Any] = {
            "skipped": "not requested" if not optimize else "not a CPU session"
        }
        manifest, _ = _manifest(self.path)
        batch = manifest.batch if manifest and manifest.batch else BatchProfile()
        profile = (batch.min, batch.opt, batch.max)
        size = manifest.preprocess.size if manifest and manifest.preprocess else 224
        provider_list = _providers(ort, providers, self._cache, profile, size)
        if provider_list == CPU:
            session = self._open_cpu(optimize)
        else:
            session = self._open(self.path, provider_list)
            if session.get_providers()[0] == "TensorrtExecutionProvider":
                self.max_batch = profile[2]  # the engine's optimization profile
        self.info = _read_info(session, self.path)  # the fused copy keeps the metadata_props
        self._session = session
        provider = session.get_providers()[0]
        self.name = PROVIDERS.get(provider, "onnxruntime")
        #: batch this session runs fastest at (CPU: 8, measured, module doc); None: the variant's
        self.preferred_batch: int | None = CPU_BATCH if self.name == "onnxruntime-cpu" else None
        if provider != "CPUExecutionProvider":  # CUDA and TensorRT EPs: the GPU they were given
            self.gpu = int(session.get_provider_options().get(provider, {}).get("device_id", 0))
        self.io_binding = self.gpu is not None if io_binding is None else io_binding
        self._check_io(session)

    # --- loading -----------------------------------------------------------------------------
    def _open(self, path: Path, providers: list[Any]) -> Any:
        try:
            return self._ort.InferenceSession(str(path), self._options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFileError(
                f"cannot load {path} ({path.stat().st_size} bytes) as an ONNX model: it is truncated, "
                f"corrupt or not ONNX ({first}); {_REEXPORT}"
            ) from err

    def _check_io(self, session: Any) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        tiles = inputs.get(INPUT)
        if tiles is None or tiles.type != "tensor(uint8)" or len(tiles.shape) != 4 or OUTPUT not in outputs:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs.values())
            raise ModelFileError(
                f"{self.path} is not a virchow-rt export: expected input '{INPUT}' uint8 (batch, S, S, 3) "
                f"and output '{OUTPUT}', found inputs [{found}] and outputs {sorted(outputs)}; {_REEXPORT}"
            )

    @property
    def model_sha256(self) -> str:
        """Hex SHA-256 of the ``.onnx`` file (computed once)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def _cache_entry(self) -> Path:
        data = self.path.with_name(self.path.name + ".data")
        # external data (models > 2 GB) enters the key by size and mtime: hashing it costs seconds per load
        stamp = f"-{data.stat().st_size}-{data.stat().st_mtime_ns}" if data.exists() else ""
        key = f"{self.model_sha256[:32]}{stamp}-ort{self._ort.__version__}-f{FUSION_VERSION}"
        return self._cache / "ort-cpu" / key

    def _open_cpu(self, optimize: bool) -> Any:
        """A CPU session: the cached attention-fused copy when a checked one exists (the original is then
        never loaded), else the original graph, fused and cached on first use when that works."""
        if not optimize:
            return self._open(self.path, CPU)
        entry = self._cache_entry()
        result = read_result(entry)
        original = None
        if result is None:  # first use of this model (with this ORT and fusion version)
            original = self._open(self.path, CPU)
            self._check_io(original)  # a graph that is not ours fails here, before any rewrite
            precision = original.get_modelmeta().custom_metadata_map.get("virchow_rt.precision")
            if precision in ("fp16", "int8") or not is_importable("onnx"):
                # fp16: ORT's CPU Attention kernel is fp32-only; int8: its weight MatMuls are quantized ops
                # the fusion does not match; onnx: needed to rewrite the graph
                reason = f"{precision} model" if precision in ("fp16", "int8") else "onnx not installed"
                self.optimization = {"skipped": reason}
                return original
            try:
                build_entry(self.path, original, entry, self._ort)
                result = read_result(entry) or {}
                evict(entry.parent, keep=entry)
            except Exception as err:  # noqa: BLE001 - an optimization must never stop a run
                log.warning(
                    "CPU graph optimization of %s failed (%s); running the original graph", self.path, err
                )
                self.optimization = {"skipped": f"failed: {err}"}
                return original
        if not result.get("use"):
            self.optimization = {"skipped": result.get("reason", "no gain")}
            return original or self._open(self.path, CPU)
        try:
            session = self._open(entry / "model.onnx", CPU)
        except ModelFileError as err:  # a damaged cache entry: drop it (rebuilt next time), run the original
            log.warning("cached optimized model %s is unusable (%s); running the original graph", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            self.optimization = {"skipped": f"failed: {err}"}
            return original or self._open(self.path, CPU)
        self.optimization = {"fused_attention": result["fused_attention"], "cache": str(entry)}
        return session

    # --- running -----------------------------------------------------------------------------
    def check_tiles(self, tiles: Any) -> np.ndarray | DeviceArray:
        """Validate one batch: uint8 (B, S, S, 3), host or GPU; errors name the bad value and the fix.

        Host tiles come back C-contiguous numpy (DLPack CPU arrays are viewed as numpy); GPU arrays
        (``__cuda_array_interface__`` or DLPack) as a :class:`DeviceArray`.
        """
        size = self.info.tile_size
        if not isinstance(tiles, np.ndarray | DeviceArray):
            host = hasattr(tiles, "__dlpack__")
            tiles = as_device_array(tiles) or (as_host_array(tiles) if host else tiles)
        if not isinstance(tiles, np.ndarray | DeviceArray):
            raise InputError(
                f"tiles are a {type(tiles).__name__}; pass a numpy uint8 array (B, {size}, {size}, 3) "
                "or a GPU array (torch, CuPy: __cuda_array_interface__ or DLPack)"
            )
        check_tile_array(tiles)
        if tiles.shape[1:3] != (size, size):
            raise InputError(
                f"tiles are {tiles.shape[1]}x{tiles.shape[2]} px; the model takes {size}x{size}: resize with "
                f"virchow_rt.kernels.resize_tiles(tiles, {size}) or use virchow_rt.embed.Embedder"
            )
        if tiles.shape[0] == 0 or (self.max_batch is not None and tiles.shape[0] > self.max_batch):
            raise InputError(
                f"batch of {tiles.shape[0]} tiles; use 1 to {self.max_batch or 'any number of'} tiles"
            )
        if isinstance(tiles, DeviceArray) and self.gpu is None:
            raise InputError(
                f"tiles are a GPU array but this {self.name} session runs on the CPU; copy them to the host "
                "(e.g. .cpu().numpy(), cupy.asnumpy) or run on a GPU (onnxruntime-gpu, or a TensorRT engine)"
            )
        return np.ascontiguousarray(tiles) if isinstance(tiles, np.ndarray) else tiles

    def run(self, tiles: Any) -> np.ndarray:
        """Embed one batch: numpy uint8 (B, S, S, 3), or a GPU array on a GPU session -> (B, E) float32."""
        tiles = self.check_tiles(tiles)
        session = self._session
        if session is None:
            raise BackendError(
                f"{self.name} backend for {self.path} is closed; open a new one with open_backend"
            )
        try:
            if self.io_binding or isinstance(tiles, DeviceArray):
                out = self._run_bound(session, tiles)
            else:
                (out,) = session.run([OUTPUT], {INPUT: tiles})  # (B, E)
        except VirchowError:  # ours already say what is wrong
            raise
        except Exception as err:  # noqa: BLE001 - ORT's runtime errors become one BackendError
            raise BackendError(
                f"{self.name} failed on a batch of {tuple(tiles.shape)} tiles from {self.path}: {err}"
            ) from err
        return np.asarray(out, dtype=np.float32)

    def _run_bound(self, session: Any, tiles: np.ndarray | DeviceArray) -> np.ndarray:
        """One batch through an I/O binding: input bound in place, output bound on the session's device."""
        binding = session.io_binding()
        if isinstance(tiles, DeviceArray):
            if tiles.device is not None and tiles.device != self.gpu:
                raise InputError(
                    f"the GPU array is on device {tiles.device} but this session runs on device "
                    f"{self.gpu}; move it there first"
                )
            _wait_for_producer(tiles, self.gpu)  # ORT reads on its own stream: the writes must be done
            binding.bind_input(INPUT, "cuda", self.gpu, np.uint8, tiles.shape, tiles.ptr)
        elif self.gpu is not None:
            binding.bind_cpu_input(INPUT, tiles)  # ORT copies it to the GPU
        else:
            binding.bind_input(INPUT, "cpu", 0, np.uint8, tiles.shape, tiles.ctypes.data)
        binding.bind_output(OUTPUT, "cpu" if self.gpu is None else "cuda", self.gpu or 0)
        session.run_with_iobinding(binding)
        (out,) = binding.copy_outputs_to_cpu()
        return np.asarray(out)

    def close(self) -> None:
        self._session = None


def _wait_for_producer(tiles: DeviceArray, gpu: int | None) -> None:
    """Block until the work queued on the producer's stream (the writes to ``tiles``) on ``gpu`` is done."""
    if tiles.stream is None:
        return
    from virchow_rt.backends.cuda import api as cuda

    cuda.set_device(gpu or 0)  # the event and the default streams belong to the current GPU of this thread
    with cuda.Event() as done:
        done.record(tiles.stream)
        done.synchronize()
