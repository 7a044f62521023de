"""The one backend factory: :func:`open_backend` opens a model file or an export folder with the backend
that fits it and this machine.

This module never imports torch. ONNX Runtime, OpenVINO, TensorRT, cuda-python and (for ``torch-cuda``)
torch load lazily, when a backend that needs them is opened.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from virchow_rt._deps import is_importable
from virchow_rt.backends.base import Backend
from virchow_rt.backends.engine_cache import rebuild_command
from virchow_rt.contract import MANIFEST_NAME, Manifest
from virchow_rt.errors import BackendError, InputError, MissingDependency, ModelFileError, ParityError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt",
            "openvino", "openvino-bf16", "openvino-fp32", "tensorrt", "torch-cuda")  # fmt: skip
ENGINE_SUFFIXES = (".engine", ".plan")
_ORT_PROVIDERS = {"auto": "auto", "onnxruntime": "auto", "onnxruntime-cpu": "cpu",
                  "onnxruntime-cuda": "cuda", "onnxruntime-tensorrt": "tensorrt"}  # fmt: skip
_OPENVINO = {"openvino": "auto", "openvino-bf16": "bf16", "openvino-fp32": "fp32"}  # backend -> precision
#: which ONNX precision an export folder opens first (lowest); an unlisted precision ranks 1
_GPU_ORDER = {"fp16": 0, "fp32": 1, "int8": 2}
_CPU_ORDER = {"fp32": 0, "int8": 1, "fp16": 2}


def _ort_has_gpu() -> bool:
    if not is_importable("onnxruntime"):
        return False
    import onnxruntime

    gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    return bool(gpu & set(onnxruntime.get_available_providers()))


def _pick_from_folder(folder: Path, backend: str, engines: bool = True) -> Path:
    """The export folder's model to run: a TensorRT engine if asked for (or "auto" and usable), else ONNX."""
    manifest = Manifest.read(folder)
    # each path is refused unless inside the folder (no /abs, .., symlink out), listed or not usable here
    built = [f for f in (a.file(folder) for a in manifest.select("tensorrt")) if f.exists()]
    onnx = [a for a in manifest.select("onnx") if a.file(folder).exists()]
    if engines and built and (backend == "tensorrt" or (backend == "auto" and is_importable("tensorrt"))):
        return built[0]
    # fp16 first where ONNX Runtime will run on a GPU; on a CPU fp32 (ORT's CPU kernels are fp32; OpenVINO
    # compiles the fp32 graph to bf16 itself), then any other, fp16 only when nothing else is there (ORT
    # runs it on a CPU through casts, slower than fp32). Not the manifest's order: an export adds to it.
    if backend in _OPENVINO:  # OpenVINO compiles an fp32 graph only (precision not recorded: an older fp32)
        onnx = [a for a in onnx if a.precision in (None, "fp32")]
        if not onnx:
            raise ModelFileError(
                f"no fp32 ONNX in {folder}, and --backend {backend} runs only that; add it with "
                f"`{rebuild_command(manifest, folder, '--precision fp32')}`"
            )
    cpu_only = backend == "onnxruntime-cpu" or backend in _OPENVINO
    order = _GPU_ORDER if not cpu_only and _ort_has_gpu() else _CPU_ORDER
    onnx.sort(key=lambda a: order.get(a.precision, 1))
    if not onnx:
        raise ModelFileError(
            f"export folder {folder} has no usable model file for backend {backend!r} (manifest lists "
            f"{[a.path for a in manifest.artifacts]}); re-export: `virchow-rt export VARIANT --out {folder}`"
        )
    return onnx[0].file(folder)


def _openvino_bf16(path: Path, options: dict[str, Any]) -> Backend | None:
    """OpenVINO bf16 for an fp32 ONNX when OpenVINO is installed, the CPU has bf16 units (AMX / AVX-512
    BF16) and the bf16 parity gate passed; else None: ONNX Runtime runs it, as before OpenVINO (on an
    AVX2-only CPU it stays the default, so the default is never slower there than it was)."""
    if not is_importable("openvino"):
        return None
    from virchow_rt.backends.openvino import OpenVinoBackend, cpu_has_bf16

    if not cpu_has_bf16():
        return None
    accepted = inspect.signature(OpenVinoBackend).parameters
    try:
        return OpenVinoBackend(path, "bf16", **{k: v for k, v in options.items() if k in accepted})
    except ParityError as err:
        warnings.warn(f"{err}; running ONNX Runtime fp32 instead", stacklevel=4)
    except (BackendError, ModelFileError, MissingDependency) as err:  # e.g. no scikit-image for the gate
        log.warning("not running %s with OpenVINO bf16 (%s); running ONNX Runtime instead", path, err)
    return None


