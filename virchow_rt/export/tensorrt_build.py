"""fp16 ONNX -> TensorRT engine (strongly typed), gated on parity, recorded in ``manifest.json``.

Precision comes from the graph, never from builder flags: TensorRT 11 builds strongly typed networks
only (``BuilderFlag.FP16`` and the precision-constraint flags are gone) and on 10.12-10.x we ask for
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. The choice is made from ``trt.__version__``, never by
probing for a flag with ``hasattr`` (a missing fp16 flag would otherwise silently build fp32). The
fp16 ONNX's precision plan (LayerNorm, Softmax, reductions and the output kept fp32) is what the
engine runs. TensorRT accepts the uint8 input only into a Cast, so a graph that transposes the tiles
first gets a Cast in front (:func:`~.tensorrt_prep.cast_input_first`, same numbers).

The engine is measured against the fp32 reference on real tissue tiles before it is written
(:class:`ParityError` below the variant's fp16 tolerance, nothing written); the file is written
atomically and its manifest entry records the TensorRT version, GPU, compute capability, batch
profile and ONNX sha256 that it is tied to (see :mod:`virchow_rt.backends.engine_cache`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from virchow_rt.backends.base import Backend
from virchow_rt.backends.cuda import api as cuda
from virchow_rt.backends.engine_cache import (
    EngineKey,
    check_version,
    lean_runtime,
    stale_reasons,
)
from virchow_rt.backends.tensorrt import LogBook, TensorRTBackend, import_tensorrt, make_logger
from virchow_rt.compare import compare
from virchow_rt.contract import INPUT, MANIFEST_NAME, OUTPUT, Artifact, Manifest, ModelInfo
from virchow_rt.errors import BackendError, InputError, ModelFileError, ParityError
from virchow_rt.export.tensorrt_prep import (
    PURPOSE,
    cast_input_first,
    checked_onnx,
    default_timing_cache,
    engine_name,
    network_flags,
    parity_reference,
    resolve_profile,
)
from virchow_rt.files import atomic_path, file_lock, sha256_file
from virchow_rt.kernels.resize import resize_tiles
from virchow_rt.registry import BatchProfile, Variant, get_variant
from virchow_rt.tissue import tissue_tiles

if TYPE_CHECKING:
    import tensorrt as trt

DEFAULT_WORKSPACE_GIB = 4.0
#: ``timing_cache="auto"``: one cache file per TensorRT version and GPU under the user cache folder
AUTO = "auto"
PARITY_SEED = 0
_PARITY_BATCH = 16


def _host_bytes(memory: trt.IHostMemory) -> bytes:
    # IHostMemory implements the buffer protocol; the stubs do not declare it
    return bytes(memoryview(cast(Any, memory)))


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None, book: LogBook) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        usable = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception:  # noqa: BLE001 - TensorRT raises RuntimeError/TypeError for a corrupt cache file
        usable = False
    if not usable:
        book.add(
            "WARNING",
            f"timing cache {path} is unusable (other TensorRT or GPU, or damaged); starting a new one",
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Merge what this build timed with the file as it is now (another build may have added to it), under
    a file lock so that concurrent builds do not drop each other's entries; written atomically."""
    cache = config.get_timing_cache()
    with file_lock(path):
        if path.is_file():
            try:
                cache.combine(config.create_timing_cache(path.read_bytes()), ignore_mismatch=True)
            except Exception:  # noqa: BLE001 - a damaged file on disk is replaced, not merged
                pass
        data = _host_bytes(cache.serialize())
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


def _parse(
    trt_mod: Any, network: trt.INetworkDefinition, logger: trt.ILogger, onnx_path: Path, book: LogBook
) -> tuple[Any, bool]:
    parser: trt.OnnxParser = trt_mod.OnnxParser(network, logger)
    rewritten = cast_input_first(onnx_path)
    if rewritten is None:
        ok = parser.parse_from_file(os.fspath(onnx_path))  # the path lets it find external data (> 2 GB)
    else:
        ok = parser.parse(rewritten, os.fspath(onnx_path))  # the path: where external data lives
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        said = " | ".join(errors) if errors else book.quote()
        raise BackendError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {said}")
    return parser, rewritten is not None  # the network refers to weights the parser owns: keep it alive


