"""Tiny ONNX models with the virchow-rt I/O contract, built with onnx.helper (no torch, no export code).

The graph: uint8 tiles (B, S, S, 3) -> Cast -> ReduceMean over H, W -> x/255 @ W -> Tanh -> embedding
(B, 2·width). Its exact output is :func:`expected_embedding`, so tests can check values and order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH = 8
TILE = 224


def weights(width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3, 2 * width)).astype(np.float32)  # (3, E)


def expected_embedding(tiles: np.ndarray, width: int = WIDTH) -> np.ndarray:
    """What the tiny model computes, in float64: tanh(mean RGB / 255 @ W) -> (N, 2·width)."""
    mean_rgb = tiles.astype(np.float64).mean(axis=(1, 2)) / 255.0  # (N, 3)
    return np.tanh(mean_rgb @ weights(width).astype(np.float64))  # (N, E)


def metadata(
    variant: str = "virchow2-tiny", precision: str = "fp32", random: bool = True, width: int = WIDTH
) -> dict:
    return {
        "virchow_rt.variant": variant,
        "virchow_rt.width": str(width),
        "virchow_rt.embedding_dim": str(2 * width),
        "virchow_rt.tile_size": str(TILE),
        "virchow_rt.precision": precision,
        "virchow_rt.random_weights": "true" if random else "false",
        "virchow_rt.weights_sha256": "random" if random else "ab" * 32,
        "virchow_rt.manifest_schema": "1",
    }


def _save(path: str | Path, name: str, nodes: list, inits: list, width: int, meta: dict) -> Path:
    """Wrap ``nodes`` into a checked model with the contract's I/O and ``meta`` as metadata_props; save it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", TILE, TILE, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 2 * width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def build_tiny_onnx(
    path: str | Path,
    precision: str = "fp32",
    with_metadata: bool = True,
    random: bool = True,
    variant: str = "virchow2-tiny",
    width: int = WIDTH,
) -> Path:
    """Write the tiny model to ``path`` (fp16: every op after the first Cast runs in float16)."""
    from onnx import TensorProto, helper, numpy_helper

    fp16 = precision == "fp16"
    ftype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    w = weights(width).astype(np.float16 if fp16 else np.float32)
    nodes = [
        helper.make_node("Cast", ["tiles"], ["x"], to=ftype),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),  # (B, 3)
        helper.make_node("Mul", ["mean", "inv255"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "W"], ["hidden"]),  # (B, E)
        helper.make_node("Tanh", ["hidden"], ["act"]),
        helper.make_node("Cast", ["act"], ["embedding"], to=TensorProto.FLOAT),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array(1 / 255, w.dtype), "inv255"),
        numpy_helper.from_array(w, "W"),
    ]
    meta = metadata(variant, precision, random, width) if with_metadata else {}
    return _save(path, "virchow_rt_tiny", nodes, inits, width, meta)


def build_attention_onnx(
    path: str | Path, width: int = 16, heads: int = 2, scale: float | list[float] | None = None
) -> Path:
    """A one-block model with timm's packed-qkv attention pattern, as torch exports it (for the fusion).

    tiles -> mean over W -> tokens (B, 224, 3) -> (B, 224, D) -> x + proj(attention(x)) -> class ‖ mean.
    ``scale``: q's factor (default timm's 1/sqrt(head dim)); a list (one per head channel) is a pattern
    the fusion cannot express, so its check must refuse the fused graph.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    hd = width // heads

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array, name)

    inits = [
        init("axis_w", np.array([2], np.int64)),
        init("inv255", np.array(1 / 255, np.float32)),
        init("W_embed", rng.standard_normal((3, width)).astype(np.float32)),
        init("W_qkv", (rng.standard_normal((width, 3 * width)) / np.sqrt(width)).astype(np.float32)),
        init("b_qkv", (0.1 * rng.standard_normal(3 * width)).astype(np.float32)),
        init("shape5", np.array([0, 0, 3, heads, hd], np.int64)),
        init("split3", np.array([1, 1, 1], np.int64)),
        init("axis0", np.array([0], np.int64)),
        init("scale", np.array(hd**-0.5 if scale is None else scale, np.float32)),  # () or (hd,)
        init("shape3", np.array([0, 0, width], np.int64)),
        init("W_proj", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)),
        init("start0", np.array([0], np.int64)),
        init("start1", np.array([1], np.int64)),
        init("end1", np.array([1], np.int64)),
        init("end_max", np.array([1 << 30], np.int64)),
        init("axis1", np.array([1], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("Cast", ["tiles"], ["x8"], to=TensorProto.FLOAT),
        n("ReduceMean", ["x8", "axis_w"], ["rows"], keepdims=0),  # (B, 224, 3)
        n("Mul", ["rows", "inv255"], ["rows01"]),
        n("MatMul", ["rows01", "W_embed"], ["tok"]),  # (B, T, D)
        n("MatMul", ["tok", "W_qkv"], ["qkv_mm"]),
        n("Add", ["b_qkv", "qkv_mm"], ["qkv"]),  # (B, T, 3D)
        n("Reshape", ["qkv", "shape5"], ["qkv5"]),  # (B, T, 3, H, hd)
        n("Transpose", ["qkv5"], ["qkv_t"], perm=[2, 0, 3, 1, 4]),  # (3, B, H, T, hd)
        n("Split", ["qkv_t", "split3"], ["q1", "k1", "v1"], axis=0),
        n("Squeeze", ["q1", "axis0"], ["q"]),
        n("Squeeze", ["k1", "axis0"], ["k"]),
        n("Squeeze", ["v1", "axis0"], ["v"]),
        n("Mul", ["q", "scale"], ["q_scaled"]),
        n("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_scaled", "k_t"], ["scores"]),  # (B, H, T, T)
        n("Softmax", ["scores"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v"], ["ctx"]),  # (B, H, T, hd)
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "shape3"], ["attn"]),  # (B, T, D)
        n("MatMul", ["attn", "W_proj"], ["proj"]),
        n("Add", ["tok", "proj"], ["out"]),  # residual
        n("Slice", ["out", "start0", "end1", "axis1"], ["cls3"]),  # (B, 1, D)
        n("Squeeze", ["cls3", "axis1"], ["cls"]),
        n("Slice", ["out", "start1", "end_max", "axis1"], ["patches"]),
        n("ReduceMean", ["patches", "axis1"], ["patch_mean"], keepdims=0),  # (B, D)
        n("Concat", ["cls", "patch_mean"], ["embedding"], axis=1),  # (B, 2D)
    ]
    meta = metadata("virchow2-tiny", "fp32", True, width)
    return _save(path, "virchow_rt_attention", nodes, inits, width, meta)