def _open_folder(folder: Path, backend: str, options: dict[str, Any], host_code: bool) -> Backend:
    """The backend for an export folder's best artifact here (see :func:`open_backend`)."""
    path = _pick_from_folder(folder, backend)
    # OpenVINO compiles an fp32 graph only (an int8 one where a folder has no fp32 stays with ORT)
    fp32 = getattr(Manifest.read(folder).artifact_for(path), "precision", None) in (None, "fp32")
    if backend == "auto" and path.suffix.lower() == ".onnx" and fp32 and not _ort_has_gpu():
        opened_ov = _openvino_bf16(path, options)
        if opened_ov is not None:
            return opened_ov
    if backend == "auto" and path.suffix.lower() in ENGINE_SUFFIXES:
        from virchow_rt.backends.onnxruntime import OnnxRuntimeBackend
        from virchow_rt.backends.tensorrt import TensorRTBackend

        try:
            return TensorRTBackend(path, allow_engine_host_code=host_code, **options)
        except (ModelFileError, BackendError, MissingDependency) as err:  # another TensorRT/GPU, no GPU
            engine = path
            try:
                path = _pick_from_folder(folder, backend, engines=False)
            except ModelFileError as missing:
                raise missing from err
            log.warning("not running %s (%s); running %s with ONNX Runtime instead", engine, err, path)
            accepted = inspect.signature(OnnxRuntimeBackend).parameters
            options = {k: v for k, v in options.items() if k in accepted}  # drop the TensorRT-only ones
    opened = open_backend(path, backend, allow_engine_host_code=host_code, **options)
    if opened.gpu is None and opened.info.precision == "fp16" and path.suffix.lower() == ".onnx":
        # ONNX Runtime lists a GPU provider but sees no GPU: on the CPU the fp32 model is the fast one
        fp32 = _pick_from_folder(folder, "onnxruntime-cpu", engines=False)
        if fp32 != path:
            opened.close()
            return open_backend(fp32, backend, **options)
    return opened


def open_backend(
    model_path: str | os.PathLike[str],
    backend: str = "auto",
    *,
    allow_engine_host_code: bool = False,
    **options: Any,
) -> Backend:
    """Open an exported model with the backend that fits its file type and this machine.

    ``.onnx`` -> ONNX Runtime (TensorRT EP, CUDA EP when available, else CPU); ``.engine``/``.plan`` ->
    native TensorRT; an export folder -> the artifact its manifest lists: an engine for "auto" when
    TensorRT is importable (falling back to the ONNX, with a warning, when this machine refuses the
    engine), else the fp16 ONNX where ONNX Runtime has a GPU provider, else the fp32 one: on a CPU run
    by OpenVINO in bf16 when it is installed, the CPU has bf16 units and the bf16 gate passed, else by
    ONNX Runtime. "openvino" runs an fp32 ONNX with OpenVINO on the CPU (bf16 where gated, else fp32;
    "openvino-bf16" refuses rather than fall back, "openvino-fp32" never tries bf16).
    "torch-cuda" -> the export's PyTorch module in fp16 on a GPU, run by the same CUDA pipeline as
    TensorRT (torch is imported only then; ``weights=`` where the export's are not on this machine).
    ``backend``: one of :data:`BACKENDS`. ``options`` go to the backend's constructor (e.g.
    ``threads``, ``optimize``, ``cache_dir``, ``io_binding`` for ONNX Runtime).
    ``allow_engine_host_code``: a version-compatible TensorRT engine (which runs host code stored in the
    file) is loaded only with it; a manifest's word is not enough (see ``backends.tensorrt``).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    path = Path(model_path)
    if backend == "torch-cuda":
        folder = path if path.is_dir() else path.parent
        if not (folder / MANIFEST_NAME).is_file():
            raise ModelFileError(
                f"the torch-cuda backend rebuilds a model from its export folder, and {folder} has no "
                f"{MANIFEST_NAME}; pass an export folder (virchow-rt export VARIANT --out DIR)"
            )
        from virchow_rt.backends.torch_cuda import TorchCudaBackend

        return TorchCudaBackend.from_export(folder, **options)
    if path.is_dir():
        return _open_folder(path, backend, options, allow_engine_host_code)
    suffix = path.suffix.lower()
    if suffix in ENGINE_SUFFIXES:
        if backend not in ("auto", "tensorrt"):
            raise InputError(
                f"backend {backend!r} cannot run the TensorRT engine {path.name}; use --backend tensorrt "
                "(or pass the .onnx file to run it with ONNX Runtime)"
            )
        from virchow_rt.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, allow_engine_host_code=allow_engine_host_code, **options)
    if suffix == ".onnx" and backend in _OPENVINO:
        from virchow_rt.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(path, _OPENVINO[backend], **options)
    if suffix == ".onnx":
        if backend == "tensorrt":
            raise InputError(
                f"backend 'tensorrt' runs TensorRT engines (.engine/.plan), not {path.name}; build one with "
                "`virchow-rt export VARIANT --tensorrt`, or use --backend onnxruntime-tensorrt"
            )
        from virchow_rt.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, _ORT_PROVIDERS[backend], **options)
    if not path.exists():
        raise ModelFileError(
            f"model file {path} does not exist; export one with `virchow-rt export VARIANT --out DIR`"
        )
    raise ModelFileError(
        f"{path} is not a model file virchow-rt runs (suffix {suffix or 'none'!r}); pass an .onnx file, "
        "a TensorRT .engine/.plan or an export folder"
    )


def open_reference(
    folder: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> Backend:
    """The fp32 PyTorch reference (timm's model and transform) of the model an export folder was made from.

    Its weights are those the manifest records, checked against their sha256 (or ``weights`` where they
    are now; random weights are drawn again from the same seed); ``device``: "cpu", "cuda" or None (a GPU
    when torch sees one). torch is imported now.
    """
    from virchow_rt._deps import optional_import
    from virchow_rt.backends.torch_reference import TorchBackend
    from virchow_rt.model.vit import load_export_model

    model, variant, info, _ = load_export_model(folder, weights)
    if device is None:
        device = (
            "cuda" if optional_import("torch", "for the PyTorch reference").cuda.is_available() else "cpu"
        )
    return TorchBackend(model, variant, "fp32", device=device, weights=info)
