"""fp32 ONNX export: uint8 tiles in, embeddings out, preprocessing inside the graph.

The exported graph takes ``tiles`` uint8 (batch, S, S, 3) HWC RGB, casts it to float first (TensorRT
takes uint8 only into a Cast), transposes to NCHW, normalises with one multiply-add ((x/255 - mean)/std folded
into x·scale + shift), runs timm's ``forward_features`` and returns ``embedding`` float32 (batch, 2D)
= class token ‖ mean of the patch tokens, plus ``patch_tokens`` (batch, P, D) when asked.

Export uses the legacy TorchScript exporter (``dynamo=False``) with a dynamic batch axis named
"batch" and opset 17 (a real ``LayerNormalization`` node). timm's fused attention is turned off for
the export so the graph holds plain MatMul/Softmax, which every ONNX consumer understands.
Models over the 2 GB protobuf limit (fp32 ViT-H is 2.5 GB) are saved with their weights in one
external data file, ``<name>.onnx.data``, beside the graph.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virchow_rt._deps import optional_import
from virchow_rt.contract import INPUT, SCHEMA_VERSION, ModelInfo, WeightsInfo
from virchow_rt.errors import InputError, ModelFileError
from virchow_rt.model.vit import ExportWrapper, check_outputs
from virchow_rt.registry import Variant

if TYPE_CHECKING:
    import torch
else:  # through the helper, so a missing package says how to install it
    torch = optional_import("torch", "to export ONNX models")
onnx = optional_import("onnx", "to export ONNX models")

OPSET = 17
INPUT_NAME = INPUT
BATCH_AXIS = "batch"
#: above this many bytes of weights the graph is saved with external data (protobuf caps a file at 2 GiB;
#: the margin leaves room for the graph itself)
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
_DTYPES = {
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
}


@contextlib.contextmanager
def exportable_attention(model: torch.nn.Module) -> Iterator[None]:
    """Turn timm's fused SDPA attention off for the export (plain MatMul/Softmax), then restore it."""
    modules: list[Any] = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    saved = [(m, bool(m.fused_attn)) for m in modules]
    try:
        for module, _ in saved:
            module.fused_attn = False
        yield
    finally:
        for module, value in saved:
            module.fused_attn = value


def onnx_metadata(variant: Variant, precision: str, weights: WeightsInfo) -> dict[str, str]:
    """The ``metadata_props`` that make an exported file self-describing (:meth:`ModelInfo.from_onnx`)."""
    info = ModelInfo.from_variant(variant, precision, weights)
    return {**info.onnx_metadata(), "virchow_rt.manifest_schema": str(SCHEMA_VERSION)}


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    """Replace ``virchow_rt.*`` metadata_props of ``proto`` with ``metadata`` (other keys are kept)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def io_spec(variant: Variant, outputs: Sequence[str] = ("embedding",)) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the exported graph as manifest entries: name, dtype, shape ("batch": dynamic)."""
    size, d = variant.preprocess.size, variant.width
    shapes = {
        "embedding": [BATCH_AXIS, variant.embedding_dim()],
        "patch_tokens": [BATCH_AXIS, variant.num_patches, d],
    }
    inputs = [{"name": INPUT_NAME, "dtype": "uint8", "shape": [BATCH_AXIS, size, size, 3]}]
    return inputs, [
        {"name": name, "dtype": "float32", "shape": shapes[name]} for name in check_outputs(outputs)
    ]


def declare_output_shapes(proto: Any, variant: Variant, outputs: Sequence[str]) -> None:
    """Write the static output sizes into the graph (the tracer leaves the patch count symbolic)."""
    wanted = {spec["name"]: spec["shape"] for spec in io_spec(variant, outputs)[1]}
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, wanted[value.name], strict=True):
            if isinstance(size, int):
                dim.dim_value = size  # setting dim_value clears a dim_param (protobuf oneof)
            else:
                dim.dim_param = size


def weights_bytes(proto: Any) -> int:
    """Bytes of the initializers held in ``proto`` (decides whether external data is needed)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def save_onnx(proto: Any, path: str | os.PathLike) -> str | None:
    """Save ``proto`` at ``path``; weights go to ``<name>.data`` beside it when they pass 2 GB.

    Returns the external data file name, or None. Any stale data file of that name is replaced.
    """
    path = Path(path)
    data_name = f"{path.name}.data"
    (path.parent / data_name).unlink(missing_ok=True)  # save_model appends to an existing data file
    if weights_bytes(proto) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path))
        return None
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    # onnx creates the data file private (0600): give it the graph file's permissions so both are shareable
    os.chmod(path.parent / data_name, stat.S_IMODE(path.stat().st_mode))
    return data_name


def check_onnx(path: str | os.PathLike, variant: Variant, outputs: Sequence[str] = ("embedding",)) -> None:
    """ONNX checker with shape inference (path-based: fine beyond 2 GB), then the graph's I/O contract."""
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as err:  # noqa: BLE001 - checker and shape inference raise several types
        raise ModelFileError(f"exported {path} fails the ONNX checker ({type(err).__name__}: {err})") from err
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    want_in, want_out = io_spec(variant, outputs)
    for kind, declared, wanted in (("input", graph.input, want_in), ("output", graph.output, want_out)):
        got = [
            {
                "name": v.name,
                "dtype": _DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in declared
        ]
        if got != wanted:
            raise ModelFileError(
                f"exported {path} has {kind}s {got}, expected {wanted}; this is an export bug"
            )


def export_onnx(
    model: torch.nn.Module,
    variant: Variant,
    path: str | os.PathLike,
    *,
    weights: WeightsInfo,
    outputs: Sequence[str] = ("embedding",),
    opset: int = OPSET,
) -> str | None:
    """Export ``model`` (timm backbone, eval mode, CPU) as an fp32 ONNX graph at ``path`` and check it.

    Writes ``path`` (and ``<name>.data`` beside it for models over 2 GB) directly: callers that need an
    atomic result export into a staging folder. Returns the external data file name, or None.
    """
    if opset < 17:
        raise InputError(f"opset {opset} has no LayerNormalization node; use opset >= 17")
    path = Path(path)
    wrapper = ExportWrapper(model, variant, outputs).eval()
    size = variant.preprocess.size
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: the tracer must not specialise on 1
    names = list(wrapper.outputs)
    # the legacy exporter writes one file per tensor for big models: keep those in a scratch folder
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with exportable_attention(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the legacy exporter is chosen on purpose (dynamic batch via dynamic_axes, no torch.export)
            warnings.filterwarnings(
                "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(raw),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={name: {0: BATCH_AXIS} for name in [INPUT_NAME, *names]},
                opset_version=opset,
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw))  # pulls in any external data the exporter wrote
    set_metadata(proto, onnx_metadata(variant, "fp32", weights))
    declare_output_shapes(proto, variant, outputs)
    proto.doc_string = (
        f"virchow-rt export of {variant.name}: uint8 tiles (batch, S, S, 3) -> embedding (batch, 2D)"
    )
    data_name = save_onnx(proto, path)
    del proto
    check_onnx(path, variant, outputs)
    return data_name
