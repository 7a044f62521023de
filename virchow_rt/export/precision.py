"""fp16 ONNX with an explicit precision plan that a strongly typed TensorRT build follows as written.

TensorRT 11 builds strongly typed networks only: the types in the ONNX graph *are* the engine's
precision. So the fp16 graph carries its plan in its types, with explicit Cast nodes:

* fp16: every weight of MatMul/Gemm/Conv, the matrix products, the elementwise ops and activations;
* fp32: LayerNormalization (fp16 LayerNorm overflows after attention), Softmax, the ReduceMean of the
  pooling, the input normalisation (uint8 -> float multiply-add, before the patch embedding) and the
  pooling head after the final LayerNorm, so the embedding is never rounded to fp16.

The conversion itself is ONNX Runtime's well-kept converter (``convert_float_to_float16`` with
``op_block_list``/``node_block_list`` and ``keep_io_types``). Two small clean-ups follow it: the
converter casts each blocked node's output to fp16 and the next blocked node's input back to fp32, so
adjacent fp32 nodes would round-trip through fp16 -- those Cast pairs are removed; and it appends the
Casts it adds at the end of the node list, so the graph is re-sorted topologically (the ONNX checker
and TensorRT require that). :func:`verify_precision_plan` then walks the result and proves the plan.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virchow_rt._deps import optional_import
from virchow_rt.contract import WeightsInfo
from virchow_rt.errors import ModelFileError
from virchow_rt.export.onnx_export import check_onnx, onnx_metadata, save_onnx, set_metadata
from virchow_rt.registry import Variant

onnx = optional_import("onnx", "to convert ONNX models to fp16")

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
#: ops of the input normalisation (between the uint8 graph input and the patch-embedding Conv)
_INPUT_OPS = frozenset({"Transpose", "Cast", "Mul", "Add", "Sub", "Div"})
#: ops that only pass values on; kept fp32 when everything they feed is fp32
_FEEDER_OPS = frozenset({"Constant", "Identity"})


@dataclass(frozen=True)
class PrecisionPlan:
    """Which parts of the fp16 graph compute in which type; recorded in the manifest."""

    weights: str = "float16"  # MatMul/Gemm/Conv weights
    compute: str = "float16"  # MatMul/Gemm/Conv, elementwise ops, activations
    fp32_ops: tuple[str, ...] = ("LayerNormalization", "Softmax", "ReduceMean")
    fp16_ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    # uint8 -> (x * scale + shift) in fp32, cast to fp16 before the patch-embedding Conv
    fp32_input_normalization: bool = True
    # everything after the final LayerNorm: class token, patch mean, concat
    fp32_pooling_head: bool = True
    outputs: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        ort = optional_import("onnxruntime", "to convert ONNX models to fp16")
        return {
            **asdict(self),
            "converter": "onnxruntime.transformers.float16.convert_float_to_float16 "
            f"(onnxruntime {ort.__version__})",
            "casts": "explicit Cast nodes at every fp16/fp32 boundary (strongly typed TensorRT follows them)",
        }


DEFAULT_PLAN = PrecisionPlan()


def _cast_to(node: Any) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _forward_closure(graph: Any, start: str, allowed: frozenset[str] | None = None) -> list[Any]:
    """Nodes reachable from tensor ``start`` (only through ``allowed`` op types, when given)."""
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    seen: dict[int, Any] = {}
    frontier = [start]
    while frontier:
        for node in consumers[frontier.pop()]:
            if id(node) not in seen and (allowed is None or node.op_type in allowed):
                seen[id(node)] = node
                frontier.extend(node.output)
    return list(seen.values())


def _region_nodes(graph: Any, plan: PrecisionPlan) -> list[Any]:
    """Nodes of the input normalisation and the pooling head, when the plan keeps them in fp32."""
    nodes: list[Any] = []
    if plan.fp32_input_normalization:
        for graph_input in graph.input:
            nodes += _forward_closure(graph, graph_input.name, _INPUT_OPS)
    if plan.fp32_pooling_head:
        norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
        if not norms:
            raise ModelFileError("the graph has no LayerNormalization node; export with opset >= 17")
        # nodes are topologically sorted: the last LayerNormalization is the final norm
        nodes += _forward_closure(graph, norms[-1].output[0])
    return nodes


def fp32_region_nodes(graph: Any, plan: PrecisionPlan = DEFAULT_PLAN) -> list[str]:
    """Names of the nodes the plan keeps in fp32 beyond its op types.

    The input normalisation and the pooling head, plus the Constant/Identity nodes that feed only
    fp32 nodes: the converter would otherwise round their values (e.g. the normalisation scale) to fp16.
    """
    blocked = {n.name for n in _region_nodes(graph, plan)}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    changed = True
    while changed:  # a feeder can feed another feeder: repeat until nothing changes
        changed = False
        for node in graph.node:
            if node.name in blocked or node.op_type not in _FEEDER_OPS:
                continue
            users = [u for out in node.output for u in consumers[out]]
            if users and all(u.name in blocked or u.op_type in plan.fp32_ops for u in users):
                blocked.add(node.name)
                changed = True
    assert all(blocked), "the exporter names every node; an unnamed node cannot be put on the block list"
    return sorted(blocked)


def _tensor_types(graph: Any) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _find_round_trip(graph: Any) -> tuple[Any, Any] | None:
    producer = {out: node for node in graph.node for out in node.output}
    types = _tensor_types(graph)
    for back in graph.node:  # Cast(to fp32) of Cast(to fp16) of an fp32 tensor: a lossy no-op
        if back.op_type != "Cast" or _cast_to(back) != FLOAT:
            continue
        down = producer.get(back.input[0])
        if down is not None and down.op_type == "Cast" and _cast_to(down) == FLOAT16:
            if types.get(down.input[0]) == FLOAT and down.input[0] in producer:
                return down, back
    return None


def remove_round_trip_casts(graph: Any) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs between adjacent fp32 nodes; returns how many were removed."""
    removed = 0
    graph_outputs = {o.name for o in graph.output}
    while pair := _find_round_trip(graph):
        down, back = pair
        source, target = down.input[0], back.output[0]
        if target in graph_outputs:  # the fp32 producer writes the graph output directly
            old, new = source, target
        else:  # consumers of the round trip read the fp32 tensor instead
            old, new = target, source
        graph.node.remove(back)
        for node in graph.node:
            for seq in (node.input, node.output):
                for i, name in enumerate(seq):
                    if name == old:
                        seq[i] = new
        if not any(down.output[0] in n.input for n in graph.node) and down.output[0] not in graph_outputs:
            graph.node.remove(down)
        removed += 1
    live = {name for node in graph.node for name in node.output}
    stale = [v for v in graph.value_info if v.name not in live]
    for v in stale:
        graph.value_info.remove(v)
    return removed


