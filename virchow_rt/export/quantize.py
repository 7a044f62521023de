"""int8 ONNX for the CPU: ONNX Runtime's dynamic quantization of the fp32 export, with a plan it follows.

The plan (:data:`INT8_PLAN`, written into the manifest and checked by walking the graph): every
MatMul whose second input is a weight (the qkv, attention output and MLP projections, about 98% of a
ViT's FLOPs) runs in int8, weights quantized per output channel (symmetric int8), activations
quantized per tensor at run time (``DynamicQuantizeLinear``; on AVX-512 VNNI ONNX Runtime fuses the pair
into ``DynamicQuantizeMatMul``). Everything else stays fp32: the input normalisation, the patch
embedding (Conv), the attention matmuls between activations (q·kᵀ, softmax·v), LayerNormalization,
Softmax, the pooling ReduceMean and the output. ONNX Runtime's own quantizer does the work
(``onnxruntime.quantization.quantize_dynamic``), no hand-written graph surgery.

Dynamic per-tensor activation scales follow each batch's range, so a model whose residual stream has a
massive-activation channel (trained DINOv2-family models do) can lose precision in the other channels:
the int8 parity gate (min cosine and 10-NN overlap against the fp32 reference on real tissue) decides,
and an export that misses it fails loudly, as fp16 does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virchow_rt._deps import optional_import
from virchow_rt.contract import WeightsInfo
from virchow_rt.errors import ModelFileError
from virchow_rt.export.onnx_export import check_onnx, onnx_metadata, save_onnx, set_metadata
from virchow_rt.registry import Variant

onnx = optional_import("onnx", "to export ONNX models")


@dataclass(frozen=True)
class Int8Plan:
    """What runs in int8 and what stays fp32 (recorded in the manifest, verified on the graph)."""

    quantized_ops: tuple[str, ...] = ("MatMul",)  # with a constant (weight) second input only
    weights: str = "int8, symmetric, per output channel"
    activations: str = "dynamic, per tensor, at run time (DynamicQuantizeLinear)"
    fp32_ops: tuple[str, ...] = ("LayerNormalization", "Softmax", "ReduceMean", "Conv")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


INT8_PLAN = Int8Plan()
_INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def quantize_int8(
    fp32_path: str | os.PathLike, path: str | os.PathLike, variant: Variant, *, weights: WeightsInfo,
    outputs: tuple[str, ...] = ("embedding",),
) -> tuple[str | None, dict[str, Any]]:  # fmt: skip
    """Quantize the fp32 ONNX at ``fp32_path`` into ``path`` by :data:`INT8_PLAN`; check and verify it.

    Returns (external data file name or None, the verified op counts).
    """
    quantization = optional_import("onnxruntime.quantization", "to export int8 ONNX models")
    with tempfile.TemporaryDirectory(prefix="virchow-rt-int8-") as scratch, _quiet_root_logger():
        raw = Path(scratch) / "int8.onnx"
        quantization.quantize_dynamic(
            model_input=os.fspath(fp32_path),
            model_output=os.fspath(raw),
            op_types_to_quantize=list(INT8_PLAN.quantized_ops),
            per_channel=True,
            reduce_range=False,
            weight_type=quantization.QuantType.QInt8,
            use_external_data_format=True,  # the quantizer's own files: read back below, saved by save_onnx
            extra_options={"MatMulConstBOnly": True},  # attention's activation x activation stays fp32
        )
        proto = onnx.load(os.fspath(raw))
    set_metadata(proto, onnx_metadata(variant, "int8", weights))
    data_name = save_onnx(proto, Path(path))
    del proto
    check_onnx(path, variant, outputs)
    return data_name, verify_int8_plan(path)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Drop the quantizer's ``WARNING:root:Please consider to run pre-processing`` for this call only.

    ONNX Runtime logs it on the root logger on every call; its advice (shape inference and graph
    optimisation first) does not apply here: the plan is verified on the graph and the parity gate
    measures the result. A handler is held on the root logger meanwhile, because ``logging.warning``
    would otherwise install a console handler for the rest of the process (``basicConfig``)."""
    root, handler = logging.getLogger(), logging.NullHandler()

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")

    root.addHandler(handler)
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        root.removeHandler(handler)


def verify_int8_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Op counts of an int8 graph, checked against :data:`INT8_PLAN`: no weight MatMul left in fp32."""
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    ops = Counter(n.op_type for n in graph.node)
    float_weight_matmuls = [
        n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in constants
    ]
    int8 = sum(ops[op] for op in _INT8_OPS)
    if float_weight_matmuls or int8 == 0:
        raise ModelFileError(
            f"the int8 graph {Path(path).name} does not follow its plan: {int8} int8 matmuls, "
            f"{len(float_weight_matmuls)} weight MatMuls left in fp32 "
            f"({', '.join(float_weight_matmuls[:4])}); report this line as a bug"
        )
    return {
        "int8_matmuls": int8,
        "fp32_activation_matmuls": ops["MatMul"],
        "fp32_nodes": {op: ops[op] for op in INT8_PLAN.fp32_ops if ops[op]},
    }
