"""The fp16 precision plan, proven by walking the graph (independently of verify_precision_plan)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from virchow_rt.errors import ModelFileError
from virchow_rt.export.precision import DEFAULT_PLAN, remove_round_trip_casts, toposort, verify_precision_plan
from virchow_rt.registry import get_variant

FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _typed(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return model, types


def test_fp16_graph_follows_the_plan(tiny_export):
    name, out, manifest = tiny_export
    model, types = _typed(out / f"{name}.fp16.onnx")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    seen = {"LayerNormalization": 0, "Softmax": 0, "ReduceMean": 0, "MatMul": 0, "Conv": 0}
    for node in graph.node:
        floats = [types[t] for t in [*node.input, *node.output] if types.get(t) in (FP32, FP16)]
        if node.op_type in ("LayerNormalization", "Softmax", "ReduceMean"):
            assert floats and set(floats) == {FP32}, f"{node.name} is not fp32: {floats}"
            seen[node.op_type] += 1
        if node.op_type in ("MatMul", "Conv"):
            weights = [t for t in node.input if t in inits]
            assert types[node.input[0]] == FP16 and all(inits[w].data_type == FP16 for w in weights), (
                node.name
            )
            seen[node.op_type] += 1
    depth = get_variant(name).model_args["depth"]
    assert seen == {
        "LayerNormalization": 2 * depth + 1,
        "Softmax": depth,
        "ReduceMean": 1,
        "MatMul": 6 * depth,
        "Conv": 1,
    }
    # outputs come straight from fp32 nodes, never through an fp16 rounding
    for output in graph.output:
        assert types[output.name] == FP32 and producer[output.name].op_type != "Cast"
    # input normalisation: uint8 -> fp32 multiply-add with unrounded fp32 constants, then one Cast to fp16
    cast_in = next(
        n for n in graph.node if n.op_type == "Cast" and types.get(n.input[0]) == TensorProto.UINT8
    )
    assert types[cast_in.output[0]] == FP32
    # uint8 is cast first (TensorRT takes uint8 only into a Cast), then NHWC -> NCHW in fp32
    transpose = next(n for n in graph.node if cast_in.output[0] in n.input)
    assert transpose.op_type == "Transpose" and types[transpose.output[0]] == FP32
    mul = next(n for n in graph.node if transpose.output[0] in n.input)
    add = next(n for n in graph.node if mul.output[0] in n.input)
    assert (mul.op_type, add.op_type) == ("Mul", "Add") and types[add.output[0]] == FP32
    scale = next(
        helper.get_attribute_value(n.attribute[0])
        for n in graph.node
        if n.output[0] in mul.input and n.op_type == "Constant"
    )
    std = np.array(get_variant(name).preprocess.std, np.float32)
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(scale).ravel(), (1.0 / (255.0 * std)).astype(np.float32)
    )
    assert manifest.artifacts[1].extra["precision_plan"]["fp32_ops"] == list(DEFAULT_PLAN.fp32_ops)


def test_plan_verifier_rejects_a_plain_fp16_conversion(tiny_export, tmp_path):
    """Without the block lists, LayerNorm and Softmax go fp16: the verifier must say so."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    name, out, _ = tiny_export
    plain = convert_float_to_float16(str(out / f"{name}.fp32.onnx"), keep_io_types=True)
    with pytest.raises(ModelFileError, match="LayerNormalization .* is not fp32"):
        verify_precision_plan(plain)
    with pytest.raises(ModelFileError, match="MatMul .* is not fp16"):
        verify_precision_plan(onnx.load(str(out / f"{name}.fp32.onnx")))


def _ln_model(nodes):
    x = helper.make_tensor_value_info("x", FP32, [2, 4])
    y = helper.make_tensor_value_info("y", FP32, [2, 4])
    scale = helper.make_tensor("scale", FP32, [4], [1.0, 2.0, 3.0, 4.0])
    bias = helper.make_tensor("bias", FP32, [4], [0.1, 0.2, 0.3, 0.4])
    vi = [helper.make_tensor_value_info("n", FP32, [2, 4]), helper.make_tensor_value_info("h", FP16, [2, 4])]
    graph = helper.make_graph(nodes, "g", [x], [y], [scale, bias], value_info=vi)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_round_trip_casts_are_removed_and_order_restored():
    nodes = [  # deliberately out of order, with a lossy fp32 -> fp16 -> fp32 round trip before the output
        helper.make_node("Cast", ["h"], ["y"], to=FP32, name="back"),
        helper.make_node("Cast", ["n"], ["h"], to=FP16, name="down"),
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"], name="ln"),
    ]
    model = _ln_model(nodes)
    assert remove_round_trip_casts(model.graph) == 1
    toposort(model.graph)
    onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in model.graph.node] == ["ln"] and list(model.graph.node[0].output) == ["y"]
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32) * 1000
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    mean, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * [1, 2, 3, 4] + [0.1, 0.2, 0.3, 0.4]
    np.testing.assert_allclose(
        got, expected, rtol=1e-5, atol=1e-5
    )  # fp32 accuracy: nothing went through fp16