def toposort(graph: Any) -> None:
    """Sort ``graph.node`` topologically in place, keeping the original order where it is already valid."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    deps = [{producer[name] for name in node.input if name in producer} - {i} for i, node in enumerate(nodes)]
    users: dict[int, list[int]] = defaultdict(list)
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ModelFileError("the fp16 graph has a cycle after conversion; this is an export bug")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def verify_precision_plan(
    model: str | os.PathLike | Any, plan: PrecisionPlan = DEFAULT_PLAN
) -> dict[str, Any]:
    """Walk an fp16 graph and prove it follows ``plan``; returns op counts per type (for the manifest).

    Checks that every ``plan.fp32_ops`` node reads and writes fp32 only, every ``plan.fp16_ops`` node
    computes in fp16 with fp16 weights, the input normalisation and pooling head compute in fp32, no
    fp32 -> fp16 -> fp32 round trip is left, and the outputs are fp32.
    """
    proto = (
        model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)
    )
    graph = onnx.shape_inference.infer_shapes(proto, strict_mode=True).graph
    types = _tensor_types(graph)
    initializers = {t.name for t in graph.initializer}
    problems: list[str] = []
    counts: dict[str, Counter] = {"float32": Counter(), "float16": Counter()}
    for node in graph.node:
        floats = [types.get(n) for n in [*node.input, *node.output] if types.get(n) in (FLOAT, FLOAT16)]
        if node.op_type in plan.fp32_ops:
            if not floats or any(t != FLOAT for t in floats):
                problems.append(f"{node.op_type} {node.name} is not fp32")
            counts["float32"][node.op_type] += 1
        elif node.op_type in plan.fp16_ops:
            weights = [n for n in node.input if n in initializers]
            if types.get(node.input[0]) != FLOAT16 or any(types.get(w) != FLOAT16 for w in weights):
                problems.append(f"{node.op_type} {node.name} is not fp16 with fp16 weights")
            counts["float16"][node.op_type] += 1
    # the input normalisation and the pooling head compute in fp32 (their boundary Casts aside)
    for node in _region_nodes(graph, plan):
        if node.op_type != "Cast" and any(types.get(n) == FLOAT16 for n in [*node.input, *node.output]):
            problems.append(
                f"{node.op_type} {node.name} of the fp32 input normalisation / pooling head is fp16"
            )
    if _find_round_trip(graph) is not None:
        problems.append("an fp32 -> fp16 -> fp32 Cast round trip is left")
    problems += [
        f"output {o.name} is not fp32" for o in graph.output if o.type.tensor_type.elem_type != FLOAT
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ModelFileError(f"fp16 graph does not follow its precision plan: {shown}; this is an export bug")
    return {
        "fp32_nodes": dict(counts["float32"]),
        "fp16_nodes": dict(counts["float16"]),
        "casts": sum(n.op_type == "Cast" for n in graph.node),
    }


def convert_fp16(
    fp32_path: str | os.PathLike,
    path: str | os.PathLike,
    variant: Variant,
    *,
    weights: WeightsInfo,
    outputs: Sequence[str] = ("embedding",),
    plan: PrecisionPlan = DEFAULT_PLAN,
) -> tuple[str | None, dict[str, Any]]:
    """Convert the fp32 ONNX at ``fp32_path`` to fp16 at ``path`` following ``plan``; check and verify it.

    Returns (external data file name or None, the verified op counts). Writes ``path`` directly: callers
    that need an atomic result convert into a staging folder.
    """
    f16 = optional_import("onnxruntime.transformers.float16", "to convert ONNX models to fp16")
    blocked = fp32_region_nodes(onnx.load(os.fspath(fp32_path), load_external_data=False).graph, plan)
    # given a path, the converter runs path-based shape inference (fine beyond 2 GB) before converting
    proto = f16.convert_float_to_float16(
        os.fspath(fp32_path),
        keep_io_types=True,
        op_block_list=list(plan.fp32_ops),
        node_block_list=blocked,
    )
    remove_round_trip_casts(proto.graph)
    toposort(proto.graph)
    set_metadata(proto, onnx_metadata(variant, "fp16", weights))
    data_name = save_onnx(proto, Path(path))
    del proto
    check_onnx(path, variant, outputs)
    return data_name, verify_precision_plan(path, plan)