def _check_network(network: trt.INetworkDefinition, size: int) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    tiles, emb = inputs.get(INPUT), outputs.get(OUTPUT)
    if len(inputs) != 1 or tiles is None or tiles.dtype.name != "UINT8":
        raise ModelFileError(
            f"the ONNX graph's inputs are {list(inputs)}, expected one uint8 {INPUT!r}; re-export it"
        )
    shape = tuple(tiles.shape[i] for i in range(len(tiles.shape)))
    if shape[1:] != (size, size, 3) or shape[0] != -1:
        raise ModelFileError(
            f"input {INPUT!r} has shape {shape}, expected (batch, {size}, {size}, 3); re-export it"
        )
    if emb is None or emb.dtype.name != "FLOAT":
        raise ModelFileError(
            f"the ONNX graph has no float32 output {OUTPUT!r} (outputs: {list(outputs)}); re-export it"
        )


def _embed(backend: Backend, tiles: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [backend.run(tiles[i : i + _PARITY_BATCH]) for i in range(0, len(tiles), _PARITY_BATCH)]
    )


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    variant: Variant | str,
    *,
    max_batch: int | None = None,
    profile: BatchProfile | Mapping[str, int] | Sequence[int] | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    optimization_level: int = 3,
    version_compatible: bool = False,
    exclude_lean_runtime: bool = False,
    timing_cache: str | os.PathLike[str] | None = AUTO,
    reference: Backend | None = None,
    parity_tiles: int = 32,
    device: int = 0,
) -> Artifact:
    """Build ``<variant>.fp16.engine`` in ``out_dir`` from the fp16 ONNX; returns its manifest entry.

    ``profile``/``max_batch``: batch profile (:func:`resolve_profile`). ``workspace_gib``: tactic
    scratch memory limit. ``optimization_level``: TensorRT builder level 0-5 (3 is TensorRT's
    default). ``version_compatible``: runs on later TensorRT and the lean runtime
    (``tensorrt_lean``); ``exclude_lean_runtime`` leaves the lean runtime out of the plan (for devices
    that install ``tensorrt-lean`` of the same version). ``timing_cache``: "auto" (per-user file),
    a path, or None; reused and updated atomically. ``reference``: the fp32 reference backend to
    measure parity against (default: PyTorch rebuilt from the manifest's weights, else the fp32
    ONNX in ONNX Runtime CPU). Raises :class:`ParityError` (nothing written) below tolerance.
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    onnx_path, folder = Path(onnx_path), Path(out_dir)
    prof = resolve_profile(variant, max_batch, profile)
    if not 0 <= optimization_level <= 5:
        raise InputError(f"optimization_level is {optimization_level}; TensorRT's builder levels are 0-5")
    if not workspace_gib > 0:
        raise InputError(f"workspace_gib is {workspace_gib}; give a positive size in GiB, e.g. 4")
    if exclude_lean_runtime and not version_compatible:
        raise InputError("exclude_lean_runtime needs version_compatible=True (only those engines carry it)")
    if parity_tiles < 1:
        raise InputError(f"parity_tiles is {parity_tiles}; every engine is checked, use at least 1")
    if folder.resolve() != onnx_path.parent.resolve():
        raise InputError(
            f"out_dir {folder} is not the folder of {onnx_path.name}; engines are built into the export "
            "folder, beside the ONNX and its manifest.json"
        )
    manifest, source, onnx_sha, data_sha = checked_onnx(onnx_path)

    import_tensorrt("tensorrt", PURPOSE)  # MissingDependency when TensorRT itself (not its stubs) is absent
    import tensorrt as trt  # the same module, typed through tensorrt-stubs

    check_version(trt.__version__)
    cuda.set_device(device)
    gpu = cuda.device_info(device)
    book = LogBook()
    logger = make_logger(trt, book)
    builder = trt.Builder(logger)
    flags = network_flags(trt.__version__, lambda: int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    network = builder.create_network(flags)
    if flags and not network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        raise BackendError(
            f"TensorRT {trt.__version__} did not create a strongly typed network; upgrade TensorRT"
        )
    parser, cast_inserted = _parse(trt, network, logger, onnx_path, book)
    size = variant.preprocess.size
    _check_network(network, size)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if exclude_lean_runtime:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    opt_profile = builder.create_optimization_profile()
    dims = [trt.Dims([b, size, size, 3]) for b in (prof.min, prof.opt, prof.max)]
    opt_profile.set_shape(INPUT, dims[0], dims[1], dims[2])
    config.add_optimization_profile(opt_profile)
    cache_path = None if timing_cache is None else Path(timing_cache)
    if timing_cache == AUTO:
        cache_path = default_timing_cache(trt.__version__, gpu.compute_capability)
    _load_timing_cache(config, cache_path, book)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path.name} ({book.quote()})")
    plan = _host_bytes(serialized)
    build_s = time.perf_counter() - start
    del parser, serialized
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    del config, network, builder  # free the builder's GPU memory before the parity run

    start = time.perf_counter()
    info = dataclasses.replace(ModelInfo.from_manifest(manifest, source), precision="fp16")
    tiles = tissue_tiles(parity_tiles, size, seed=PARITY_SEED)
    pre = variant.preprocess  # exported graphs take S×S tiles after the model's transform
    inputs = resize_tiles(tiles, pre.size, pre.crop_pct, pre.interpolation)
    ref_backend, ref_label = parity_reference(manifest, onnx_path.parent, reference)
    try:
        # the PyTorch reference applies timm's transform itself; an ONNX reference takes what the engine takes
        expected = _embed(ref_backend, tiles if ref_backend.transforms_tiles else inputs)
    finally:
        if ref_backend is not reference:  # one opened here (a session, a model on the GPU): free it now
            ref_backend.close()
    with TensorRTBackend.from_serialized(  # the plan this process just built: its host code is ours
        plan, info, device=device, version_compatible=version_compatible,
        allow_engine_host_code=version_compatible,
    ) as engine:  # fmt: skip
        got = engine.run(inputs)
    result = compare(got, expected, variant.tolerance.fp16_min_cosine)
    name = engine_name(variant)
    if not result:
        raise ParityError(
            f"TensorRT fp16 engine of {variant.name} disagrees with the {ref_label} reference: {result}; "
            f"{name} was not written. Check the fp16 precision plan (fp16 ONNX parity), or report a bug"
        )
    target = folder / name
    with atomic_path(target) as tmp:
        tmp.write_bytes(plan)
    entry: dict[str, Any] = {
        "path": name,
        "format": "tensorrt",
        "precision": "fp16",
        "sha256": sha256_file(target),
        "size_bytes": target.stat().st_size,
        "external_data": None,
        "inputs": None if source.inputs is None else list(source.inputs),
        "outputs": None if source.outputs is None else list(source.outputs),
        "precision_plan": source.extra.get("precision_plan"),
        "parity": {
            **result.to_dict(),
            "reference": ref_label,
            "backend": "tensorrt",
            "tiles": f"virchow_rt.tissue.tissue_tiles({parity_tiles}, {size}, seed={PARITY_SEED})",
            "summary": str(result),
        },
        "tensorrt_version": trt.__version__,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "profile": {"min": prof.min, "opt": prof.opt, "max": prof.max},
        "onnx_path": onnx_path.name,
        "onnx_sha256": onnx_sha,
        "onnx_external_data_sha256": data_sha,
        "strongly_typed": True,
        "input_cast_inserted": cast_inserted,
        "version_compatible": version_compatible,
        "lean_runtime": lean_runtime(version_compatible, exclude_lean_runtime),
        "builder_optimization_level": optimization_level,
        "workspace_gib": workspace_gib,
        "timing_cache": None if cache_path is None else str(cache_path),
        "seconds": {"build": round(build_s, 2), "parity": round(time.perf_counter() - start, 2)},
    }
    artifact = Artifact.from_dict(entry)
    # the manifest as it is now, not as it was before the build
    Manifest.read(folder).with_artifact(artifact).write(folder)
    return artifact


def ensure_engine(
    onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], variant: Variant | str, **build: Any
) -> Artifact:
    """The engine's manifest entry; rebuilt only if missing, changed, or tied to another TensorRT/GPU/profile.

    ``build``: :func:`build_engine`'s keyword arguments (``max_batch``, ``profile``, ``version_compatible``,
    ``exclude_lean_runtime``, ``optimization_level``: all part of the key; the workspace limit is not).
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    folder = Path(out_dir)
    target = folder / engine_name(variant)
    if target.is_file() and (folder / MANIFEST_NAME).is_file():
        entry = Manifest.read(folder).artifact_for(target)
        if entry is not None and entry.sha256 == sha256_file(target):
            trt = import_tensorrt("tensorrt", PURPOSE)
            prof = resolve_profile(variant, build.get("max_batch"), build.get("profile"))
            _, _, graph_sha, data_sha = checked_onnx(Path(onnx_path))
            compatible = bool(build.get("version_compatible", False))
            wanted = EngineKey(
                onnx_sha256=graph_sha,
                onnx_data_sha256=data_sha,
                tensorrt_version=str(trt.__version__),
                compute_capability=cuda.device_info(int(build.get("device", 0))).compute_capability,
                profile=(prof.min, prof.opt, prof.max),
                version_compatible=compatible,
                optimization_level=int(build.get("optimization_level", 3)),
                lean_runtime=lean_runtime(compatible, bool(build.get("exclude_lean_runtime", False))),
            )
            if not stale_reasons(EngineKey.from_artifact(entry), wanted):
                return entry
    return build_engine(onnx_path, out_dir, variant, **build)
