"""What a TensorRT build starts from: the batch profile, network flags, the timing cache file, the ONNX
as TensorRT's parser takes it, and the fp32 reference the engine's parity is measured against.

None of it needs TensorRT, so all of it is unit-tested on the CPU; :mod:`.tensorrt_build` uses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from virchow_rt._deps import is_importable, optional_import
from virchow_rt.backends.base import Backend
from virchow_rt.backends.engine_cache import check_version, release
from virchow_rt.backends.open import open_backend, open_reference
from virchow_rt.contract import INPUT, Artifact, Manifest
from virchow_rt.errors import InputError, ModelFileError, VirchowError
from virchow_rt.files import sha256_file
from virchow_rt.registry import BatchProfile, Variant

PURPOSE = "to build TensorRT engines"


def engine_name(variant: Variant) -> str:
    return f"{variant.name}.fp16.engine"


def resolve_profile(
    variant: Variant,
    max_batch: int | None = None,
    profile: BatchProfile | Mapping[str, int] | Sequence[int] | None = None,
) -> BatchProfile:
    """The batch optimization profile: the variant's, replaced by ``profile``, its max set by ``max_batch``.

    ``max_batch`` also lowers min and opt when they exceed it. Raises :class:`InputError` unless
    1 <= min <= opt <= max.
    """
    base = variant.batch
    if profile is not None:
        try:
            if isinstance(profile, BatchProfile):
                base = profile
            elif isinstance(profile, Mapping):
                base = BatchProfile(int(profile["min"]), int(profile["opt"]), int(profile["max"]))
            else:
                lo, opt, hi = (int(v) for v in profile)
                base = BatchProfile(lo, opt, hi)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"batch profile {profile!r} is not (min, opt, max) or {{min, opt, max}} ({err})"
            ) from err
    if max_batch is not None:
        if int(max_batch) < 1:
            raise InputError(f"max_batch is {max_batch}; use a positive batch size")
        base = BatchProfile(min(base.min, int(max_batch)), min(base.opt, int(max_batch)), int(max_batch))
    if not 1 <= base.min <= base.opt <= base.max:
        raise InputError(
            f"batch profile min={base.min}, opt={base.opt}, max={base.max} is invalid; "
            "need 1 <= min <= opt <= max"
        )
    return base


def network_flags(version: str, strongly_typed_bit: Callable[[], int]) -> int:
    """``create_network`` flags for TensorRT ``version``: strongly typed on 10.x, nothing on 11+.

    ``strongly_typed_bit`` is called only on 10.x (TensorRT 11 made strong typing implicit), so
    nothing is probed on a version that may not have the flag.
    """
    major = check_version(version)[0]
    return 0 if major >= 11 else 1 << strongly_typed_bit()


def default_timing_cache(tensorrt_version: str, compute_capability: str) -> Path:
    """Per-user timing cache for one TensorRT release and GPU architecture.

    The folder is ``$VIRCHOW_RT_CACHE`` or ``~/.cache/virchow-rt``.
    """
    root = Path(os.environ.get("VIRCHOW_RT_CACHE") or Path.home() / ".cache" / "virchow-rt")
    major, minor, patch = release(tensorrt_version)
    return (
        root / "tensorrt" / f"timing-trt{major}.{minor}.{patch}-sm{compute_capability.replace('.', '')}.cache"
    )


def cast_input_first(onnx_path: Path) -> bytes | None:
    """The graph with a Cast to float32 straight after the uint8 input, or None when it already starts so.

    TensorRT takes uint8 only as a network input or output, consumed by a Cast (onnx-tensorrt's operator
    matrix: Transpose has no UINT8); an export that transposes the uint8 tiles before widening them
    (cheaper in ONNX Runtime) is rewritten here. The later Cast then casts float32 to float32, a no-op.
    Weights stay where they are: external data is not loaded, and the parser finds it from the path.
    """
    onnx = optional_import("onnx", PURPOSE)
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    consumers = [node for node in model.graph.node if INPUT in node.input]
    if all(node.op_type == "Cast" for node in consumers):
        return None
    widened = f"{INPUT}_float32"
    for node in consumers:
        node.input[:] = [widened if name == INPUT else name for name in node.input]
    widen = onnx.helper.make_node(
        "Cast", [INPUT], [widened], to=onnx.TensorProto.FLOAT, name="virchow_rt_cast_tiles"
    )
    model.graph.node.insert(0, widen)
    # tensors between the input and the old Cast are float32 now: drop their recorded uint8 types
    kept = [v for v in model.graph.value_info if v.type.tensor_type.elem_type != onnx.TensorProto.UINT8]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return bytes(model.SerializeToString())


def torch_reference(folder: Path) -> tuple[Backend, str] | None:
    """The fp32 PyTorch reference rebuilt from the export's weights, if torch is here and they are found."""
    if not (is_importable("torch") and is_importable("timm")):
        return None
    try:
        return open_reference(folder), "torch-eager-fp32"
    except VirchowError:  # the weights are not on this machine, or not those the ONNX was made from
        return None


def parity_reference(manifest: Manifest, folder: Path, given: Backend | None) -> tuple[Backend, str]:
    """The fp32 backend an engine is measured against, with its label: ``given``, else PyTorch rebuilt
    from the manifest's weights, else the export's fp32 ONNX in ONNX Runtime on the CPU."""
    if given is not None:
        return given, given.name
    rebuilt = torch_reference(folder)
    if rebuilt is not None:
        return rebuilt
    fp32 = next(iter(manifest.select("onnx", "fp32")), None)
    fp32_file = None if fp32 is None else fp32.file(folder)
    if fp32 is None or fp32_file is None or not fp32_file.is_file():
        raise ModelFileError(
            f"no fp32 reference for the engine's parity check: torch cannot rebuild the weights and {folder} "
            "has no fp32 ONNX; export fp32 too, or pass reference= (a TorchBackend)"
        )
    backend: Backend = open_backend(fp32_file, backend="onnxruntime-cpu")
    return backend, f"onnxruntime-cpu fp32 ONNX ({fp32.parity_summary or 'unchecked'})"


def checked_onnx(onnx_path: Path) -> tuple[Manifest, Artifact, str, str | None]:
    """(manifest, fp16 ONNX entry, graph sha256, external data sha256 or None), verified against the files."""
    manifest = Manifest.read(onnx_path.parent)
    source = manifest.artifact_for(onnx_path)
    if source is None or source.format != "onnx" or source.precision != "fp16":
        raise InputError(
            f"{onnx_path} is not the fp16 ONNX of its manifest; build the engine from <variant>.fp16.onnx"
        )
    graph_sha = sha256_file(onnx_path)
    data = source.data_file(onnx_path.parent)
    data_sha = sha256_file(data) if data else None
    if graph_sha != source.sha256 or (data and data_sha != source.extra.get("external_data_sha256")):
        raise ModelFileError(
            f"{onnx_path.name} (or its external data) changed since it was exported; re-export it"
        )
    return manifest, source, graph_sha, data_sha
